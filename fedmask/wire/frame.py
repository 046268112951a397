"""The one frame every fedmask byte format is built on.

A coded array on the wire (a mask upload, a compressed update, LaPerm's ranks, a
quantized or lossless broadcast) is a fixed header, then sections. Every format shares:

- the header (:class:`Frame`): a 4-byte magic, a format version, the format's own fields,
  and a CRC32; the frame packs it, reads it back within bounds, and names its fields'
  byte ranges (what a fault injector corrupts);
- the CRC: over the payload (seeded with a digest of the side information the payload was
  coded against, when there is one) or over the header before it and the payload;
- the fingerprint: 8 bytes of the seed, model, init and tensor layout (:meth:`Layout.fingerprint`),
  so bytes for another network are refused even when their length happens to fit;
- sections, read with :class:`Reader`, which never reads past the end;
- the range coder (constriction's), through :func:`coded_bytes` and :func:`decoding`, which
  turns whatever the coder raises on a bad stream into the format's error;
- one error, :class:`WireError`, that names the field, what was expected and what came.

Each format (:mod:`fedmask.wire.masks`, ``ranks``, ``updates``, ``quantized``,
``lossless``) keeps its own bytes and knows no method: it codes arrays.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import constriction
import numpy as np


class WireError(ValueError):
    """Bytes that cannot be what the receiver expects: ``field``, ``expected``, ``got``.

    ``what`` names the kind of bytes (``mask``, ``update``, ``broadcast``, ``lossless
    broadcast``): the message reads "mask rejected: crc32: expected ..., got ...".
    """

    def __init__(self, what: str, field: str, expected: object, got: object):
        self.what, self.field, self.expected, self.got = what, field, expected, got
        super().__init__(f"{what} rejected: {field}: expected {expected}, got {got}")


@dataclass(frozen=True)
class Layout:
    """Named tensors and their shapes, in wire order (sorted by name)."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Layout:
        return cls(tuple((name, tuple(a.shape)) for name, a in sorted(arrays.items())))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.shapes]

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes)

    def fingerprint(self, seed: int, model: str, init: str) -> bytes:
        """8 bytes that differ for any other seed, model, init or tensor layout."""
        return hashlib.sha256(repr((seed, model, init, self.shapes)).encode()).digest()[:8]


@dataclass(frozen=True)
class Frame:
    """A format's header: ``magic``, then ``fields`` in wire order ((name, struct format),
    little-endian; ``format`` first, ``crc32`` last), checked with a CRC32 over the payload
    or, with ``crc_covers_header``, over the header before the CRC and the payload."""

    what: str
    magic: bytes
    fields: tuple[tuple[str, str], ...]
    crc_covers_header: bool = False

    @cached_property
    def struct(self) -> struct.Struct:
        return struct.Struct("<4s" + "".join(fmt for _, fmt in self.fields))

    @property
    def size(self) -> int:
        return self.struct.size

    def slice(self, name: str) -> slice:
        """The bytes of one header field (``"magic"`` or a field's name) in a blob."""
        if name == "magic":
            return slice(0, 4)
        names = [field for field, _ in self.fields]
        index = names.index(name)
        start = struct.calcsize("<4s" + "".join(fmt for _, fmt in self.fields[:index]))
        return slice(start, start + struct.calcsize("<" + self.fields[index][1]))

    def error(self, field: str, expected: object, got: object) -> WireError:
        return WireError(self.what, field, expected, got)

    def pack(self, values: dict[str, Any], payload: bytes, crc_seed: int = 0) -> np.ndarray:
        """Header and payload as one uint8 array; ``values`` holds every field but the CRC."""
        ordered = [values[name] for name, _ in self.fields[:-1]]
        head = self.struct.pack(self.magic, *ordered, 0)[:-4]
        crc = zlib.crc32(payload, zlib.crc32(head, crc_seed) if self.crc_covers_header else crc_seed)
        return np.frombuffer(head + struct.pack("<I", crc) + payload, dtype=np.uint8).copy()

    def read(self, raw: bytes) -> tuple[dict[str, Any], bytes]:
        """The header's fields (magic included) and the payload after it; only the length is checked."""
        if len(raw) < self.size:
            raise self.error("length", f">= {self.size} bytes", len(raw))
        names = ["magic", *(name for name, _ in self.fields)]
        return dict(zip(names, self.struct.unpack_from(raw))), raw[self.size :]

    def check_crc(self, raw: bytes, crc_seed: int = 0, why: str = "corrupted") -> None:
        """The CRC the header carries against the bytes (``raw``: header and payload)."""
        crc = struct.unpack_from("<I", raw, self.size - 4)[0]
        payload = memoryview(raw)[self.size :]
        seed = zlib.crc32(memoryview(raw)[: self.size - 4], crc_seed) if self.crc_covers_header else crc_seed
        got = zlib.crc32(payload, seed)
        if got != crc:
            raise self.error("crc32", f"{crc:08x}", f"{got:08x} ({why})")


def bound(seed: int, bind: tuple[int, int] | None) -> int:
    """A CRC seed bound to one (round, client): an upload checked against another round or
    client (a replayed upload, another client's) is refused, whatever its codec."""
    return seed if bind is None else zlib.crc32(struct.pack("<qq", *bind), seed)


def blob_bytes(blob: object, frame: Frame) -> bytes:
    """The bytes of a strict upload: a 1-D uint8 numpy array at least a header long."""
    if not isinstance(blob, np.ndarray):
        raise frame.error("type", "numpy.ndarray", type(blob).__name__)
    if blob.dtype != np.uint8:
        raise frame.error("dtype", "uint8", str(blob.dtype))
    if blob.ndim != 1:
        raise frame.error("shape", "1-D", f"{blob.ndim}-D {blob.shape}")
    if blob.size < frame.size:
        raise frame.error("length", f"at least {frame.size} bytes", f"{blob.size} bytes")
    return np.ascontiguousarray(blob).tobytes()


def any_bytes(blob: object) -> bytes:
    """The bytes of an array or a bytes-like object, as uint8."""
    if isinstance(blob, np.ndarray):
        return np.ascontiguousarray(blob, dtype=np.uint8).tobytes()
    return bytes(blob)  # type: ignore[call-overload]


class Reader:
    """Reads a payload front to back; running past its end is the frame's error."""

    def __init__(self, payload: bytes | memoryview, frame: Frame, offset: int = 0):
        self.payload, self.frame, self.offset = payload, frame, offset

    @property
    def left(self) -> int:
        return len(self.payload) - self.offset

    def take(self, count: int, field: str) -> bytes:
        if count < 0 or count > self.left:
            raise self.frame.error(field, f"{count} more bytes", f"{self.left} left")
        data = bytes(self.payload[self.offset : self.offset + count])
        self.offset += count
        return data

    def unpack(self, layout: struct.Struct, field: str, expected: str = "") -> tuple[Any, ...]:
        """One fixed-size section header (``expected`` says what it is, for the error)."""
        if layout.size > self.left:
            raise self.frame.error(field, expected or f"a {layout.size}-byte section header", "end of payload")
        values = layout.unpack_from(self.payload, self.offset)
        self.offset += layout.size
        return values

    def end(self) -> None:
        """Nothing may follow the last section."""
        if self.left:
            raise self.frame.error("length", f"{self.frame.size + self.offset} bytes",
                                   f"{self.frame.size + len(self.payload)} bytes")


# ---------------------------------------------------------------- the range coder


def categorical(probs: np.ndarray) -> Any:
    """constriction's categorical model of these probabilities (every machine builds the same one)."""
    return constriction.stream.model.Categorical(probs, perfect=False)


def bernoulli(prob: float | None = None) -> Any:
    """constriction's Bernoulli model; without ``prob``, per-symbol probabilities go with the call."""
    if prob is None:
        return constriction.stream.model.Bernoulli(perfect=False)
    return constriction.stream.model.Bernoulli(prob, perfect=False)


def encoder() -> Any:
    return constriction.stream.queue.RangeEncoder()


def coded_bytes(coder: Any) -> bytes:
    """What a range encoder wrote: whole little-endian 32-bit words."""
    return coder.get_compressed().astype("<u4").tobytes()


def code_histogram(symbols: np.ndarray, counts: np.ndarray) -> bytes:
    """Symbols range-coded with the categorical model of their own histogram."""
    coder = encoder()
    coder.encode(np.asarray(symbols, dtype=np.int32), categorical(counts / counts.sum()))
    return coded_bytes(coder)


@contextmanager
def decoding(frame: Frame, field: str, data: bytes) -> Iterator[Any]:
    """A range decoder over ``data`` (whole 32-bit words); whatever the coder raises on a bad
    stream becomes the frame's error for ``field``."""
    if len(data) % 4:
        raise frame.error(field, "whole 32-bit words", f"{len(data)} bytes")
    try:
        yield constriction.stream.queue.RangeDecoder(np.frombuffer(data, dtype="<u4").astype(np.uint32))
    except WireError:
        raise
    except Exception as err:  # whatever the coder says, the stream is bad
        raise frame.error(field, "a valid range-coded stream", str(err)) from None
