"""Compressed dense updates to bytes and back (format ``FMDU`` on :mod:`fedmask.wire.frame`).

The compressed dense baselines (:mod:`fedmask.methods.dense`) upload an update
``delta = local weights - broadcast weights``, compressed:

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
from collections.abc import Mapping

import numpy as np

from fedmask.names import COMPRESSORS
from fedmask.wire.frame import Frame, Layout, Reader, any_bytes, bound, categorical, code_histogram, decoding

_KIND = {name: i + 1 for i, name in enumerate(COMPRESSORS)}
FORMAT_VERSION = 1
FRAME = Frame("update", b"FMDU", (("format", "B"), ("kind", "B"), ("reserved", "H"), ("fingerprint", "8s"),
                                  ("params", "I"), ("crc32", "I")))
HEADER_BYTES = FRAME.size
_F32 = struct.Struct("<f")
_U32 = struct.Struct("<I")

Update = dict[str, np.ndarray]


def compress(update: Mapping[str, np.ndarray], layout: Layout, fingerprint: bytes, kind: str,
             rng: np.random.Generator, levels: int = 4, fraction: float = 0.01,
             bind: tuple[int, int] | None = None) -> tuple[np.ndarray, Update]:
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
    header = {"format": FORMAT_VERSION, "kind": _KIND[kind], "reserved": 0, "fingerprint": fingerprint,
              "params": layout.num_params}
    return FRAME.pack(header, b"".join(sections), bound(0, bind)), decoded


def decompress(blob: np.ndarray, layout: Layout, fingerprint: bytes, kind: str, levels: int = 4,
               bind: tuple[int, int] | None = None) -> Update:
    """The update a coded upload carries; raises :class:`~fedmask.wire.frame.WireError` naming what is wrong."""
    raw = any_bytes(blob)
    fields, payload = FRAME.read(raw)
    if fields["magic"] != FRAME.magic or fields["format"] != FORMAT_VERSION or fields["reserved"] != 0:
        raise FRAME.error("header", f"{FRAME.magic!r} format {FORMAT_VERSION}",
                          (fields["magic"], fields["format"], fields["reserved"]))
    if fields["kind"] != _KIND[kind]:
        raise FRAME.error("kind", kind, fields["kind"])
    if fields["fingerprint"] != fingerprint:
        raise FRAME.error("fingerprint", fingerprint.hex(), fields["fingerprint"].hex())
    if fields["params"] != layout.num_params:
        raise FRAME.error("params", layout.num_params, fields["params"])
    FRAME.check_crc(raw, bound(0, bind), "corrupted upload" + (", or sent for another round or client" if bind else ""))
    reader = _Fields(payload, FRAME)
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
            raise FRAME.error(f"'{name}' values", "finite numbers", "NaN or inf")
        out[name] = values.reshape(shape)
    reader.end()
    return out


class _Fields(Reader):
    """The payload's float32 and uint32 fields (a non-finite float is refused)."""

    def f32(self, field: str) -> float:
        value = _F32.unpack(self.take(4, field))[0]
        if not math.isfinite(value):
            raise self.frame.error(field, "a finite float32", value)
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


def _read_sign(reader: _Fields, name: str, size: int, scaled: bool) -> np.ndarray:
    scale = reader.f32(f"'{name}' scale") if scaled else 1.0
    bits = np.unpackbits(np.frombuffer(reader.take((size + 7) // 8, f"'{name}' signs"), dtype=np.uint8), count=size)
    return (np.where(bits.astype(bool), np.float32(1), np.float32(-1)) * np.float32(scale)).astype(np.float32)


# ---------------------------------------------------------------- QSGD


def _qsgd_levels(values: np.ndarray, levels: int, rng: np.random.Generator) -> tuple[np.float32, np.ndarray]:
    """QSGD's stochastic rounding of one tensor: its norm, and per entry a level in 0..s,
    ``floor(|v| / norm * s)`` plus one with the probability of the remainder (unbiased)."""
    norm = np.float32(np.linalg.norm(values.astype(np.float64)))
    if norm == 0 or not values.size:
        return norm, np.zeros(values.size, dtype=np.int64)
    scaled = np.abs(values.astype(np.float64)) / float(norm) * levels
    floor = np.floor(scaled)
    level = (floor + (rng.random(values.size) < scaled - floor)).astype(np.int64)
    return norm, np.minimum(level, levels)


def qsgd_quantize(update: Mapping[str, np.ndarray], layout: Layout, levels: int, rng: np.random.Generator,
                  shrink: bool = False) -> Update:
    """What a ``qsgd`` upload of ``update`` decodes to (float32 by tensor, at most ``2 * levels
    + 1`` values each), without the bytes: for a sender that codes the values another way
    (the ``ef-qsgd`` downlink, :mod:`fedmask.downlink`). Draws from ``rng`` as :func:`compress` does.

    ``shrink``: each tensor scaled by ``a = 1 / (1 + w)``, ``w = E||Q(v) - v||^2 / ||v||^2``
    the rounding's relative variance for this very ``v`` (``sum f (1 - f) / s^2`` over the
    fractional parts ``f`` of ``|v| / ||v|| * s``). ``a`` minimises ``E||a Q(v) - v||^2``
    (``Q`` unbiased: ``E||Q(v)||^2 = (1 + w) ||v||^2``), and the minimum, ``w / (1 + w)
    ||v||^2``, is below ``||v||^2``: a contraction, as error feedback needs. Unscaled,
    QSGD's variance passes ``||v||^2`` once a tensor has more than about ``s^2`` entries,
    and a residual fed back grows round after round.
    """
    out = {}
    for name, shape in layout.shapes:
        values = np.asarray(update[name], dtype=np.float32).ravel()
        norm, level = _qsgd_levels(values, levels, rng)
        if shrink and norm > 0:
            scaled = np.abs(values.astype(np.float64)) / float(norm) * levels
            fraction = scaled - np.floor(scaled)
            norm = np.float32(float(norm) / (1.0 + float((fraction * (1 - fraction)).sum()) / levels**2))
        out[name] = _dequantize(float(norm), level, values[level > 0] >= 0, levels).reshape(shape)
    return out


def _qsgd(values: np.ndarray, levels: int, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    norm, level = _qsgd_levels(values, levels, rng)
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


def _read_qsgd(reader: _Fields, name: str, size: int, levels: int) -> np.ndarray:
    norm = reader.f32(f"'{name}' norm")
    if norm < 0:
        raise FRAME.error(f"'{name}' norm", ">= 0", norm)
    counts = np.frombuffer(reader.take(4 * (levels + 1), f"'{name}' histogram"), dtype="<u4").astype(np.int64)
    if counts.sum() != size:
        raise FRAME.error(f"'{name}' histogram", f"counts summing to {size}", int(counts.sum()))
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


def _read_topk(reader: _Fields, name: str, size: int) -> np.ndarray:
    k = reader.u32(f"'{name}' k")
    if not 0 <= k <= size:
        raise FRAME.error(f"'{name}' k", f"0..{size}", k)
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
    return code_histogram(symbols, counts)


def _range_decode(data: bytes, counts: np.ndarray, size: int, name: str) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != size or (counts < 0).any():
        raise FRAME.error(f"'{name}' histogram", f"non-negative counts summing to {size}", counts.tolist())
    present = np.flatnonzero(counts)
    if present.size <= 1:
        if data:
            raise FRAME.error(f"'{name}' coded symbols", "none (a single symbol)", f"{len(data)} bytes")
        return np.full(size, present[0] if present.size else 0, dtype=np.int64)
    with decoding(FRAME, f"'{name}' coded symbols", data) as decoder:
        symbols = np.asarray(decoder.decode(categorical(counts / counts.sum()), size), dtype=np.int64)
    if np.bincount(symbols, minlength=counts.size)[: counts.size].tolist() != counts.tolist():
        raise FRAME.error(f"'{name}' coded symbols", "the histogram it was sent with", "other counts")
    return symbols
