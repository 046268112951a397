"""LaPerm's arrangements to bytes and back (format ``FMPR`` on :mod:`fedmask.wire.frame`).

An upload is every tensor's ranks: the rank of each weight inside its *row* (the incoming
weights of one output unit; a bias is one row), coded against the broadcast ranks both
ends hold: per tensor the displacements ``d = rank_client - rank_global`` range-coded
under a quantized Laplace(0, b) with ``b`` (float32) in the section header, or the ranks
bit-packed with ``ceil(log2 m)`` bits each (m the row length) when that is shorter. The
header is the mask upload's (:data:`fedmask.wire.masks.UPLOAD_FIELDS`) with the magic
``FMPR``: fingerprint of seed/model/init/layout, CRC32 over the payload and a digest of the
broadcast ranks; 11 bytes per tensor. With a rank step s > 1 the displacements are sent as
``d / s`` stochastically rounded (lossy, unbiased; about log2(s) bits per weight fewer).
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any

import constriction
import numpy as np

from fedmask.wire.frame import Frame, Layout, Reader, bound, coded_bytes, decoding, encoder
from fedmask.wire.masks import CODECS, UPLOAD_FIELDS, check_side_crc, read_upload_header

FORMAT_VERSION = 1
CODEC_PACKED, CODEC_ENTROPY = CODECS["packbits"], CODECS["entropy"]
MODEL_PACKED, MODEL_LAPLACE = 0, 1
FRAME = Frame("mask", b"FMPR", UPLOAD_FIELDS)
HEADER_BYTES = FRAME.size
_SECTION = struct.Struct("<BHfI")  # model u8 | rank step u16 | Laplace scale f32 | coded bytes u32
SECTION_BYTES = _SECTION.size
_MIN_SCALE = 0.05


def row_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, row length): a weight's output units by their inputs; a bias is one row."""
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def is_permutation(ranks: np.ndarray) -> bool:
    """Every row holds each of 0..m-1 exactly once."""
    rows = ranks.reshape(row_shape(ranks.shape))
    return bool((np.sort(rows, axis=1) == np.arange(rows.shape[1])[None, :]).all())


def _bits_for(length: int) -> int:
    return max(1, math.ceil(math.log2(length))) if length > 1 else 1


def packed_section_bytes(shape: tuple[int, ...]) -> int:
    rows, length = row_shape(shape)
    return (rows * length * _bits_for(length) + 7) // 8


def _pack(ranks: np.ndarray, length: int) -> bytes:
    width = _bits_for(length)
    planes = (ranks.reshape(-1, 1).astype(np.int64) >> np.arange(width)[None, :]) & 1
    return np.packbits(planes.astype(np.uint8).ravel()).tobytes()


def _unpack(data: bytes, size: int, length: int) -> np.ndarray:
    width = _bits_for(length)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=size * width).reshape(size, width)
    return (bits.astype(np.int64) << np.arange(width)[None, :]).sum(axis=1)


def _laplace(length: int) -> Any:
    return constriction.stream.model.QuantizedLaplace(-(length - 1), length - 1)


def laplace_scale(displacement: np.ndarray) -> float:
    """The maximum-likelihood Laplace scale (mean |d|), as the float32 the header carries."""
    return float(np.float32(max(float(np.abs(displacement).mean()) if displacement.size else 0.0, _MIN_SCALE)))


def laplace_bits(displacement: np.ndarray, scale: float) -> float:
    """Ideal code length of ``displacement`` under the quantized Laplace(0, scale)."""
    d = np.abs(displacement.astype(np.float64))
    upper = np.exp(-np.maximum(d - 0.5, 0.0) / scale)
    lower = np.exp(-(d + 0.5) / scale)
    prob = np.where(d == 0, 1.0 - np.exp(-0.5 / scale), 0.5 * (upper - lower))
    return float(-np.log2(np.maximum(prob, 1e-300)).sum())


def quantize_displacement(d: np.ndarray, step: int, rng: np.random.Generator | None) -> np.ndarray:
    """``d / step`` rounded stochastically (unbiased: ``E[step * q] = d``); exact for step 1."""
    if step == 1:
        return d.astype(np.int64)
    if rng is None:
        raise ValueError("laperm-rank-step > 1 needs a random generator for the stochastic rounding")
    return np.floor(d / step + rng.random(d.shape)).astype(np.int64)


def _encode_tensor(ranks: np.ndarray, prior: np.ndarray | None, codec: str, step: int,
                   rng: np.random.Generator | None) -> bytes:
    _, length = row_shape(ranks.shape)
    packed = _pack(ranks, length)
    if codec == "entropy" and prior is not None and length > 1:
        q = quantize_displacement((ranks.astype(np.int64) - prior.astype(np.int64)).ravel(), step, rng)
        q = q.astype(np.int32)
        scale = laplace_scale(q)
        coder = encoder()
        coder.encode(q, _laplace(_symbols(length, step)), np.zeros(q.size), np.full(q.size, scale))
        coded = coded_bytes(coder)
        if len(coded) < len(packed):
            return _SECTION.pack(MODEL_LAPLACE, step, scale, len(coded)) + coded
    return _SECTION.pack(MODEL_PACKED, 1, 0.0, len(packed)) + packed


def _symbols(length: int, step: int) -> int:
    """The Laplace model's support is [-(n-1), n-1] with n = this: every |d| <= m-1 fits."""
    return -(-(length - 1) // step) + 1


def _prior_digest(prior: dict[str, np.ndarray], layout: Layout) -> int:
    digest = 0
    for name, shape in layout.shapes:
        if name not in prior or prior[name].size != math.prod(shape):
            raise FRAME.error(f"section '{name}' side information", "the broadcast ranks", "none")
        digest = zlib.crc32(np.ascontiguousarray(prior[name], dtype="<i4").tobytes(), digest)
    return digest


def encode_ranks(ranks: dict[str, np.ndarray], layout: Layout, fingerprint: bytes, codec: str = "entropy",
                 prior: dict[str, np.ndarray] | None = None, step: int = 1,
                 rng: np.random.Generator | None = None, bind: tuple[int, int] | None = None) -> np.ndarray:
    """A client's arrangement as a uint8 upload; ``prior`` (the broadcast ranks) enables the
    displacement model, without it every tensor is bit-packed (exact ranks). With ``step``
    > 1 (``laperm-rank-step``) displacement-coded tensors carry ``d / step`` stochastically
    rounded with ``rng``: lossy, unbiased, about log2(step) bits per weight cheaper."""
    if sorted(ranks) != [name for name, _ in layout.shapes]:
        raise ValueError(f"ranks: expected tensors {[n for n, _ in layout.shapes]}, got {sorted(ranks)}")
    if codec not in CODECS:
        raise ValueError(f"uplink-codec: expected one of {', '.join(CODECS)}, got {codec!r}")
    if not 1 <= step <= 65535:
        raise ValueError(f"laperm-rank-step: expected 1..65535, got {step}")
    payload = b"".join(_encode_tensor(np.asarray(ranks[name]), None if prior is None else prior[name], codec,
                                      step, rng) for name, _ in layout.shapes)
    uses_prior = _first_laplace_section(payload, layout) is not None
    values = {"format version": FORMAT_VERSION, "codec": CODECS[codec], "reserved": 0,
              "bit count": layout.num_params, "fingerprint": fingerprint}
    return FRAME.pack(values, payload, bound(_prior_digest(prior, layout) if uses_prior and prior is not None else 0,
                                             bind))


def max_upload_bytes(layout: Layout) -> int:
    """The longest valid upload: every tensor bit-packed (the coder never sends more)."""
    return HEADER_BYTES + sum(SECTION_BYTES + packed_section_bytes(shape) for _, shape in layout.shapes)


def _first_laplace_section(payload: bytes, layout: Layout) -> str | None:
    offset = 0
    for name, _ in layout.shapes:
        if offset + SECTION_BYTES > len(payload):
            return None
        model, _, _, length = _SECTION.unpack_from(payload, offset)
        if model == MODEL_LAPLACE:
            return name
        offset += SECTION_BYTES + length
    return None


def decode_ranks(blob: object, layout: Layout, fingerprint: bytes, prior: dict[str, np.ndarray] | None = None,
                 step: int = 1, bind: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """The ranks in ``blob``, or :class:`~fedmask.wire.frame.WireError` naming the first field that is wrong.

    Refused: anything but a 1-D uint8 array, a wrong magic/format/codec/reserved field, bit
    count or fingerprint, a length past :func:`max_upload_bytes`, a CRC mismatch (a
    truncated or altered payload, or one coded against another broadcast), a bad section
    (a rank step other than ``step``), and exact ranks that are not a permutation of every
    row. With ``step`` > 1, displacement-coded tensors decode to approximate ranks
    ``prior + step * q`` (not a permutation; what the Borda count sums), checked to lie
    within ``[-step, m - 1 + step]``.
    """
    _, raw = read_upload_header(FRAME, blob, layout, fingerprint, (FORMAT_VERSION,))
    longest = max_upload_bytes(layout)
    if len(raw) > longest:
        raise FRAME.error("length", f"at most {longest} bytes (every tensor bit-packed)", f"{len(raw)} bytes")
    payload = raw[HEADER_BYTES:]
    side = _first_laplace_section(payload, layout)
    check_side_crc(FRAME, raw, side, None if prior is None or side is None else _prior_digest(prior, layout),
                   "the broadcast ranks", bind)
    out, reader = {}, Reader(payload, FRAME)
    for name, shape in layout.shapes:
        model, got_step, scale, nbytes = reader.unpack(_SECTION, f"section '{name}'")
        if nbytes > reader.left:
            raise FRAME.error(f"section '{name}' length", f"<= {reader.left} bytes", nbytes)
        data = reader.take(nbytes, f"section '{name}'")
        out[name] = _decode_tensor(name, shape, model, got_step, scale, data, prior, step)
    reader.end()
    return out


def _decode_tensor(name: str, shape: tuple[int, ...], model: int, got_step: int, scale: float, data: bytes,
                   prior: dict[str, np.ndarray] | None, step: int) -> np.ndarray:
    """One section's ranks, checked: a permutation of every row, or (a rank step) within bounds."""
    size, (_, length) = math.prod(shape), row_shape(shape)
    if model == MODEL_PACKED:
        if len(data) != packed_section_bytes(shape):
            raise FRAME.error(f"section '{name}' length", packed_section_bytes(shape), len(data))
        if got_step != 1:
            raise FRAME.error(f"section '{name}' rank step", "1 (packed ranks are exact)", got_step)
        ranks = _unpack(data, size, length).reshape(shape)
    elif model == MODEL_LAPLACE:
        if got_step != step:
            raise FRAME.error(f"section '{name}' rank step", f"{step} (laperm-rank-step)", got_step)
        if prior is None or not (math.isfinite(scale) and scale >= _MIN_SCALE):
            raise FRAME.error(f"section '{name}' Laplace scale", f">= {_MIN_SCALE}, finite", scale)
        with decoding(FRAME, f"section '{name}' stream", data) as decoder:
            q = decoder.decode(_laplace(_symbols(length, step)), np.zeros(size), np.full(size, scale))
        ranks = (np.asarray(prior[name], dtype=np.int64).ravel() + step * q.astype(np.int64)).reshape(shape)
        if step > 1:
            if ranks.size and (int(ranks.min()) < -step or int(ranks.max()) > length - 1 + step):
                raise FRAME.error(f"section '{name}' ranks", f"within [-{step}, {length - 1 + step}]",
                                  f"[{int(ranks.min())}, {int(ranks.max())}]")
            return ranks
    else:
        raise FRAME.error(f"section '{name}' model", "0 (packed) or 1 (Laplace)", model)
    if not is_permutation(ranks):
        raise FRAME.error(f"section '{name}' ranks", f"a permutation of 0..{length - 1} in every row",
                          "repeated or out-of-range ranks")
    return ranks


def code_lengths(ranks: dict[str, np.ndarray], layout: Layout, codec: str,
                 prior: dict[str, np.ndarray] | None, step: int = 1) -> dict[str, float]:
    """Ideal bits under the chosen models, and ``sum log2(m!)`` over rows: the cost of naming
    each row's permutation with no side information (the 'formula' figure for LaPerm).
    ``ranks`` are the decoded ones (with a rank step, ``prior + step * q``)."""
    ideal, formula = 0.0, 0.0
    for name, shape in layout.shapes:
        rows, length = row_shape(shape)
        packed = 8.0 * packed_section_bytes(shape)
        formula += rows * math.lgamma(length + 1) / math.log(2)
        if codec == "entropy" and prior is not None and length > 1:
            d = np.asarray(ranks[name], dtype=np.int64).ravel() - np.asarray(prior[name], dtype=np.int64).ravel()
            q = d // step if step > 1 and not is_permutation(np.asarray(ranks[name])) else d
            ideal += min(packed, laplace_bits(q, laplace_scale(q)))
        else:
            ideal += packed
    return {"ideal_bits": ideal, "formula_bits": formula}
