"""Masks to bytes and back, with a header that lets the receiver refuse what is not ours.

Wire format (little-endian), then the bit-packed masks of every tensor in layout order::

    magic "FMSK" | format u8 | codec u8 | reserved u16 | bit count u64 | fingerprint 8s | crc32 u32

The fingerprint hashes the seed, model, init and tensor layout: a mask trained for another
network (another seed or shape) has the right length often enough that length alone
cannot catch it. The CRC catches flipped bits in transit.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

MAGIC = b"FMSK"
FORMAT_VERSION = 1
CODEC_PACKBITS = 1
_HEADER = struct.Struct("<4sBBHQ8sI")
HEADER_BYTES = _HEADER.size


class MaskCodecError(ValueError):
    """An upload that cannot be a mask for this model; says which field and why."""

    def __init__(self, field: str, expected: object, got: object):
        self.field, self.expected, self.got = field, expected, got
        super().__init__(f"mask rejected: {field}: expected {expected}, got {got}")


@dataclass(frozen=True)
class MaskLayout:
    """The masked tensors of a model, by name and shape, in wire order."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "MaskLayout":
        return cls(tuple((name, tuple(a.shape)) for name, a in sorted(arrays.items())))

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes)

    def fingerprint(self, seed: int, model: str, init: str) -> bytes:
        """8 bytes that differ for any other seed, model, init or tensor layout."""
        return hashlib.sha256(repr((seed, model, init, self.shapes)).encode()).digest()[:8]


def encode_masks(masks: dict[str, np.ndarray], layout: MaskLayout, fingerprint: bytes) -> np.ndarray:
    """Bit-pack the masks (one bit per parameter) behind the header; returns uint8."""
    if sorted(masks) != [name for name, _ in layout.shapes]:
        raise ValueError(f"masks: expected tensors {[n for n, _ in layout.shapes]}, got {sorted(masks)}")
    bits = np.concatenate([np.asarray(masks[name], dtype=bool).ravel() for name, _ in layout.shapes])
    payload = np.packbits(bits)
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, CODEC_PACKBITS, 0, bits.size, fingerprint, zlib.crc32(payload)
    )
    return np.concatenate([np.frombuffer(header, dtype=np.uint8), payload])


def decode_masks(blob: object, layout: MaskLayout, fingerprint: bytes) -> dict[str, np.ndarray]:
    """The masks in ``blob``, or :class:`MaskCodecError` naming the first thing wrong."""
    if not isinstance(blob, np.ndarray):
        raise MaskCodecError("type", "numpy.ndarray", type(blob).__name__)
    if blob.dtype != np.uint8:
        raise MaskCodecError("dtype", "uint8", str(blob.dtype))
    if blob.ndim != 1:
        raise MaskCodecError("shape", "1-D", f"{blob.ndim}-D {blob.shape}")
    num_bits = layout.num_params
    expected_len = HEADER_BYTES + (num_bits + 7) // 8
    if blob.size < HEADER_BYTES:
        raise MaskCodecError("length", f"{expected_len} bytes", f"{blob.size} bytes")
    blob = np.ascontiguousarray(blob)
    magic, version, codec, reserved, bit_count, got_fp, crc = _HEADER.unpack(blob[:HEADER_BYTES].tobytes())
    if magic != MAGIC:
        raise MaskCodecError("magic", MAGIC, magic)
    if version != FORMAT_VERSION:
        raise MaskCodecError("format version", FORMAT_VERSION, version)
    if codec != CODEC_PACKBITS:
        raise MaskCodecError("codec", f"{CODEC_PACKBITS} (packbits)", codec)
    if reserved != 0:
        raise MaskCodecError("reserved", 0, reserved)
    if bit_count != num_bits:
        raise MaskCodecError("bit count", num_bits, bit_count)
    if got_fp != fingerprint:
        raise MaskCodecError(
            "fingerprint", f"{fingerprint.hex()} (this seed, model, init)", f"{got_fp.hex()} (another model)"
        )
    if blob.size != expected_len:
        raise MaskCodecError("length", f"{expected_len} bytes", f"{blob.size} bytes")
    payload = blob[HEADER_BYTES:]
    if zlib.crc32(payload) != crc:
        raise MaskCodecError("crc32", f"{crc:08x}", f"{zlib.crc32(payload):08x} (corrupted payload)")
    bits = np.unpackbits(payload, count=num_bits).astype(bool)
    out, start = {}, 0
    for name, shape in layout.shapes:
        size = math.prod(shape)
        out[name] = bits[start : start + size].reshape(shape)
        start += size
    return out
