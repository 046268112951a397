"""The broadcast global state as itself, in fewer than 32 bits per parameter (format ``FMSQ``).

``float32`` sends the state as is; ``float16`` halves it; ``quantized`` maps each tensor
to ``2**bits`` uniform levels between its min and max and entropy-codes the level indices
with their own histogram (constriction's range coder, categorical model). The receiver
needs only the tensor layout, which every party derives from the seed and config.

Wire format of ``quantized`` (little-endian)::

    magic "FMSQ" | format u8 | bits u8 | reserved u16 | layout fingerprint 8s | crc32 u32
    per tensor in layout order: lo f32 | hi f32 | model u8 | values u32 | coded bytes u32 | data

``model`` 0 stores the level indices raw (u8 or u16), 1 stores a histogram of
``2**bits`` u32 counts followed by the range-coded indices; the smaller one is sent. The
CRC covers the header before it and the whole payload; the fingerprint and per-tensor
value counts make a broadcast for another layout fail loudly.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

from fedmask.names import DOWNLINK_CODECS
from fedmask.wire.frame import Frame, Layout, Reader, categorical, code_histogram, decoding

# "lossless" is not a codec of one state but a per-node protocol (fedmask.downlink): the
# server sends each node the coded votes since the state it holds; the strategy handles it.
_FORMAT_VERSION = 1
FRAME = Frame("broadcast", b"FMSQ", (("format", "B"), ("bits", "B"), ("reserved", "H"),
                                     ("layout fingerprint", "8s"), ("crc32", "I")), crc_covers_header=True)
_SECTION = struct.Struct("<ffBII")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def encode_state(state: dict[str, np.ndarray], layout: Layout, codec: str, bits: int = 8) -> dict[str, np.ndarray]:
    """Arrays to put in the broadcast ArrayRecord."""
    if codec == "float32":
        return {name: state[name].astype(np.float32) for name, _ in layout.shapes}
    if codec == "float16":  # saturate: a value past float16's range must not arrive as inf
        return {name: np.clip(state[name], -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16)
                for name, _ in layout.shapes}
    if codec == "lossless":
        raise ValueError("downlink-codec 'lossless' codes per node, against the state each holds: "
                         "see fedmask.downlink.LosslessDownlink (server.strategies.MaskStrategy uses it)")
    if codec != "quantized":
        raise ValueError(f"downlink-codec: expected one of {', '.join(DOWNLINK_CODECS)}, got {codec!r}")
    sections = b"".join(_encode_tensor(state[name].astype(np.float64).ravel(), bits) for name, _ in layout.shapes)
    values = {"format": _FORMAT_VERSION, "bits": bits, "reserved": 0, "layout fingerprint": _layout_fingerprint(layout)}
    return {"state": FRAME.pack(values, sections)}


def _layout_fingerprint(layout: Layout) -> bytes:
    return zlib.crc32(repr(layout.shapes).encode()).to_bytes(4, "little") * 2


def decode_state(arrays: dict[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """float32 arrays by tensor name, whatever codec the server chose."""
    if set(arrays) == {"state"} and arrays["state"].dtype == np.uint8:
        return _decode_quantized(np.ascontiguousarray(arrays["state"]), layout)
    expected = {name: shape for name, shape in layout.shapes}
    got = {name: tuple(a.shape) for name, a in arrays.items()}
    if got != expected:
        raise FRAME.error("tensors", sorted(expected), sorted(got))
    return {name: a.astype(np.float32) for name, a in arrays.items()}


def _levels(values: np.ndarray, bits: int) -> tuple[float, float, np.ndarray]:
    lo, hi = float(np.float32(values.min())), float(np.float32(values.max()))
    top = 2**bits - 1
    scale = (hi - lo) / top if hi > lo else 1.0
    return lo, hi, np.clip(np.rint((values - lo) / scale), 0, top).astype(np.int32)


def _encode_tensor(values: np.ndarray, bits: int) -> bytes:
    lo, hi, levels = _levels(values, bits)
    raw = levels.astype(np.uint8 if bits <= 8 else "<u2").tobytes()
    counts = np.bincount(levels, minlength=2**bits).astype("<u4")
    coded = counts.tobytes() + code_histogram(levels, counts)
    model, data = (1, coded) if len(coded) < len(raw) else (0, raw)
    return _SECTION.pack(lo, hi, model, values.size, len(data)) + data


def _decode_quantized(blob: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    raw = blob.tobytes()
    fields, payload = FRAME.read(raw)
    if fields["magic"] != FRAME.magic or fields["format"] != _FORMAT_VERSION:
        raise FRAME.error("header", f"{FRAME.magic!r} format {_FORMAT_VERSION}", (fields["magic"], fields["format"]))
    FRAME.check_crc(raw, why="corrupted broadcast")
    bits = fields["bits"]
    if fields["reserved"] != 0 or not 1 <= bits <= 16:
        raise FRAME.error("header", "reserved 0 and 1..16 bits", (fields["reserved"], bits))
    if fields["layout fingerprint"] != _layout_fingerprint(layout):
        raise FRAME.error("layout fingerprint", _layout_fingerprint(layout).hex(), fields["layout fingerprint"].hex())
    reader, top, out = Reader(payload, FRAME), 2**bits - 1, {}
    for name, shape in layout.shapes:
        size = math.prod(shape)
        lo, hi, model, count, length = reader.unpack(_SECTION, f"'{name}' section", "a section header")
        data = reader.take(min(length, reader.left), f"'{name}' section")
        bounds_ok = math.isfinite(lo) and math.isfinite(hi) and lo <= hi
        if count != size or len(data) != length or model not in (0, 1) or not bounds_ok:
            raise FRAME.error(f"'{name}' section", f"{size} values, model 0/1, finite lo <= hi",
                              (count, model, lo, hi, len(data)))
        levels = _decode_levels(name, model, data, size, bits)
        if levels.size != size or (levels.size and (levels.min() < 0 or levels.max() > top)):
            raise FRAME.error(f"'{name}' values", f"{size} levels in 0..{top}", levels.size)
        scale = (hi - lo) / top if hi > lo else 1.0
        out[name] = (lo + levels * scale).astype(np.float32).reshape(shape)
    reader.end()
    return out


def _decode_levels(name: str, model: int, data: bytes, size: int, bits: int) -> np.ndarray:
    if model == 0:
        width = 1 if bits <= 8 else 2
        if len(data) != size * width:
            raise FRAME.error(f"'{name}' raw values", f"{size * width} bytes", len(data))
        return np.frombuffer(data, dtype=np.uint8 if width == 1 else "<u2").astype(np.int64)
    table = 4 * 2**bits
    if len(data) < table or (len(data) - table) % 4:
        raise FRAME.error(f"'{name}' coded values", f"a {table}-byte histogram and whole words", len(data))
    counts = np.frombuffer(data[:table], dtype="<u4").astype(np.float64)
    if counts.sum() != size:
        raise FRAME.error(f"'{name}' histogram", f"counts summing to {size}", counts.sum())
    with decoding(FRAME, f"'{name}' coded values", data[table:]) as decoder:
        return decoder.decode(categorical(counts / counts.sum()), size)
