"""The broadcast global state, in fewer than 32 bits per parameter.

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

import constriction
import numpy as np

from fedmask.codec import MaskLayout

# "lossless" is not a codec of one state but a per-node protocol (fedmask.broadcast): the
# server sends each node the coded votes since the state it holds; the strategy handles it.
DOWNLINK_CODECS = ("float32", "float16", "quantized", "lossless")
_MAGIC = b"FMSQ"
_FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBBH8sI")
_SECTION = struct.Struct("<ffBII")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class StateCodecError(ValueError):
    """A broadcast that cannot be this model's state."""

    def __init__(self, field: str, expected: object, got: object):
        super().__init__(f"broadcast rejected: {field}: expected {expected}, got {got}")


def encode_state(state: dict[str, np.ndarray], layout: MaskLayout, codec: str, bits: int = 8) -> dict[str, np.ndarray]:
    """Arrays to put in the broadcast ArrayRecord."""
    if codec == "float32":
        return {name: state[name].astype(np.float32) for name, _ in layout.shapes}
    if codec == "float16":  # saturate: a value past float16's range must not arrive as inf
        return {name: np.clip(state[name], -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16)
                for name, _ in layout.shapes}
    if codec == "lossless":
        raise ValueError("downlink-codec 'lossless' codes per node, against the state each holds: "
                         "see fedmask.broadcast.LosslessDownlink (server.strategies.MaskStrategy uses it)")
    if codec != "quantized":
        raise ValueError(f"downlink-codec: expected one of {', '.join(DOWNLINK_CODECS)}, got {codec!r}")
    sections = b"".join(_encode_tensor(state[name].astype(np.float64).ravel(), bits) for name, _ in layout.shapes)
    head = _HEADER.pack(_MAGIC, _FORMAT_VERSION, bits, 0, _layout_fingerprint(layout), 0)[:-4]
    crc = zlib.crc32(sections, zlib.crc32(head))
    return {"state": np.frombuffer(head + struct.pack("<I", crc) + sections, dtype=np.uint8).copy()}


def _layout_fingerprint(layout: MaskLayout) -> bytes:
    return zlib.crc32(repr(layout.shapes).encode()).to_bytes(4, "little") * 2


def decode_state(arrays: dict[str, np.ndarray], layout: MaskLayout) -> dict[str, np.ndarray]:
    """float32 arrays by tensor name, whatever codec the server chose."""
    if set(arrays) == {"state"} and arrays["state"].dtype == np.uint8:
        return _decode_quantized(np.ascontiguousarray(arrays["state"]), layout)
    expected = {name: shape for name, shape in layout.shapes}
    got = {name: tuple(a.shape) for name, a in arrays.items()}
    if got != expected:
        raise StateCodecError("tensors", sorted(expected), sorted(got))
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
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(levels, constriction.stream.model.Categorical(counts / counts.sum(), perfect=False))
    coded = counts.tobytes() + encoder.get_compressed().astype("<u4").tobytes()
    model, data = (1, coded) if len(coded) < len(raw) else (0, raw)
    return _SECTION.pack(lo, hi, model, values.size, len(data)) + data


def _decode_quantized(blob: np.ndarray, layout: MaskLayout) -> dict[str, np.ndarray]:
    if blob.size < _HEADER.size:
        raise StateCodecError("length", f">= {_HEADER.size} bytes", blob.size)
    raw = blob.tobytes()
    magic, version, bits, reserved, fingerprint, crc = _HEADER.unpack(raw[: _HEADER.size])
    if magic != _MAGIC or version != _FORMAT_VERSION:
        raise StateCodecError("header", f"{_MAGIC!r} format {_FORMAT_VERSION}", (magic, version))
    got_crc = zlib.crc32(raw[_HEADER.size :], zlib.crc32(raw[: _HEADER.size - 4]))
    if got_crc != crc:
        raise StateCodecError("crc32", f"{crc:08x}", f"{got_crc:08x} (corrupted broadcast)")
    if reserved != 0 or not 1 <= bits <= 16:
        raise StateCodecError("header", "reserved 0 and 1..16 bits", (reserved, bits))
    if fingerprint != _layout_fingerprint(layout):
        raise StateCodecError("layout fingerprint", _layout_fingerprint(layout).hex(), fingerprint.hex())
    payload, offset, top = raw[_HEADER.size :], 0, 2**bits - 1
    out = {}
    for name, shape in layout.shapes:
        size = math.prod(shape)
        if offset + _SECTION.size > len(payload):
            raise StateCodecError(f"'{name}' section", "a section header", "end of broadcast")
        lo, hi, model, count, length = _SECTION.unpack_from(payload, offset)
        offset += _SECTION.size
        data = payload[offset : offset + length]
        offset += length
        bounds_ok = math.isfinite(lo) and math.isfinite(hi) and lo <= hi
        if count != size or len(data) != length or model not in (0, 1) or not bounds_ok:
            raise StateCodecError(f"'{name}' section", f"{size} values, model 0/1, finite lo <= hi",
                                  (count, model, lo, hi, len(data)))
        levels = _decode_levels(name, model, data, size, bits)
        if levels.size != size or (levels.size and (levels.min() < 0 or levels.max() > top)):
            raise StateCodecError(f"'{name}' values", f"{size} levels in 0..{top}", levels.size)
        scale = (hi - lo) / top if hi > lo else 1.0
        out[name] = (lo + levels * scale).astype(np.float32).reshape(shape)
    if offset != len(payload):
        raise StateCodecError("length", f"{_HEADER.size + offset} bytes", blob.size)
    return out


def _decode_levels(name: str, model: int, data: bytes, size: int, bits: int) -> np.ndarray:
    if model == 0:
        width = 1 if bits <= 8 else 2
        if len(data) != size * width:
            raise StateCodecError(f"'{name}' raw values", f"{size * width} bytes", len(data))
        return np.frombuffer(data, dtype=np.uint8 if width == 1 else "<u2").astype(np.int64)
    table = 4 * 2**bits
    if len(data) < table or (len(data) - table) % 4:
        raise StateCodecError(f"'{name}' coded values", f"a {table}-byte histogram and whole words", len(data))
    counts = np.frombuffer(data[:table], dtype="<u4").astype(np.float64)
    if counts.sum() != size:
        raise StateCodecError(f"'{name}' histogram", f"counts summing to {size}", counts.sum())
    words = np.frombuffer(data[table:], dtype="<u4").astype(np.uint32)
    try:
        decoder = constriction.stream.queue.RangeDecoder(words)
        return decoder.decode(constriction.stream.model.Categorical(counts / counts.sum(), perfect=False), size)
    except Exception as err:  # noqa: BLE001 - whatever the coder says, the stream is bad
        raise StateCodecError(f"'{name}' coded values", "a valid range-coded stream", str(err)) from None
