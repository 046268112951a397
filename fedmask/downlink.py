"""The broadcast global state, in fewer than 32 bits per parameter.

``float32`` sends the state as is; ``float16`` halves it; ``quantized`` maps each tensor
to ``2**bits`` uniform levels between its min and max and entropy-codes the level indices
with their own histogram (constriction's range coder, categorical model). The receiver
needs only the tensor layout, which every party derives from the seed and config.

Wire format of ``quantized`` (little-endian)::

    magic "FMSQ" | format u8 | bits u8 | reserved u16 | crc32 u32
    per tensor in layout order: lo f32 | hi f32 | model u8 | coded bytes u32 | data

``model`` 0 stores the level indices raw (u8 or u16), 1 stores a histogram of
``2**bits`` u32 counts followed by the range-coded indices; the smaller one is sent.
"""

from __future__ import annotations

import math
import struct
import zlib

import constriction
import numpy as np

from fedmask.codec import MaskLayout

DOWNLINK_CODECS = ("float32", "float16", "quantized")
_MAGIC = b"FMSQ"
_FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBBHI")
_SECTION = struct.Struct("<ffBI")


class StateCodecError(ValueError):
    """A broadcast that cannot be this model's state."""

    def __init__(self, field: str, expected: object, got: object):
        super().__init__(f"broadcast rejected: {field}: expected {expected}, got {got}")


def encode_state(state: dict[str, np.ndarray], layout: MaskLayout, codec: str, bits: int = 8) -> dict[str, np.ndarray]:
    """Arrays to put in the broadcast ArrayRecord."""
    if codec == "float32":
        return {name: state[name].astype(np.float32) for name, _ in layout.shapes}
    if codec == "float16":
        return {name: state[name].astype(np.float16) for name, _ in layout.shapes}
    if codec != "quantized":
        raise ValueError(f"downlink-codec: expected one of {', '.join(DOWNLINK_CODECS)}, got {codec!r}")
    sections = b"".join(_encode_tensor(state[name].astype(np.float64).ravel(), bits) for name, _ in layout.shapes)
    header = _HEADER.pack(_MAGIC, _FORMAT_VERSION, bits, 0, zlib.crc32(sections))
    return {"state": np.frombuffer(header + sections, dtype=np.uint8).copy()}


def decode_state(arrays: dict[str, np.ndarray], layout: MaskLayout) -> dict[str, np.ndarray]:
    """float32 arrays by tensor name, whatever codec the server chose."""
    if set(arrays) == {"state"} and arrays["state"].dtype == np.uint8:
        return _decode_quantized(np.ascontiguousarray(arrays["state"]), layout)
    expected = {name: shape for name, shape in layout.shapes}
    got = {name: tuple(a.shape) for name, a in arrays.items()}
    if got != expected:
        raise StateCodecError("tensors", sorted(expected), sorted(got))
    return {name: a.astype(np.float32) for name, a in arrays.items()}


def roundtrip(state: dict[str, np.ndarray], layout: MaskLayout, codec: str, bits: int = 8) -> dict[str, np.ndarray]:
    """What a client will hold after decoding this broadcast (the server uses it too)."""
    return decode_state(encode_state(state, layout, codec, bits), layout)


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
    return _SECTION.pack(lo, hi, model, len(data)) + data


def _decode_quantized(blob: np.ndarray, layout: MaskLayout) -> dict[str, np.ndarray]:
    if blob.size < _HEADER.size:
        raise StateCodecError("length", f">= {_HEADER.size} bytes", blob.size)
    magic, version, bits, _, crc = _HEADER.unpack(blob[: _HEADER.size].tobytes())
    if magic != _MAGIC or version != _FORMAT_VERSION or not 1 <= bits <= 16:
        raise StateCodecError("header", f"{_MAGIC!r} v{_FORMAT_VERSION}, 1..16 bits", (magic, version, bits))
    payload = blob[_HEADER.size :].tobytes()
    if zlib.crc32(payload) != crc:
        raise StateCodecError("crc32", f"{crc:08x}", f"{zlib.crc32(payload):08x}")
    out, offset, top = {}, 0, 2**bits - 1
    for name, shape in layout.shapes:
        size = math.prod(shape)
        lo, hi, model, length = _SECTION.unpack_from(payload, offset)
        offset += _SECTION.size
        data = payload[offset : offset + length]
        offset += length
        if model == 0:
            levels = np.frombuffer(data, dtype=np.uint8 if bits <= 8 else "<u2").astype(np.int64)
        else:
            counts = np.frombuffer(data[: 4 * (top + 1)], dtype="<u4").astype(np.float64)
            words = np.frombuffer(data[4 * (top + 1) :], dtype="<u4").astype(np.uint32)
            decoder = constriction.stream.queue.RangeDecoder(words)
            levels = decoder.decode(constriction.stream.model.Categorical(counts / counts.sum(), perfect=False), size)
        if levels.size != size:
            raise StateCodecError(f"'{name}' values", size, levels.size)
        scale = (hi - lo) / top if hi > lo else 1.0
        out[name] = (lo + levels * scale).astype(np.float32).reshape(shape)
    if offset != len(payload):
        raise StateCodecError("length", f"{_HEADER.size + offset} bytes", blob.size)
    return out
