"""Binary masks to bytes and back (format ``FMSK`` on :mod:`fedmask.wire.frame`).

Wire format (little-endian): a 28-byte header, then the payload::

    magic "FMSK" | format u8 | codec u8 | reserved u16 | bit count u64 | fingerprint 8s | crc32 u32

- codec 1, ``packbits``: the payload is every tensor's mask, in layout order, bit-packed:
  exactly one bit per parameter.
- codec 2, ``entropy``: per tensor, a 9-byte section header ``model u8 | param u32 |
  coded bytes u32`` and the coded bits. The encoder picks, per tensor, the model with the
  shortest ideal code length and codes with constriction's range coder:
  ``packed`` (plain bits, the fallback), ``side`` (each bit coded with the probability
  both ends already hold from the last broadcast: FedPM's theta, or edge-popup's global
  top-k mask with a flip rate ``param / 2**32``), ``frequency`` (one probability per
  tensor, ``param`` ones out of n: the model behind FedPM's ``H(f) + log2(N)/N``) or
  ``grouped`` (one probability per context the broadcast gives a weight, its count of
  ones sent: below).
  A ``side`` section is coded group by group when the broadcast tensor takes at most
  ``SIDE_GROUPS_MAX`` distinct values (FedPM's theta with the prior reset takes one per
  vote count; a top-k mask two): the bits of the weights that share a value, in weight
  order, one fixed probability per group, groups in increasing order of the value.
  Otherwise bit by bit. Format 3 codes a run of bits that share one probability p eight
  at a time: each whole byte of ``np.packbits`` (first bit most significant) is one symbol
  whose probability is the product of its bits' (p or 1 - p, multiplied in that order, so
  every machine builds the same table). A ``frequency`` section is one run: its whole
  bytes, then its last ``size % 8`` bits one by one. A ``side`` section with groups codes
  the whole bytes of each group of at least ``RUN_BYTES_MIN`` bytes, group by group, then
  every other bit (the small groups, the last ``count % 8`` bits of the others) in one
  call, bit by bit with its group's probability, in the grouped order. The same
  probabilities as bit by bit, so the same length to within the coder's quantisation
  (under 10^-4 bits a byte), but an eighth of the coder's steps: format 2 coded every bit.
  Format 4 adds ``grouped`` (model 3): the bits grouped by the side information's
  *contexts*, a small integer per weight that both ends derive from the broadcast (a
  :class:`ContextPrior`; edge-popup's ``vote-levels``: the weight's level and whether it
  is in the global top-k), groups in increasing order of the context, weight order within;
  ``param`` is the number of groups. The stream first codes each group's count of ones k,
  uniform over 0..n (n the group's size; a group of at least 2**16 weights codes
  ``k >> 16`` uniform over ``0..n >> 16``, then ``k & 0xFFFF`` uniform over 0..65535),
  then the bits of every group with 0 < k < n, laid out as a side section's with the
  group's probability k / n; a group with k = 0 or k = n is known from its count and not
  coded. Its length is about the sum over groups of ``n H(k/n) + log2(n + 1)``. Contexts
  with more than ``SIDE_GROUPS_MAX`` distinct values offer no grouped model.
  An upload must be format 4; formats 2 and 3 are still decoded from a checkpoint's
  recycling log written by an earlier version (``decode_masks(..., formats=READABLE_FORMATS)``).

The fingerprint hashes the seed, model, init and tensor layout: a mask trained for another
network has the right length often enough that length alone cannot catch it. The CRC32
covers the whole payload, so a flipped bit, in the coded stream or in a section header,
is refused before any decoding. When a section was coded against the broadcast state,
the CRC also covers a digest of that state: decoding against any other state (a server
and client that disagree on what was broadcast) is refused instead of yielding a wrong
mask. The CRC is seeded with a CRC32 of what the sections used: the prior's float64
values in layout order when a section is ``side``, continued over the contexts as
little-endian int32 in layout order when a section is ``grouped``.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import constriction
import numpy as np

from fedmask.wire import relative
from fedmask.wire.frame import (
    Frame,
    Layout,
    Reader,
    bernoulli,
    blob_bytes,
    bound,
    categorical,
    coded_bytes,
    decoding,
    encoder,
)

# 2: side sections coded per group of equal prior values; 3: and eight bits a symbol; 4: the grouped model
FORMAT_VERSION = 4
# Decoded too: formats 2 and 3, in which earlier versions wrote checkpoints (the recycling log holds uploads)
READABLE_FORMATS = (2, 3, 4)
CODEC_PACKBITS = 1
CODEC_ENTROPY = 2
CODEC_RELATIVE = 3  # the sample's index among shared candidates (fedmask.wire.relative)
CODECS = {"packbits": CODEC_PACKBITS, "entropy": CODEC_ENTROPY, "relative-entropy": CODEC_RELATIVE}
BINARY_CODECS = ("packbits", "entropy")  # the codecs of a given mask (relative-entropy codes probabilities)
MODEL_PACKED, MODEL_SIDE, MODEL_FREQUENCY, MODEL_GROUPED = 0, 1, 2, 3
MODEL_NAMES = {MODEL_PACKED: "packed", MODEL_SIDE: "side", MODEL_FREQUENCY: "frequency", MODEL_GROUPED: "grouped"}
_SECTION = struct.Struct("<BII")
SIDE_GROUPS_MAX = 4096  # more distinct prior values: the side model codes bit by bit
RUN_BYTES_MIN = 32  # a smaller group is coded bit by bit: a coder call costs about what 150 bits do
SECTION_BYTES = _SECTION.size
# An entropy-coded section must beat the packed bits by this much to be chosen: the range
# coder ends on a whole 32-bit word and may need one more.
_CODER_SLACK_BYTES = 8
# The upload header (masks here, LaPerm's ranks with their own magic): its fields after the magic.
UPLOAD_FIELDS = (("format version", "B"), ("codec", "B"), ("reserved", "H"), ("bit count", "Q"),
                 ("fingerprint", "8s"), ("crc32", "I"))
FRAME = Frame("mask", b"FMSK", UPLOAD_FIELDS)
HEADER_BYTES = FRAME.size


def read_upload_header(frame: Frame, blob: object, layout: Layout, fingerprint: bytes, versions: tuple[int, ...],
                       codecs: tuple[str, ...] = BINARY_CODECS) -> tuple[dict[str, Any], bytes]:
    """The header's fields and the whole upload's bytes, after checking everything in the
    header: a 1-D uint8 array at least a header long, the magic, a format version of
    ``versions``, one of ``codecs``, a zero reserved field, the layout's count and the
    fingerprint. Shared by every upload in this header (masks here, LaPerm's ranks)."""
    raw = blob_bytes(blob, frame)
    fields, _ = frame.read(raw)
    if fields["magic"] != frame.magic:
        raise frame.error("magic", frame.magic, fields["magic"])
    if fields["format version"] not in versions:
        raise frame.error("format version", " or ".join(map(str, versions)), fields["format version"])
    if fields["codec"] not in [CODECS[name] for name in codecs]:
        raise frame.error("codec", " or ".join(f"{CODECS[name]} ({name})" for name in codecs), fields["codec"])
    if fields["reserved"] != 0:
        raise frame.error("reserved", 0, fields["reserved"])
    if fields["bit count"] != layout.num_params:
        raise frame.error("bit count", layout.num_params, fields["bit count"])
    if fields["fingerprint"] != fingerprint:
        raise frame.error("fingerprint", f"{fingerprint.hex()} (this seed, model, init)",
                          f"{fields['fingerprint'].hex()} (another model)")
    return fields, raw


def check_side_crc(frame: Frame, raw: bytes, side: str | None, digest: int | None, broadcast: str,
                   bind: tuple[int, int] | None = None) -> None:
    """The payload's CRC32, seeded with the side information's ``digest`` when a section
    (``side``, the first one) was coded against the broadcast, and bound to the upload's
    (round, client): so a payload decoded against another broadcast than it was coded for,
    or taken for another round's or client's, is refused. ``broadcast`` names what it is."""
    if side is not None and digest is None:
        raise frame.error(f"section '{side}' side information", broadcast, "none")
    seed = digest if side is not None and digest is not None else 0
    why = "corrupted payload" + (", or coded against another broadcast" if seed else "") + \
        (", or sent for another round or client" if bind is not None else "")
    frame.check_crc(raw, bound(seed, bind), why)


Prior = dict[str, np.ndarray]


class ContextPrior(dict[str, np.ndarray]):
    """A prior (P(bit = 1) per weight) that also carries ``contexts``: per tensor, a small
    non-negative integer per weight that both ends derive from the broadcast, whose
    distinct values group the bits of the ``grouped`` model (edge-popup's ``vote-levels``:
    the weight's level and whether it is in the global top-k, :meth:`TopK.prior`). The
    ``side`` model sees the probabilities alone, as with a plain prior."""

    def __init__(self, probabilities: Mapping[str, np.ndarray], contexts: Mapping[str, np.ndarray]):
        super().__init__(probabilities)
        self.contexts = dict(contexts)


def encode_masks(
    masks: dict[str, np.ndarray],
    layout: Layout,
    fingerprint: bytes,
    codec: str = "packbits",
    prior: Prior | None = None,
    bind: tuple[int, int] | None = None,
) -> np.ndarray:
    """The masks as a uint8 upload; ``prior`` (P(bit = 1) per weight, from the broadcast)
    enables the side model; ``bind`` (round, client) ties the upload to them."""
    if sorted(masks) != layout.names:
        raise ValueError(f"masks: expected tensors {layout.names}, got {sorted(masks)}")
    if codec not in BINARY_CODECS:
        raise ValueError(f"uplink-codec: expected one of {', '.join(BINARY_CODECS)} for a mask, got {codec!r}")
    bits = [np.asarray(masks[name], dtype=bool).ravel() for name in layout.names]
    if codec == "packbits":
        payload = np.packbits(np.concatenate(bits)).tobytes()
    else:
        payload = b"".join(_encode_section(b, None if prior is None else _tables(prior, name))
                           for b, name in zip(bits, layout.names))
    used = _side_sections(payload, layout, FORMAT_VERSION)[1] if codec == "entropy" else frozenset()
    values = {"format version": FORMAT_VERSION, "codec": CODECS[codec], "reserved": 0,
              "bit count": layout.num_params, "fingerprint": fingerprint}
    return FRAME.pack(values, payload, bound(_side_digest(prior, layout, used) if used else 0, bind))


def encode_relative(q: dict[str, np.ndarray], layout: Layout, fingerprint: bytes, prior: Prior,
                    bind: tuple[int, int], block_bits: int = 8, extra_bits: int = 0, debias: bool = True,
                    private_seed: int = 0) -> np.ndarray:
    """Probabilities ``q`` as a relative-entropy upload (codec 3, :mod:`fedmask.wire.relative`):
    the index of a sample among candidates drawn from ``prior`` (theta) that both ends
    regenerate from the run's fingerprint and ``bind`` (round, client)."""
    if sorted(q) != layout.names:
        raise ValueError(f"probabilities: expected tensors {layout.names}, got {sorted(q)}")
    flat_q = np.concatenate([np.asarray(q[name], np.float64).ravel() for name in layout.names])
    if not (np.isfinite(flat_q).all() and (flat_q >= 0).all() and (flat_q <= 1).all()):
        raise ValueError("probabilities: expected finite values in [0, 1]")
    payload, _, seed = relative.encode(flat_q, _flat_prior(prior, layout), _words(fingerprint, bind), block_bits,
                                       extra_bits, debias, private_seed)
    values = {"format version": FORMAT_VERSION, "codec": CODEC_RELATIVE, "reserved": 0,
              "bit count": layout.num_params, "fingerprint": fingerprint}
    return FRAME.pack(values, payload, seed)


def _words(fingerprint: bytes, bind: tuple[int, int]) -> np.ndarray:
    return relative.key_words((fingerprint, int(bind[0]), int(bind[1])))


def _flat_prior(prior: Prior, layout: Layout) -> np.ndarray:
    """theta in layout order, flat (float64); the frame's error when it does not fit the layout."""
    for name, shape in layout.shapes:
        if name not in prior or np.size(prior[name]) != math.prod(shape):
            raise FRAME.error(f"side information '{name}'", f"{math.prod(shape)} values (the broadcast theta)",
                              "none" if name not in prior else np.size(prior[name]))
    return np.concatenate([np.asarray(prior[name], np.float64).ravel() for name in layout.names]) \
        if layout.shapes else np.zeros(0)


def _decode_relative(raw: bytes, layout: Layout, prior: Prior | None,
                     bind: tuple[int, int] | None) -> dict[str, np.ndarray]:
    if prior is None or bind is None:
        raise FRAME.error("relative-entropy upload", "the broadcast theta, the round and the client to decode it",
                          "none")
    theta = _flat_prior(prior, layout)
    coder, indices = relative.read(raw[HEADER_BYTES:], theta, _words(raw[FRAME.slice("fingerprint")], bind), FRAME)
    FRAME.check_crc(raw, coder.crc_seed(), "corrupted payload, or coded against another broadcast, round or client")
    sample, out, start = relative.sample_of(coder, indices), {}, 0
    for name, shape in layout.shapes:
        size = math.prod(shape)
        out[name] = sample[start : start + size].reshape(shape)
        start += size
    return out


def decode_masks(
    blob: object, layout: Layout, fingerprint: bytes, prior: Prior | None = None,
    lengths: dict[str, float] | None = None, formats: tuple[int, ...] = (FORMAT_VERSION,),
    bind: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """The masks in ``blob``, or :class:`WireError` naming the first thing wrong.

    With a ``lengths`` dict, also what :func:`code_lengths` reports for the upload
    (``ideal_bits`` under the models the sections name, ``formula_bits``), measured in the
    same pass instead of a second one over the decoded masks.

    ``formats``: the format versions accepted. An upload must be in this version's format:
    the CRC does not cover the header, and one flipped bit turns version 3 into 2, whose
    payload would decode to other bits. Only what a server wrote itself earlier (the
    recycling log of an older checkpoint, checked by its digests) is read with
    :data:`READABLE_FORMATS`.
    """
    fields, raw = read_upload_header(FRAME, blob, layout, fingerprint, formats, tuple(CODECS))
    if fields["codec"] == CODEC_RELATIVE:
        out = _decode_relative(raw, layout, prior, bind)
        if lengths is not None:  # what was coded: the index stream (the KL it stands for is the client's)
            ones = sum(int(np.count_nonzero(m)) for m in out.values())
            lengths.update({"ideal_bits": 8.0 * (len(raw) - HEADER_BYTES),
                            "formula_bits": _formula_bits(ones, layout.num_params)})
        return out
    num_bits = layout.num_params
    packed_len = HEADER_BYTES + (num_bits + 7) // 8
    longest = packed_len + SECTION_BYTES * len(layout.shapes) + 64
    if fields["codec"] == CODEC_PACKBITS and len(raw) != packed_len:
        raise FRAME.error("length", f"{packed_len} bytes", f"{len(raw)} bytes")
    if fields["codec"] == CODEC_ENTROPY and len(raw) > longest:
        raise FRAME.error("length", f"at most {longest} bytes (never more than packed bits)", f"{len(raw)} bytes")
    payload = raw[HEADER_BYTES:]
    version = fields["format version"]
    side, used = _side_sections(payload, layout, version) if fields["codec"] == CODEC_ENTROPY else (None, frozenset())
    check_side_crc(FRAME, raw, side, None if prior is None or side is None else _side_digest(prior, layout, used),
                   "the last broadcast state", bind)
    sections: list[tuple[str, int, int]] = []
    if fields["codec"] == CODEC_PACKBITS:
        bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8), count=num_bits).astype(bool)
        out, start = {}, 0
        for name, shape in layout.shapes:
            size = math.prod(shape)
            out[name] = bits[start : start + size].reshape(shape)
            start += size
    else:
        out = _decode_sections(payload, layout, prior, sections, version)
    if lengths is not None:
        lengths.update(_measured_lengths(out, layout, prior, sections))
    return out


def _measured_lengths(masks: dict[str, np.ndarray], layout: Layout, prior: Prior | None,
                      sections: list[tuple[str, int, int]]) -> dict[str, float]:
    """Ideal bits of decoded masks under the models their sections were coded with."""
    ones = {name: int(np.count_nonzero(masks[name])) for name in layout.names}
    if not sections:  # packed bits: one bit per parameter
        ideal = float(layout.num_params)
    else:
        ideal = 0.0
        for name, model, param in sections:
            size = masks[name].size
            if model == MODEL_PACKED:
                ideal += 8.0 * ((size + 7) // 8)
            elif model == MODEL_FREQUENCY:
                ideal += _frequency_bits(ones[name], size)
            elif model == MODEL_GROUPED:
                assert prior is not None  # a grouped section decodes only with contexts
                ideal += _grouped_bits(masks[name].ravel(), _tables(prior, name))
            else:
                assert prior is not None  # a side section decodes only with a prior
                ideal += _side_bits(masks[name].ravel(), _tables(prior, name), param)
    return {"ideal_bits": ideal, "formula_bits": _formula_bits(sum(ones.values()), layout.num_params)}


def _formula_bits(ones: int, n: int) -> float:
    """FedPM's ``n * H(f) + log2(n)``, ``f`` the fraction of ones."""
    f = ones / n
    entropy = 0.0 if f in (0.0, 1.0) else -(f * math.log2(f) + (1 - f) * math.log2(1 - f))
    return n * entropy + math.log2(n)


def _side_models(version: int) -> tuple[int, ...]:
    """The models that code against the broadcast in this format version."""
    return (MODEL_SIDE, MODEL_GROUPED) if version >= 4 else (MODEL_SIDE,)


def _side_sections(payload: bytes, layout: Layout, version: int) -> tuple[str | None, frozenset[int]]:
    """The first tensor whose section header (read within bounds, before the CRC check)
    says it was coded against the broadcast state, and every such model the headers name."""
    offset, first, used, side_models = 0, None, set(), _side_models(version)
    for name, _ in layout.shapes:
        if offset + SECTION_BYTES > len(payload):
            break
        model, _, length = _SECTION.unpack_from(payload, offset)
        if model in side_models:
            first = first or name
            used.add(model)
        offset += SECTION_BYTES + length
    return first, frozenset(used)


def _side_digest(prior: Prior | None, layout: Layout, used: frozenset[int]) -> int:
    """CRC32 of the side information the ``used`` models decode with, in layout order: the
    prior's float64 values (a side section), then the contexts as little-endian int32 (a
    grouped section; a prior without them adds nothing, so that a bit flipped into a
    grouped section header is refused by the CRC like any other).

    A round codes every client's mask against one prior: the digest is computed once per
    prior and set of models (the cache holds the prior object, so its id stays valid; see
    :func:`_tables`).
    """
    if prior is None:
        return 0
    entry = _prior_entry(prior)
    key = (layout.shapes, used)
    if key not in entry.digests:
        digest = 0
        for model, part in ((MODEL_SIDE, "values"), (MODEL_GROUPED, "contexts")):
            if model not in used:
                continue
            for name, shape in layout.shapes:
                if name not in prior:
                    raise FRAME.error(f"section '{name}' side information", "the last broadcast state", "none")
                tables = _tables(prior, name)
                data = tables.values if part == "values" else tables.contexts
                if data is None:  # no contexts: the CRC fails, as for any payload coded against others
                    continue
                if data.size != math.prod(shape):
                    raise FRAME.error(f"side information '{name}'", f"{math.prod(shape)} values", data.size)
                digest = zlib.crc32(data.tobytes(), digest)
        entry.digests[key] = digest
    return entry.digests[key]


def _contexts_of(tables: _SideTables, name: str) -> np.ndarray:
    """The tensor's contexts (int32), or the frame's error: a grouped section needs them."""
    if tables.contexts is None:
        raise FRAME.error(f"section '{name}' side information", "the broadcast's contexts (a grouped section)",
                          "none")
    return tables.contexts


@dataclass(frozen=True)
class _Groups:
    """The weights of a prior tensor grouped by value: ``order`` lists the weights group by
    group (each group in weight order), ``counts`` the group sizes, ``values`` the distinct
    prior values, increasing."""

    order: np.ndarray
    counts: np.ndarray
    values: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray) -> _Groups | None:
        distinct, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
        if distinct.size > SIDE_GROUPS_MAX:
            return None
        # a stable sort of uint16 keys (SIDE_GROUPS_MAX < 2**16) is a radix sort: the same order, about 10x faster
        return cls(np.argsort(inverse.astype(np.uint16).ravel(), kind="stable"), counts, distinct)

    @cached_property
    def starts(self) -> np.ndarray:
        """Where each group begins in ``order``."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.intp)

    def ones(self, bits: np.ndarray) -> np.ndarray:
        """The count of ones of ``bits`` in each group (a sum over the grouped order: 20x a
        bincount of the ones' groups)."""
        return np.add.reduceat(bits[self.order].view(np.uint8), self.starts, dtype=np.int64)


@dataclass
class _SideTables:
    """What the side model needs of one prior tensor, computed once per broadcast.

    ``values`` are the prior's float64 values, flat; ``hard`` marks entries that are 0 or 1
    (the flip rate is estimated on them); for a flip rate of 0 (no hard entry) the coder's
    probabilities ``q0`` and the code length's terms are fixed, so a mask's ideal length is
    one dot product: ``base - bits . gain``.
    """

    values: np.ndarray
    hard: np.ndarray
    hard_count: int
    all_hard: bool
    hard_ones: np.ndarray  # values == 1 on the hard entries (the bit the prior predicts)
    groups: _Groups | None = None  # None: more than SIDE_GROUPS_MAX distinct values
    q0: np.ndarray | None = None
    base: float = 0.0
    gain: np.ndarray | None = None
    run_layout: _RunLayout | None = None  # where the groups' bits go, built once
    run_plan: _RunPlan | None = None  # with flip 0's probabilities, built once
    contexts: np.ndarray | None = None  # the grouped model's contexts (int32), when the prior has them
    context_groups: _Groups | None = None  # None: no contexts, or more than SIDE_GROUPS_MAX distinct ones
    context_layout: _RunLayout | None = None  # where the context groups' bits go, built once


@dataclass
class _PriorEntry:
    prior: Prior  # held so that the id the cache is keyed by stays this object's
    tensors: dict[str, _SideTables]
    digests: dict[tuple, int]


_PRIOR_CACHE: dict[int, _PriorEntry] = {}
_PRIOR_CACHE_KEPT = 2  # the current broadcast's prior, and the one before it


def _prior_entry(prior: Prior) -> _PriorEntry:
    entry = _PRIOR_CACHE.get(id(prior))
    if entry is None or entry.prior is not prior:
        while len(_PRIOR_CACHE) >= _PRIOR_CACHE_KEPT:
            del _PRIOR_CACHE[next(iter(_PRIOR_CACHE))]
        entry = _PRIOR_CACHE[id(prior)] = _PriorEntry(prior, {}, {})
    return entry


def _tables(prior: Prior, name: str) -> _SideTables:
    """The side tables of ``prior[name]`` (a prior is a dict built once per broadcast and
    never changed afterwards; a new dict is a new prior)."""
    entry = _prior_entry(prior)
    tables = entry.tensors.get(name)
    if tables is None:
        values = np.ascontiguousarray(prior[name], dtype=np.float64).ravel()
        hard = (values == 0.0) | (values == 1.0)
        hard_count = int(hard.sum())
        tables = _SideTables(values, hard, hard_count, hard_count == values.size, values[hard] == 1.0,
                             _Groups.of(values))
        contexts = prior.contexts.get(name) if isinstance(prior, ContextPrior) else None
        if contexts is not None:
            tables.contexts = np.ascontiguousarray(contexts, dtype="<i4").ravel()
            if tables.contexts.size == values.size:  # otherwise no grouped model (and decoding one is refused)
                tables.context_groups = _Groups.of(tables.contexts)
                if tables.context_groups is not None:
                    tables.context_layout = _RunLayout.of(tables.context_groups)
        if hard_count == 0:
            q0 = _side_probs(values, 0)
            log_one, log_zero = np.log2(q0), np.log2(1.0 - q0)
            tables.q0, tables.base, tables.gain = q0, float(-log_zero.sum()), log_one - log_zero
        entry.tensors[name] = tables
    return tables


def _entropy_bits(bits: np.ndarray, probs: np.ndarray | float) -> float:
    """Ideal code length, sum of -log2 p(bit)."""
    p_bit = np.where(bits, probs, 1.0 - np.asarray(probs, dtype=np.float64))
    return float(-np.log2(np.maximum(p_bit, 1e-300)).sum())


def _side_probs(prior: np.ndarray, flip_param: int) -> np.ndarray:
    flip = flip_param / 2.0**32
    return np.clip(prior * (1.0 - 2.0 * flip) + flip, 1e-9, 1.0 - 1e-9)


def _flip_param(bits: np.ndarray, prior: np.ndarray | _SideTables) -> int:
    """Flip rate for the entries where the prior is certain (0 or 1); 0 when none is."""
    tables = prior if isinstance(prior, _SideTables) else _SideTables(
        prior, hard := (prior == 0.0) | (prior == 1.0), int(hard.sum()), False, prior[hard] == 1.0)
    if not tables.hard_count:
        return 0
    hard_bits = bits if tables.all_hard else bits[tables.hard]
    flips = int(np.count_nonzero(hard_bits != tables.hard_ones))
    return int(min(max(round((flips + 0.5) / (tables.hard_count + 1.0) * 2**32), 1), 2**31))


def _frequency_probs(ones: int, size: int) -> float:
    return min(max(ones / size, 1e-9), 1.0 - 1e-9)


def _frequency_bits(ones: int, size: int) -> float:
    """Ideal length of ``size`` bits with ``ones`` ones under one probability: closed form."""
    p = _frequency_probs(ones, size)
    return -(ones * math.log2(p) + (size - ones) * math.log2(1.0 - p))


def _side_bits(bits: np.ndarray, tables: _SideTables, param: int) -> float:
    """Ideal length of ``bits`` under the side model with flip ``param``, in one pass.

    Flip 0 (a soft prior, FedPM's theta): a dot product with the per-broadcast table. An
    all-hard prior (edge-popup's global top-k): two probabilities, so a closed form from
    the count of bits that agree with it. Otherwise the sum over every entry.
    """
    if param == 0 and tables.gain is not None:
        return tables.base - float(tables.gain @ bits.astype(np.float64))  # a dot product: 9x a masked sum
    if tables.all_hard:
        flip = param / 2.0**32
        agree_p = min(max(1.0 - flip, 1e-9), 1.0 - 1e-9)
        flip_p = min(max(flip, 1e-9), 1.0 - 1e-9)
        flips = int(np.count_nonzero(bits != tables.hard_ones))
        return -((bits.size - flips) * math.log2(agree_p) + flips * math.log2(flip_p))
    return _entropy_bits(bits, _side_probs(tables.values, param))


def section_candidates(bits: np.ndarray, prior: np.ndarray | None, tables: _SideTables | None = None,
                       contexts: np.ndarray | None = None) -> list[tuple[int, int, float]]:
    """(model, param, ideal bits) of every model that can code this tensor (``contexts``
    with ``prior``: the grouped model's, as a :class:`ContextPrior` carries them).

    The lengths are closed forms or one vectorised pass (:func:`_side_bits`), not trial
    codings; they equal the sums of ``-log2 p(bit)`` up to floating-point summation order.
    """
    bits = np.asarray(bits, dtype=bool).ravel()
    candidates = [(MODEL_PACKED, 0, 8.0 * ((bits.size + 7) // 8))]
    ones = int(np.count_nonzero(bits))
    candidates.append((MODEL_FREQUENCY, ones, _frequency_bits(ones, bits.size)))
    if prior is not None or tables is not None:
        if tables is None:
            assert prior is not None
            values = np.ascontiguousarray(prior, dtype=np.float64).ravel()
            tables = _tables({"t": values} if contexts is None else ContextPrior({"t": values}, {"t": contexts}), "t")
        param = _flip_param(bits, tables)
        candidates.append((MODEL_SIDE, param, _side_bits(bits, tables, param)))
        if tables.context_groups is not None:
            candidates.append((MODEL_GROUPED, tables.context_groups.counts.size, _grouped_bits(bits, tables)))
    return candidates


def _choose(candidates: list[tuple[int, int, float]]) -> tuple[int, int, float]:
    packed = candidates[0]
    best = min(candidates[1:], key=lambda c: c[2])
    return best if best[2] / 8.0 + _CODER_SLACK_BYTES < packed[2] / 8.0 else packed


def _encode_section(bits: np.ndarray, tables: _SideTables | None) -> bytes:
    model, param, _ = _choose(section_candidates(bits, None, tables))
    if model == MODEL_PACKED:
        data = np.packbits(bits).tobytes()
    else:
        coder = encoder()
        if model == MODEL_FREQUENCY:
            _encode_run(coder, bits, _frequency_probs(param, bits.size))
        elif model == MODEL_GROUPED:
            assert tables is not None  # the grouped model is chosen only when there are contexts
            _grouped_encode(coder, bits, tables)
        else:
            assert tables is not None  # the side model is chosen only when there is a prior
            _side_encode(coder, bits, tables, param)
        data = coded_bytes(coder)
    return _SECTION.pack(model, param, len(data)) + data


_BYTE_BITS = [(np.arange(256) >> (7 - k)) & 1 == 1 for k in range(8)]  # bit k of each byte, most significant first


def _byte_model(prob: float) -> Any:
    """Eight bits that are each 1 with probability ``prob``, as one symbol: the byte's
    probability is the product of its bits', multiplied most significant bit first."""
    return _byte_models(np.array([prob]))[0]


def _byte_models(probs: np.ndarray) -> list[Any]:
    """:func:`_byte_model` of each probability; the tables of all at once (the same
    products, in the same order)."""
    probs = np.asarray(probs, dtype=np.float64)[:, None]
    tables = np.ones((probs.shape[0], 256))
    for bit in _BYTE_BITS:
        tables = tables * np.where(bit, probs, 1.0 - probs)
    return [categorical(table) for table in tables]


def _encode_run(encoder: Any, bits: np.ndarray, prob: float) -> None:
    """Bits that are each 1 with probability ``prob``: whole bytes as symbols, then the last
    ``size % 8`` one by one."""
    whole = bits.size - bits.size % 8
    if whole:
        encoder.encode(np.packbits(bits[:whole]).astype(np.int32), _byte_model(prob))
    if whole < bits.size:
        encoder.encode(bits[whole:].astype(np.int32), bernoulli(prob))


def _decode_run(decoder: Any, size: int, prob: float,
                bytewise: bool = True) -> np.ndarray:
    """Inverse of :func:`_encode_run`: ``size`` bits, as bool (``bytewise`` False: format 2,
    every bit its own symbol)."""
    bit_model = bernoulli(prob)
    whole = size - size % 8 if bytewise else 0
    pieces = [np.unpackbits(decoder.decode(_byte_model(prob), whole // 8).astype(np.uint8)).astype(bool)] \
        if whole else []
    if whole < size:
        pieces.append(decoder.decode(bit_model, size - whole).astype(bool))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=bool)


@dataclass(frozen=True)
class _RunLayout:
    """Where a side section's bits go, whatever their probabilities: each group of at least
    ``RUN_BYTES_MIN`` bytes codes its whole bytes as symbols, group by group (group
    ``run_groups[i]``, ``run_bytes[i]`` bytes); every other bit (small groups whole, the
    last ``count % 8`` of the others) follows, bit by bit, in the grouped order (its group:
    ``tail_groups``). ``order`` lists the weights in the order their bits are coded."""

    order: np.ndarray
    run_groups: list[int]
    run_bytes: list[int]
    tail_groups: np.ndarray

    @classmethod
    def of(cls, groups: _Groups) -> _RunLayout:
        runs, tail, tail_groups, run_groups, run_bytes, start = [], [], [], [], [], 0
        for group, count in enumerate(groups.counts.tolist()):
            whole = count - count % 8 if count >= 8 * RUN_BYTES_MIN else 0
            if whole:
                runs.append(groups.order[start : start + whole])
                run_groups.append(group)
                run_bytes.append(whole // 8)
            tail.append(groups.order[start + whole : start + count])
            tail_groups.append(np.full(count - whole, group, dtype=np.int32))
            start += count
        # intp, not int32: numpy converts any other index to intp on every gather (2-3x slower)
        return cls(np.concatenate(runs + tail), run_groups, run_bytes, np.concatenate(tail_groups))

    @property
    def run_bits(self) -> int:
        return 8 * sum(self.run_bytes)


@dataclass(frozen=True)
class _RunPlan:
    """A layout with one probability per group: a byte model per run, and each tail bit's
    probability. A group whose probability is exactly 0 or 1 (a grouped section's group
    of all zeros or all ones) is known and not coded: its runs have no model, and
    ``tail_coded`` marks the tail bits that are coded (None: all)."""

    layout: _RunLayout
    probs: np.ndarray
    byte_models: list[Any | None]
    tail_probs: np.ndarray
    tail_coded: np.ndarray | None = None

    @classmethod
    def of(cls, layout: _RunLayout, probs: np.ndarray) -> _RunPlan:
        known = (probs == 0.0) | (probs == 1.0)
        coded = [g for g in layout.run_groups if not known[g]]
        built = iter(_byte_models(probs[coded]) if coded else [])
        models = [None if known[g] else next(built) for g in layout.run_groups]
        tail_known = known[layout.tail_groups]
        if not tail_known.any():
            return cls(layout, probs, models, probs[layout.tail_groups])
        coded = ~tail_known
        return cls(layout, probs, models, probs[layout.tail_groups[coded]], coded)

    def encode(self, encoder: Any, bits: np.ndarray) -> None:
        """The bits of the coded groups, in the layout's order."""
        layout = self.layout
        ordered = bits[layout.order]
        run_symbols = np.packbits(ordered[: layout.run_bits]).astype(np.int32)
        start = 0
        for count, byte_model in zip(layout.run_bytes, self.byte_models):
            if byte_model is not None:
                encoder.encode(run_symbols[start : start + count], byte_model)
            start += count
        tail = ordered[layout.run_bits :]
        if self.tail_coded is not None:
            tail = tail[self.tail_coded]
        if tail.size:
            encoder.encode(tail.astype(np.int32), bernoulli(), self.tail_probs)

    def decode(self, decoder: Any) -> np.ndarray:
        """Inverse of :meth:`encode`: every weight's bit, in weight order."""
        layout = self.layout
        ordered = np.empty(layout.order.size, dtype=bool)
        runs = [np.full(count, 255 if self.probs[group] == 1.0 else 0, dtype=np.uint8) if byte_model is None
                else decoder.decode(byte_model, count).astype(np.uint8)
                for group, count, byte_model in zip(layout.run_groups, layout.run_bytes, self.byte_models)]
        if runs:
            ordered[: layout.run_bits] = np.unpackbits(np.concatenate(runs))
        if self.tail_coded is None:
            if self.tail_probs.size:
                ordered[layout.run_bits :] = decoder.decode(bernoulli(), self.tail_probs)
        else:
            tail = self.probs[layout.tail_groups] == 1.0  # the known bits; the coded ones follow
            if self.tail_probs.size:
                tail[self.tail_coded] = decoder.decode(bernoulli(), self.tail_probs)
            ordered[layout.run_bits :] = tail
        symbols = np.empty_like(ordered)
        symbols[layout.order] = ordered
        return symbols


def _run_plan(tables: _SideTables, param: int) -> _RunPlan:
    """The side section's plan. The layout is kept per broadcast; so is the whole plan for
    flip 0 (FedPM's theta), which every client of a round and the server's decoding of
    every upload share. Another flip (a hard prior's, estimated per mask) builds only its models."""
    assert tables.groups is not None
    if param == 0 and tables.run_plan is not None:
        return tables.run_plan
    if tables.run_layout is None:
        tables.run_layout = _RunLayout.of(tables.groups)
    plan = _RunPlan.of(tables.run_layout, _side_probs(tables.groups.values, param))
    if param == 0:
        tables.run_plan = plan
    return plan


def _side_encode(encoder: Any, bits: np.ndarray, tables: _SideTables,
                 param: int) -> None:
    """The side model's bits: group by group (one fixed probability each) or bit by bit."""
    if tables.groups is None:
        encoder.encode(bits.astype(np.int32), bernoulli(),
                       _side_q(tables, param))
        return
    _run_plan(tables, param).encode(encoder, bits)


def _side_decode(decoder: Any, tables: _SideTables, param: int,
                 bytewise: bool = True) -> np.ndarray:
    """Inverse of :func:`_side_encode` (``bytewise`` False: format 2, where a group's bits
    were coded one by one, group after group)."""
    groups = tables.groups
    if groups is None:
        return decoder.decode(bernoulli(), _side_q(tables, param))
    if not bytewise:
        symbols = np.empty(tables.values.size, dtype=bool)
        pieces = [_decode_run(decoder, count, prob, bytewise=False)
                  for count, prob in zip(groups.counts.tolist(), _side_probs(groups.values, param).tolist())]
        symbols[groups.order] = np.concatenate(pieces) if pieces else symbols[:0]
        return symbols
    return _run_plan(tables, param).decode(decoder)


# ---------------------------------------------------------------- the grouped model

_COUNT_SPLIT = 16  # a group of at least 2**16 weights codes its count of ones in two symbols


def _count_symbols(ones: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each group's count of ones as uniform symbols (value, alphabet size), groups in
    order: ``k`` over 0..n, or for n >= 2**16, ``k >> 16`` over 0..n >> 16 then
    ``k & 0xFFFF`` over 0..65535."""
    split = sizes >= 1 << _COUNT_SPLIT
    first = np.where(split, ones >> _COUNT_SPLIT, ones)
    first_size = np.where(split, (sizes >> _COUNT_SPLIT) + 1, sizes + 1)
    symbols = np.stack([first, ones & 0xFFFF], axis=1)
    alphabets = np.stack([first_size, np.full_like(sizes, 1 << _COUNT_SPLIT)], axis=1)
    keep = np.stack([np.ones_like(split), split], axis=1)
    return symbols[keep].astype(np.int32), alphabets[keep].astype(np.int32)


def _count_bits(sizes: np.ndarray) -> float:
    """The ideal length of the counts of ones of groups of these sizes."""
    split = sizes >= 1 << _COUNT_SPLIT
    return float(np.where(split, np.log2((sizes >> _COUNT_SPLIT) + 1.0) + _COUNT_SPLIT,
                          np.log2(sizes + 1.0)).sum())


def _grouped_bits(bits: np.ndarray, tables: _SideTables) -> float:
    """Ideal length of a grouped section: sum over groups of n H(k/n), plus the counts."""
    groups = tables.context_groups
    assert groups is not None
    ones, sizes = groups.ones(bits).astype(np.float64), groups.counts.astype(np.float64)
    zeros = sizes - ones
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -(np.where(ones > 0, ones * np.log2(ones / sizes), 0.0)
                    + np.where(zeros > 0, zeros * np.log2(zeros / sizes), 0.0))
    return float(entropy.sum()) + _count_bits(groups.counts)


def _grouped_encode(encoder: Any, bits: np.ndarray, tables: _SideTables) -> None:
    """A grouped section: the counts of ones, then the groups' bits with probability k / n."""
    groups, layout = tables.context_groups, tables.context_layout
    assert groups is not None and layout is not None
    ones = groups.ones(bits)
    symbols, alphabets = _count_symbols(ones, groups.counts)
    encoder.encode(symbols, constriction.stream.model.Uniform(), alphabets)
    _RunPlan.of(layout, ones / groups.counts).encode(encoder, bits)


def _grouped_decode(decoder: Any, tables: _SideTables, name: str) -> np.ndarray:
    """Inverse of :func:`_grouped_encode`; a count above its group's size is refused."""
    groups, layout = tables.context_groups, tables.context_layout
    assert groups is not None and layout is not None
    sizes = groups.counts
    _, alphabets = _count_symbols(np.zeros_like(sizes), sizes)
    symbols = decoder.decode(constriction.stream.model.Uniform(), alphabets).astype(np.int64)
    split = sizes >= 1 << _COUNT_SPLIT
    ones = np.zeros_like(sizes)
    position = np.concatenate([[0], np.cumsum(1 + split)[:-1]]).astype(np.intp)
    ones[:] = symbols[position]
    ones[split] = (ones[split] << _COUNT_SPLIT) | symbols[position[split] + 1]
    if (ones > sizes).any():
        group = int(np.argmax(ones > sizes))
        raise FRAME.error(f"section '{name}' ones of group {group}", f"<= {int(sizes[group])}", int(ones[group]))
    return _RunPlan.of(layout, ones / sizes).decode(decoder)


def _side_q(tables: _SideTables, param: int) -> np.ndarray:
    """The coder's per-symbol probabilities (cached for flip 0)."""
    if param == 0 and tables.q0 is not None:
        return tables.q0
    return _side_probs(tables.values, param)


def _decode_sections(payload: bytes, layout: Layout, prior: Prior | None,
                     sections: list[tuple[str, int, int]], version: int = FORMAT_VERSION) -> dict[str, np.ndarray]:
    out, reader = {}, Reader(payload, FRAME)
    for name, shape in layout.shapes:
        model, param, length = reader.unpack(_SECTION, f"section '{name}'", "a 9-byte section header")
        if length > reader.left:
            raise FRAME.error(f"section '{name}' length", f"<= {reader.left} bytes", length)
        data = reader.take(length, f"section '{name}'")
        out[name] = _decode_section(name, model, param, data, math.prod(shape), prior, version).reshape(shape)
        sections.append((name, model, param))
    reader.end()
    return out


def _decode_section(name: str, model: int, param: int, data: bytes, size: int,
                    prior: Prior | None, version: int = FORMAT_VERSION) -> np.ndarray:
    """One section's bits, as format ``version`` codes them (2: every bit its own coder
    symbol; 3: eight bits a symbol; 4: and the grouped model)."""
    if model == MODEL_PACKED:
        if len(data) != (size + 7) // 8:
            raise FRAME.error(f"section '{name}' length", (size + 7) // 8, len(data))
        return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=size).astype(bool)
    models = (MODEL_PACKED, MODEL_FREQUENCY, *_side_models(version))
    if model not in models:
        raise FRAME.error(f"section '{name}' model", " or ".join(f"{m} ({MODEL_NAMES[m]})" for m in sorted(models)),
                          model)
    if model == MODEL_FREQUENCY and param > size:
        raise FRAME.error(f"section '{name}' ones", f"<= {size}", param)
    tables = None
    if model != MODEL_FREQUENCY:
        if prior is None or name not in prior:
            raise FRAME.error(f"section '{name}' side information", "the last broadcast state", "none")
        tables = _section_tables(prior, name, model, param, size)
    with decoding(FRAME, f"section '{name}' stream", data) as decoder:
        if tables is None:
            symbols = _decode_run(decoder, size, _frequency_probs(param, size), version >= 3)
        elif model == MODEL_GROUPED:
            symbols = _grouped_decode(decoder, tables, name)
        else:
            symbols = _side_decode(decoder, tables, param, version >= 3)
    if symbols.size != size:
        raise FRAME.error(f"section '{name}' symbols", size, symbols.size)
    return symbols.astype(bool)


def _section_tables(prior: Prior, name: str, model: int, param: int, size: int) -> _SideTables:
    """The side tables a side or grouped section of ``size`` bits decodes with, checked."""
    tables = _tables(prior, name)
    if tables.values.size != size:
        raise FRAME.error(f"side information '{name}'", f"{size} values", tables.values.size)
    if model == MODEL_GROUPED:
        contexts = _contexts_of(tables, name)
        if contexts.size != size:
            raise FRAME.error(f"side information '{name}' contexts", f"{size} values", contexts.size)
        groups = tables.context_groups
        if groups is None:
            raise FRAME.error(f"section '{name}' side information", f"at most {SIDE_GROUPS_MAX} distinct contexts",
                              np.unique(contexts).size)
        if param != groups.counts.size:
            raise FRAME.error(f"section '{name}' groups", groups.counts.size, param)
    return tables


def code_lengths(masks: dict[str, np.ndarray], layout: Layout, codec: str,
                 prior: Prior | None) -> dict[str, float]:
    """Ideal bits under the models the encoder chose, and FedPM's formula for the same mask.

    FedPM reports ``H(f) + log2(N)/N`` bits per parameter, ``f`` the mask's fraction of
    ones over all N parameters; it is computed here for the masks actually sent.
    """
    ideal = 0.0
    for name, _ in layout.shapes:
        bits = np.asarray(masks[name], dtype=bool).ravel()
        if codec == "packbits":
            ideal += bits.size
        else:
            tables = None if prior is None else _tables(prior, name)
            ideal += _choose(section_candidates(bits, None, tables))[2]
    ones = sum(int(np.count_nonzero(np.asarray(m, dtype=bool))) for m in masks.values())
    return {"ideal_bits": ideal, "formula_bits": _formula_bits(ones, layout.num_params)}
