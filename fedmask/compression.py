"""Compressed dense updates: the baselines mask methods are judged against.

A client of these baselines trains the dense model, as FedAvg's does, and uploads its
update ``delta = local weights - broadcast weights``, compressed:

- ``sign`` (SignSGD with majority vote; Bernstein et al., ICML 2018): one bit per
  parameter, the sign of the update; the server moves every weight by ``server-lr`` in the
  direction of the clients' (weighted) majority.
- ``scaled-sign`` (EF-SignSGD; Karimireddy et al., ICML 2019): the sign times the mean
  ``|p|`` of each tensor, where ``p = delta + e`` adds the client's error memory ``e``
  (what earlier compressions left out, ``e = p - C(p)``); the server averages.
- ``qsgd`` (Alistarh et al., NeurIPS 2017): per tensor, the norm and, per parameter, a
  sign and a level in ``0..s`` drawn by stochastic rounding (unbiased); levels are
  range-coded with their histogram, signs sent for non-zero levels only; the server
  averages.
- ``topk`` (with error feedback; Stich et al., NeurIPS 2018): per tensor the ``k``
  largest ``|p|``: their positions as a bit mask range-coded at their frequency, and
  their float32 values; the error memory keeps the rest; the server averages.

Wire format (little-endian): ``magic "FMDU" | format u8 | kind u8 | reserved u16 |
fingerprint 8s | params u32 | crc32 u32`` then one section per tensor in layout order
(below). The CRC covers the sections; a reply for another model or layout fails on the
fingerprint, a corrupt one on the CRC, and every length and count is checked before use,
so a hostile upload is refused with the field that was wrong.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping

import constriction
import numpy as np

from fedmask.codec import MaskLayout

COMPRESSORS = ("sign", "scaled-sign", "qsgd", "topk")
_KIND = {name: i + 1 for i, name in enumerate(COMPRESSORS)}
MAGIC = b"FMDU"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBBH8sII")
HEADER_BYTES = _HEADER.size
_F32 = struct.Struct("<f")
_U32 = struct.Struct("<I")

Update = dict[str, np.ndarray]


class CompressionError(ValueError):
    """An upload that cannot be this model's compressed update; the message names the field."""

    def __init__(self, field: str, expected: object, got: object):
        super().__init__(f"update rejected: {field}: expected {expected}, got {got}")


def compress(update: Mapping[str, np.ndarray], layout: MaskLayout, fingerprint: bytes, kind: str,
             rng: np.random.Generator, levels: int = 4, fraction: float = 0.01) -> tuple[np.ndarray, Update]:
    """The coded upload (uint8) and what the server will decode from it (float32 by tensor)."""
    if kind not in _KIND:
        raise ValueError(f"compressor: expected one of {', '.join(COMPRESSORS)}, got {kind!r}")
    sections, decoded = [], {}
    for name, shape in layout.shapes:
        values = np.asarray(update[name], dtype=np.float32).ravel()
        if kind == "sign":
            section, out = _sign(values, scaled=False)
        elif kind == "scaled-sign":
            section, out = _sign(values, scaled=True)
        elif kind == "qsgd":
            section, out = _qsgd(values, levels, rng)
        else:
            section, out = _topk(values, fraction)
        sections.append(section)
        decoded[name] = out.reshape(shape)
    payload = b"".join(sections)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, _KIND[kind], 0, fingerprint, layout.num_params,
                          zlib.crc32(payload))
    return np.frombuffer(header + payload, dtype=np.uint8).copy(), decoded


def decompress(blob: np.ndarray, layout: MaskLayout, fingerprint: bytes, kind: str, levels: int = 4) -> Update:
    """The update a coded upload carries; raises CompressionError naming what is wrong."""
    raw = np.ascontiguousarray(blob, dtype=np.uint8).tobytes() if isinstance(blob, np.ndarray) else bytes(blob)
    if len(raw) < HEADER_BYTES:
        raise CompressionError("length", f">= {HEADER_BYTES} bytes", len(raw))
    magic, version, got_kind, reserved, got_fingerprint, params, crc = _HEADER.unpack_from(raw)
    if magic != MAGIC or version != FORMAT_VERSION or reserved != 0:
        raise CompressionError("header", f"{MAGIC!r} format {FORMAT_VERSION}", (magic, version, reserved))
    if got_kind != _KIND[kind]:
        raise CompressionError("kind", kind, got_kind)
    if got_fingerprint != fingerprint:
        raise CompressionError("fingerprint", fingerprint.hex(), got_fingerprint.hex())
    if params != layout.num_params:
        raise CompressionError("params", layout.num_params, params)
    payload = memoryview(raw)[HEADER_BYTES:]
    if zlib.crc32(payload) != crc:
        raise CompressionError("crc32", f"{crc:08x}", f"{zlib.crc32(payload):08x} (corrupted upload)")
    reader = _Reader(payload)
    out = {}
    for name, shape in layout.shapes:
        size = math.prod(shape)
        if kind in ("sign", "scaled-sign"):
            values = _read_sign(reader, name, size, scaled=kind == "scaled-sign")
        elif kind == "qsgd":
            values = _read_qsgd(reader, name, size, levels)
        else:
            values = _read_topk(reader, name, size)
        if not np.isfinite(values).all():
            raise CompressionError(f"'{name}' values", "finite numbers", "NaN or inf")
        out[name] = values.reshape(shape)
    if reader.offset != len(payload):
        raise CompressionError("length", f"{HEADER_BYTES + reader.offset} bytes", len(raw))
    return out


class _Reader:
    """Reads sections from a payload; running past its end is a CompressionError."""

    def __init__(self, payload: memoryview):
        self.payload, self.offset = payload, 0

    def take(self, count: int, field: str) -> bytes:
        if count < 0 or self.offset + count > len(self.payload):
            raise CompressionError(field, f"{count} more bytes", f"{len(self.payload) - self.offset} left")
        data = bytes(self.payload[self.offset:self.offset + count])
        self.offset += count
        return data

    def f32(self, field: str) -> float:
        value = _F32.unpack(self.take(4, field))[0]
        if not math.isfinite(value):
            raise CompressionError(field, "a finite float32", value)
        return float(value)

    def u32(self, field: str) -> int:
        return int(_U32.unpack(self.take(4, field))[0])


# ---------------------------------------------------------------- sign


def _sign(values: np.ndarray, scaled: bool) -> tuple[bytes, np.ndarray]:
    positive = values >= 0
    scale = float(np.float32(np.abs(values).mean())) if scaled and values.size else 1.0
    signs = np.where(positive, np.float32(1), np.float32(-1))
    head = _F32.pack(scale) if scaled else b""
    return head + np.packbits(positive).tobytes(), (signs * np.float32(scale)).astype(np.float32)


def _read_sign(reader: _Reader, name: str, size: int, scaled: bool) -> np.ndarray:
    scale = reader.f32(f"'{name}' scale") if scaled else 1.0
    bits = np.unpackbits(np.frombuffer(reader.take((size + 7) // 8, f"'{name}' signs"), dtype=np.uint8), count=size)
    return (np.where(bits.astype(bool), np.float32(1), np.float32(-1)) * np.float32(scale)).astype(np.float32)


# ---------------------------------------------------------------- QSGD


def _qsgd(values: np.ndarray, levels: int, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    norm = np.float32(np.linalg.norm(values.astype(np.float64)))
    if norm == 0 or not values.size:
        level = np.zeros(values.size, dtype=np.int64)
    else:
        scaled = np.abs(values.astype(np.float64)) / float(norm) * levels
        floor = np.floor(scaled)
        level = (floor + (rng.random(values.size) < scaled - floor)).astype(np.int64)
        level = np.minimum(level, levels)
    nonzero = level > 0
    counts = np.bincount(level, minlength=levels + 1).astype("<u4")
    coded = _range_code(level, counts)
    signs = np.packbits(values[nonzero] >= 0).tobytes()
    section = _F32.pack(float(norm)) + counts.tobytes() + _U32.pack(len(coded)) + coded + signs
    return section, _dequantize(float(norm), level, values[nonzero] >= 0, levels)


def _dequantize(norm: float, level: np.ndarray, positive: np.ndarray, levels: int) -> np.ndarray:
    out = np.zeros(level.size, dtype=np.float64)
    nonzero = level > 0
    out[nonzero] = np.where(positive, 1.0, -1.0) * level[nonzero] * (norm / levels)
    return out.astype(np.float32)


def _read_qsgd(reader: _Reader, name: str, size: int, levels: int) -> np.ndarray:
    norm = reader.f32(f"'{name}' norm")
    if norm < 0:
        raise CompressionError(f"'{name}' norm", ">= 0", norm)
    counts = np.frombuffer(reader.take(4 * (levels + 1), f"'{name}' histogram"), dtype="<u4").astype(np.int64)
    if counts.sum() != size:
        raise CompressionError(f"'{name}' histogram", f"counts summing to {size}", int(counts.sum()))
    coded = reader.take(reader.u32(f"'{name}' coded length"), f"'{name}' coded levels")
    level = _range_decode(coded, counts, size, name)
    nonzero = int((level > 0).sum())
    bits = np.frombuffer(reader.take((nonzero + 7) // 8, f"'{name}' signs"), dtype=np.uint8)
    positive = np.unpackbits(bits, count=nonzero).astype(bool)
    return _dequantize(norm, level, positive, levels)


# ---------------------------------------------------------------- top-k


def _topk(values: np.ndarray, fraction: float) -> tuple[bytes, np.ndarray]:
    k = min(values.size, max(1, round(fraction * values.size)))
    keep = np.zeros(values.size, dtype=bool)
    keep[np.argpartition(-np.abs(values), k - 1)[:k]] = True
    coded = _range_code(keep.astype(np.int64), np.array([values.size - k, k], dtype="<u4"))
    kept = values[keep].astype("<f4")
    out = np.zeros(values.size, dtype=np.float32)
    out[keep] = kept
    return _U32.pack(k) + _U32.pack(len(coded)) + coded + kept.tobytes(), out


def _read_topk(reader: _Reader, name: str, size: int) -> np.ndarray:
    k = reader.u32(f"'{name}' k")
    if not 0 <= k <= size:
        raise CompressionError(f"'{name}' k", f"0..{size}", k)
    coded = reader.take(reader.u32(f"'{name}' coded length"), f"'{name}' positions")
    keep = _range_decode(coded, np.array([size - k, k]), size, name).astype(bool)
    kept = np.frombuffer(reader.take(4 * k, f"'{name}' values"), dtype="<f4")
    out = np.zeros(size, dtype=np.float32)
    out[keep] = kept
    return out


# ---------------------------------------------------------------- range coding with a histogram


def _range_code(symbols: np.ndarray, counts: np.ndarray) -> bytes:
    """Symbols range-coded with the categorical model of their own histogram (empty if one symbol)."""
    if np.count_nonzero(counts) <= 1:
        return b""
    encoder = constriction.stream.queue.RangeEncoder()
    model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
    encoder.encode(symbols.astype(np.int32), model)
    return encoder.get_compressed().astype("<u4").tobytes()


def _range_decode(data: bytes, counts: np.ndarray, size: int, name: str) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != size or (counts < 0).any():
        raise CompressionError(f"'{name}' histogram", f"non-negative counts summing to {size}", counts.tolist())
    present = np.flatnonzero(counts)
    if present.size <= 1:
        if data:
            raise CompressionError(f"'{name}' coded symbols", "none (a single symbol)", f"{len(data)} bytes")
        return np.full(size, present[0] if present.size else 0, dtype=np.int64)
    if len(data) % 4:
        raise CompressionError(f"'{name}' coded symbols", "whole 32-bit words", f"{len(data)} bytes")
    try:
        decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(data, dtype="<u4").astype(np.uint32))
        model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
        symbols = np.asarray(decoder.decode(model, size), dtype=np.int64)
    except Exception as err:  # noqa: BLE001 - whatever the coder says, the stream is bad
        raise CompressionError(f"'{name}' coded symbols", "a valid range-coded stream", str(err)) from None
    if np.bincount(symbols, minlength=counts.size)[: counts.size].tolist() != counts.tolist():
        raise CompressionError(f"'{name}' coded symbols", "the histogram it was sent with", "other counts")
    return symbols


class ErrorFeedback:
    """A client's memory of what compression left out (``e = p - C(p)``), by tensor."""

    def __init__(self, memory: Mapping[str, np.ndarray] | None = None):
        self.memory = {k: np.asarray(v, dtype=np.float32) for k, v in (memory or {}).items()}

    def add(self, update: Mapping[str, np.ndarray]) -> Update:
        """``p = delta + e``."""
        return {k: (np.asarray(v, np.float32) + self.memory.get(k, np.float32(0))).astype(np.float32)
                for k, v in update.items()}

    def keep(self, corrected: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> None:
        """``e = p - C(p)``."""
        self.memory = {k: (corrected[k] - sent[k]).astype(np.float32) for k in corrected}


def aggregate_updates(kind: str, state: Mapping[str, np.ndarray], updates: list[Update], weights: list[float],
                      sign_lr: float) -> Update:
    """The next dense state from the clients' decoded updates.

    ``sign``: every weight moves by ``sign_lr`` towards the clients' majority sign (one vote
    per client, as in SignSGD with majority vote; a tie moves nothing). The others add the
    example-weighted mean of the updates, as FedAvg would with the full updates.
    """
    new_state = {}
    total = float(sum(weights))
    for name, value in state.items():
        base = np.asarray(value)
        if kind == "sign":
            votes = np.asarray(sum(np.sign(u[name]).astype(np.float64) for u in updates))
            step = sign_lr * np.sign(votes)
        else:
            step = np.asarray(sum(w * u[name].astype(np.float64) for w, u in zip(weights, updates))) / total
        new_state[name] = (base.astype(np.float64) + step).astype(base.dtype)
    return new_state
