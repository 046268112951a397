"""Where bytes are framed: :mod:`fedmask.wire.frame` (header, CRC, fingerprint, sections, the
range coder, ``WireError``), then one module per format (``masks``, ``ranks``, ``updates``,
``state``, ``lossless``, ``relative``)."""
