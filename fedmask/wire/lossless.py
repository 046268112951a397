"""The lossless broadcast's bytes (format ``FMSL`` on :mod:`fedmask.wire.frame`).

What is sent when, and how a node turns it into the server's state, is the protocol of
:mod:`fedmask.downlink`; here are the bytes.

Wire format (one uint8 Array ``lossless`` in the ``arrays`` record; little-endian)::

    magic "FMSL" | format u8 | kind u8 (1 full, 2 replay) | steps u16 | fingerprint 8s
    | base version u32 | base digest 8s | target version u32 | target digest 8s | crc32 u32

``full``: the float32 tensors in layout order. ``replay``: ``steps`` steps, each
``version u32 | digest 8s | standalone u8 | clients f64`` and one section per tensor
(``standalone``: 0 votes coded against the state before the step, 1 votes without context,
2 the state's own values coded against the state before it, 3 the state's values without
context, 4 the round's uploads relayed as they arrived)::

    model u8 | distinct u32 | table bytes u32 | data bytes u32 | zlib(table) | data

The votes (or state values) of a tensor take ``distinct`` values (FedPM: the counts 0..n; edge-popup: the
weighted vote shares); the table holds them (float64, sorted) and, for the coded models,
their histograms. ``model`` 0: one value everywhere, no data; 1: symbols raw (u8/u16/u32);
2: range-coded with one histogram; 3: range-coded with one histogram per *context*, a
small integer per weight that both ends compute from the previous state (FedPM: theta in
32 bins; top-k methods: whether the weight is in the current top-k; Slot Machines: whether
the candidate is the current choice; a state step: the rank of the weight's value among
the previous state's values); symbols are coded context by context. The encoder
picks, per tensor, the model with the fewest bytes. A step's digest is that of the state
after it, so a replay that diverges is caught at the step where it does. The CRC covers
the header before it and the whole body.

A relay step (4) holds, instead of sections, the uploads the server aggregated that round,
in partition order: ``uploads u32`` then per upload ``partition u32 | weight f64 | bytes
u32 | the upload``: a node that holds the state before the step decodes each (a
relative-entropy upload is a few hundred bytes, its sample rebuilt from the shared seed)
and aggregates them as the server did.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedmask.wire.frame import Frame, Layout, Reader, categorical, coded_bytes, decoding, encoder

State = dict[str, np.ndarray]
FORMAT_VERSION = 1
KIND_FULL, KIND_REPLAY = 1, 2
FRAME = Frame("lossless broadcast", b"FMSL",
              (("format", "B"), ("kind", "B"), ("steps", "H"), ("fingerprint", "8s"), ("base version", "I"),
               ("base digest", "8s"), ("target version", "I"), ("target digest", "8s"), ("crc32", "I")),
              crc_covers_header=True)
HEADER_BYTES = FRAME.size
STEP = struct.Struct("<I8sBd")
SECTION = struct.Struct("<BIII")
MODEL_CONSTANT, MODEL_RAW, MODEL_ORDER0, MODEL_CONTEXT = 0, 1, 2, 3
# a step's ``standalone`` byte: what its sections hold and what they are coded against
STEP_VOTES, STEP_VOTES_ALONE, STEP_STATE, STEP_STATE_ALONE, STEP_UPLOADS = 0, 1, 2, 3, 4
UPLOAD = struct.Struct("<IdI")  # a relayed upload: partition, weight, bytes
STATE_VALUES = 256  # a state whose tensors take at most this many values can be sent as itself
_CODER_SLACK = 8  # bytes: the range coder ends on a whole word and may need one more
Contexts = dict[str, tuple[np.ndarray, int]]  # per tensor: (a small integer per entry, how many)


def state_digest(state: State, layout: Layout) -> bytes:
    """8 bytes of SHA-256 over the float32 tensors in layout order: two parties with the
    same digest hold the same state bit for bit."""
    digest = hashlib.sha256()
    for name, _ in layout.shapes:
        digest.update(np.ascontiguousarray(state[name], dtype=np.float32).tobytes())
    return digest.digest()[:8]


def few_valued(state: State) -> bool:
    """Whether every tensor takes at most :data:`STATE_VALUES` values (a state that can be
    sent as itself: FedPM's theta with the prior reset, edge-popup's ``vote-levels``)."""
    for value in state.values():
        flat = np.ascontiguousarray(value, np.float32).reshape(-1)
        if np.unique(flat[: 16 * STATE_VALUES]).size > STATE_VALUES:  # a dense float state: no full sort
            return False
        patterns = np.unique(flat.view(np.uint32))
        # -0.0 and 0.0 are one value to np.unique (so to the coder) but not to the digest: not sent as values
        if patterns.size > STATE_VALUES or np.unique(patterns.view(np.float32)).size != patterns.size:
            return False
    return True


def value_contexts(state: State) -> Contexts | None:
    """Per tensor, (the rank of each entry's value among the tensor's values, how many):
    the context a state step is coded with; None when a tensor takes too many values."""
    out = {}
    for name, value in state.items():
        distinct, rank = np.unique(value, return_inverse=True)
        if distinct.size > STATE_VALUES:
            return None
        out[name] = (rank.astype(np.int64).ravel(), max(int(distinct.size), 1))
    return out


# ---------------------------------------------------------------- one tensor's votes


def _table_bytes(values: np.ndarray, hist: np.ndarray | None, level: int = 9) -> bytes:
    raw = values.astype("<f8").tobytes() + (b"" if hist is None else hist.astype("<u4").tobytes())
    return zlib.compress(raw, level)


def _ideal_bytes(hist: np.ndarray) -> float:
    counts = hist[hist > 0].astype(np.float64)
    return float(-(counts * np.log2(counts / counts.sum())).sum()) / 8.0 if counts.size else 0.0


def _by_context(contexts: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """The positions of each context's entries, in order: one stable sort instead of a pass
    per context (the same groups, in the same order, as ``flatnonzero(contexts == c)``).
    The keys are sorted as the narrowest unsigned integers that hold them (numpy's stable
    sort of 8- and 16-bit keys is a radix sort: the same order, several times faster)."""
    keys = contexts
    if contexts.size and contexts.min() >= 0:
        top = int(contexts.max())
        keys = contexts.astype(np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else contexts.dtype, copy=False)
    order = np.argsort(keys, kind="stable")
    return np.split(order, np.cumsum(counts)[:-1])


def _range_code(groups: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    coder = encoder()
    for symbols, hist in groups:
        if symbols.size:
            coder.encode(symbols.astype(np.int32), categorical(hist / hist.sum()))
    return coded_bytes(coder)


def _raw_dtype(distinct: int) -> str:
    return "u1" if distinct <= 2**8 else "<u2" if distinct <= 2**16 else "<u4"


class ContextIndex:
    """One tensor's contexts (a small integer per entry below ``count``) with, computed once,
    how many entries each context has and their positions: the contexts of a state the
    server keeps serve every node that holds it, round after round."""

    def __init__(self, contexts: np.ndarray, count: int):
        flat = np.asarray(contexts).ravel()
        if 0 < count <= 2**16 and flat.dtype.kind in "iu" and (not flat.size or (flat.min() >= 0
                                                                               and flat.max() < count)):
            flat = flat.astype(np.uint8 if count <= 2**8 else np.uint16)  # kept for long: its narrowest type
        self.contexts, self.count = flat, count
        self._positions: list[np.ndarray] | None = None

    @property
    def positions(self) -> list[np.ndarray]:
        """The positions of each context's entries, in order (:func:`_by_context`)."""
        if self._positions is None:
            positions = _by_context(self.contexts, np.bincount(self.contexts, minlength=self.count))
            narrow = np.int32 if self.contexts.size < 2**31 else np.int64
            self._positions = [where.astype(narrow) for where in positions]
        return self._positions

    def index(self) -> ContextIndex:
        """This, with the positions computed now (to be kept: :attr:`nbytes` counts them)."""
        _ = self.positions
        return self

    @property
    def nbytes(self) -> int:
        return self.contexts.nbytes + sum(where.nbytes for where in self._positions or ())

    def histogram(self, symbols: np.ndarray, distinct: int) -> np.ndarray:
        """Per context (rows), how often each of ``distinct`` symbols occurs."""
        joint = self.contexts.astype(np.int64) * distinct + symbols
        return np.bincount(joint, minlength=self.count * distinct).reshape(self.count, distinct)


def context_index(contexts: Contexts | None) -> dict[str, ContextIndex] | None:
    """Each tensor's contexts as a :class:`ContextIndex` (None stays None)."""
    return None if contexts is None else {name: ContextIndex(*pair) for name, pair in contexts.items()}


class Symbols:
    """One tensor's values as symbols, ready to be coded against any contexts: what a section
    holds that does not depend on the contexts (the distinct values, each entry's symbol, the
    raw and order-0 options and their tables) is computed once, and :meth:`section` adds the
    context model. A round's votes are coded against the state of every node that holds a
    different one; this is what those codings share."""

    def __init__(self, values: np.ndarray):
        flat = np.ascontiguousarray(values, dtype=np.float64).ravel()
        self.values, symbols = np.unique(flat, return_inverse=True)
        self.symbols = symbols.ravel()
        self.distinct = self.values.size
        self._plain: tuple[list[tuple[float, int]], dict[int, bytes]] | None = None

    def _options(self) -> tuple[list[tuple[float, int]], dict[int, bytes]]:
        """The estimated bytes of the raw and order-0 models, and their sections (built lazily
        by :meth:`_plain_section`); computed once."""
        if self._plain is None:
            raw_table = _table_bytes(self.values, None)
            raw_len = self.symbols.size * np.dtype(_raw_dtype(self.distinct)).itemsize
            order0 = np.bincount(self.symbols, minlength=self.distinct)
            order0_table = _table_bytes(self.values, order0)
            self._order0, self._tables = order0, {MODEL_RAW: raw_table, MODEL_ORDER0: order0_table}
            self._plain = ([(float(raw_len + len(raw_table)), MODEL_RAW),
                            (_ideal_bytes(order0) + _CODER_SLACK + len(order0_table), MODEL_ORDER0)], {})
        return self._plain

    def _plain_section(self, model: int) -> bytes:
        sections = self._options()[1]
        if model not in sections:
            if model == MODEL_RAW:
                data = self.symbols.astype(_raw_dtype(self.distinct)).tobytes()
            else:
                data = _range_code([(self.symbols, self._order0)])
            sections[model] = _section(model, self.distinct, self._tables[model], data)
        return sections[model]

    def section(self, index: ContextIndex | None, level: int = 9) -> bytes:
        """The section of these values coded with the model of fewest bytes (see the module
        doc); ``index``: the contexts (None: none); ``level``: zlib's, for the context
        model's table (the others are built once, at 9)."""
        if self.distinct <= 1:
            return _section(MODEL_CONSTANT, self.distinct, _table_bytes(self.values, None), b"")
        options = list(self._options()[0])
        if index is not None:
            hist = index.histogram(self.symbols, self.distinct)
            ideal = sum(_ideal_bytes(row) for row in hist) + _CODER_SLACK
            # a table has at least zero bytes: at or above the best other estimate the context
            # model cannot win (a tie goes to the lower model), and its table need not be built
            if ideal < min(options)[0]:
                table = _table_bytes(self.values, hist.ravel(), level)
                if ideal + len(table) < min(options)[0]:
                    groups = [(self.symbols[where], hist[c]) for c, where in enumerate(index.positions)]
                    return _section(MODEL_CONTEXT, self.distinct, table, _range_code(groups))
        return self._plain_section(min(options)[1])


def encode_votes(votes: np.ndarray, contexts: np.ndarray | None, num_contexts: int) -> bytes:
    """One tensor's votes (any float64 values, exactly) as a section; see the module doc."""
    return Symbols(votes).section(None if contexts is None else ContextIndex(contexts, num_contexts))


def _section(model: int, distinct: int, table: bytes, data: bytes) -> bytes:
    return SECTION.pack(model, distinct, len(table), len(data)) + table + data


def decode_votes(name: str, body: bytes, offset: int, size: int, contexts: np.ndarray | None,
                 num_contexts: int) -> tuple[np.ndarray, int]:
    """(the float64 votes of ``size`` entries, the offset after the section)."""
    if offset + SECTION.size > len(body):
        raise FRAME.error(f"'{name}' section", "a section header", "end of broadcast")
    model, distinct, table_len, data_len = SECTION.unpack_from(body, offset)
    offset += SECTION.size
    if offset + table_len + data_len > len(body) or model > MODEL_CONTEXT or (model == MODEL_CONTEXT
                                                                             and contexts is None):
        raise FRAME.error(f"'{name}' section", "model 0..3 (3 only after a state) within the broadcast",
                             (model, table_len, data_len))
    try:
        table = zlib.decompress(body[offset : offset + table_len])
    except zlib.error as err:
        raise FRAME.error(f"'{name}' table", "a zlib stream", str(err)) from None
    data = body[offset + table_len : offset + table_len + data_len]
    offset += table_len + data_len
    rows = {MODEL_CONSTANT: 0, MODEL_RAW: 0, MODEL_ORDER0: 1, MODEL_CONTEXT: num_contexts}[model]
    if len(table) != 8 * distinct + 4 * rows * distinct or (model == MODEL_CONSTANT and distinct > 1):
        raise FRAME.error(f"'{name}' table", f"{distinct} values and {rows} histogram(s)", f"{len(table)} bytes")
    values = np.frombuffer(table[: 8 * distinct], dtype="<f8")
    hist = np.frombuffer(table[8 * distinct :], dtype="<u4").astype(np.float64).reshape(rows, distinct)
    if model == MODEL_CONSTANT:
        if distinct == 0 and size:
            raise FRAME.error(f"'{name}' values", f"{size} votes", "none")
        return np.full(size, values[0] if distinct else 0.0), offset
    if model == MODEL_RAW:
        dtype = np.dtype(_raw_dtype(distinct))
        if len(data) != size * dtype.itemsize:
            raise FRAME.error(f"'{name}' raw symbols", f"{size * dtype.itemsize} bytes", len(data))
        symbols = np.frombuffer(data, dtype=dtype).astype(np.int64)
    else:
        symbols = _range_decode(name, data, hist, size, contexts if model == MODEL_CONTEXT else None)
    if symbols.size != size or (symbols.size and (symbols.min() < 0 or symbols.max() >= distinct)):
        raise FRAME.error(f"'{name}' symbols", f"{size} symbols below {distinct}", symbols.size)
    return values[symbols], offset


def _range_decode(name: str, data: bytes, hist: np.ndarray, size: int, contexts: np.ndarray | None) -> np.ndarray:
    counts = np.bincount(contexts, minlength=len(hist))[: len(hist)] if contexts is not None else np.array([size])
    if contexts is not None and contexts.size and contexts.max() >= len(hist):
        raise FRAME.error(f"'{name}' contexts", f"below {len(hist)}", int(contexts.max()))
    if [int(h.sum()) for h in hist] != counts.tolist():
        raise FRAME.error(f"'{name}' histograms", counts.tolist(), [int(h.sum()) for h in hist])
    groups = [np.arange(size)] if contexts is None else _by_context(contexts, counts)
    symbols = np.zeros(size, dtype=np.int64)
    with decoding(FRAME, f"'{name}' coded symbols", data) as decoder:
        for positions, row in zip(groups, hist):
            if positions.size:
                symbols[positions] = decoder.decode(categorical(row / row.sum()), positions.size)
    return symbols


# ---------------------------------------------------------------- steps and messages


@dataclass(frozen=True)
class Step:
    """One aggregation, coded: the round's votes (or the state it made), and the digest of
    the state after it."""

    version: int
    digest: bytes
    standalone: bool
    data: bytes  # STEP header and sections


Values = Mapping[str, np.ndarray | Symbols]  # per tensor: its values, or their symbols (:class:`Symbols`)
Indexed = Mapping[str, tuple[np.ndarray, int] | ContextIndex]  # per tensor: contexts, maybe indexed


def symbols_of(values: State) -> dict[str, Symbols]:
    """Every tensor's values as :class:`Symbols`, to be coded against several contexts."""
    return {name: value if isinstance(value, Symbols) else Symbols(value) for name, value in values.items()}


def _index(pair: tuple[np.ndarray, int] | ContextIndex) -> ContextIndex:
    return pair if isinstance(pair, ContextIndex) else ContextIndex(*pair)


def encode_sections(values: Values, layout: Layout, contexts: Indexed | None, level: int = 9) -> bytes:
    """One section per tensor, in layout order (see the module doc); ``level``: zlib's, for
    the context models' tables."""
    out = []
    for name, _ in layout.shapes:
        value = values[name]
        symbols = value if isinstance(value, Symbols) else Symbols(value)
        out.append(symbols.section(None if contexts is None else _index(contexts[name]), level))
    return b"".join(out)


def decode_sections(body: bytes, offset: int, layout: Layout,
                     contexts: Contexts | None) -> tuple[dict[str, np.ndarray], int]:
    """The float64 values of every tensor's section from ``offset``, and the offset after them."""
    out = {}
    for name, shape in layout.shapes:
        ctx = None if contexts is None else contexts[name]
        flat, offset = decode_votes(name, body, offset, math.prod(shape), None if ctx is None else ctx[0],
                                    1 if ctx is None else ctx[1])
        out[name] = flat.reshape(shape)
    return out, offset


def encode_step(version: int, digest: bytes, votes: Values, clients: float, layout: Layout,
                contexts: Indexed | None, level: int = 9) -> Step:
    """A step's votes coded with ``contexts`` (from the state before it), or standalone when None."""
    head = STEP.pack(version, digest, int(contexts is None), float(clients))
    return Step(version, digest, contexts is None, head + encode_sections(votes, layout, contexts, level))


def encode_state(version: int, digest: bytes, state: Values, layout: Layout, contexts: Indexed | None,
                 level: int = 9) -> Step:
    """A few-valued state itself as a step, coded with the values of a state the node holds
    as contexts (:func:`value_contexts` of it), or without context when None."""
    head = STEP.pack(version, digest, STEP_STATE_ALONE if contexts is None else STEP_STATE, 0.0)
    return Step(version, digest, contexts is None, head + encode_sections(state, layout, contexts, level))


def pack(kind: int, steps: int, fingerprint: bytes, base: tuple[int, bytes], target: tuple[int, bytes],
         body: bytes) -> np.ndarray:
    """A broadcast blob: the header, its CRC over the header before it and the body."""
    return FRAME.pack({"format": FORMAT_VERSION, "kind": kind, "steps": steps, "fingerprint": fingerprint,
                       "base version": base[0], "base digest": base[1], "target version": target[0],
                       "target digest": target[1]}, body)


def encode_relay(version: int, digest: bytes, uploads: list[tuple[int, float, bytes]], clients: float) -> Step:
    """The round's aggregated uploads, relayed: (partition, weight, upload bytes), in partition order."""
    head = STEP.pack(version, digest, STEP_UPLOADS, float(clients)) + struct.pack("<I", len(uploads))
    body = b"".join(UPLOAD.pack(pid, weight, len(data)) + data for pid, weight, data in uploads)
    return Step(version, digest, False, head + body)


def read_relay(body: bytes, offset: int) -> tuple[list[tuple[int, float, bytes]], int]:
    """A relay step's uploads from ``offset`` (after its step header), and the offset after them."""
    reader = Reader(body, FRAME, offset)
    (count,) = reader.unpack(struct.Struct("<I"), "relayed uploads", "a count of uploads")
    uploads = []
    for index in range(count):
        pid, weight, size = reader.unpack(UPLOAD, f"relayed upload {index}", "an upload's header")
        uploads.append((pid, weight, reader.take(size, f"relayed upload {index}")))
    return uploads, reader.offset


def full_blob(state: State, layout: Layout, fingerprint: bytes, version: int) -> np.ndarray:
    body = b"".join(np.ascontiguousarray(state[name], dtype="<f4").tobytes() for name, _ in layout.shapes)
    return pack(KIND_FULL, 0, fingerprint, (0, bytes(8)), (version, state_digest(state, layout)), body)


def replay_blob(steps: list[Step], fingerprint: bytes, base: tuple[int, bytes],
                target: tuple[int, bytes]) -> np.ndarray:
    return pack(KIND_REPLAY, len(steps), fingerprint, base, target, b"".join(s.data for s in steps))


@dataclass(frozen=True)
class Envelope:
    """What a broadcast's header says: its kind and number of steps, the state it leads to,
    the state it replays from (None when it stands alone: a full state, or a replay whose
    first step is standalone), and the body after the header."""

    kind: int
    steps: int
    target: tuple[int, bytes]
    base: tuple[int, bytes] | None
    body: bytes = b""


def envelope(blob: np.ndarray, fingerprint: bytes) -> Envelope:
    """The header of a broadcast after the checks that need no decoding: magic and format,
    the CRC over header and body, and the run's fingerprint.

    A broadcast that passes these came whole from this run's server, so its state is the
    one its target digest names: a process that already decoded and checked a state with
    that digest can use it instead of decoding again (when the node holds the base).
    """
    raw = np.ascontiguousarray(blob, dtype=np.uint8).reshape(-1).tobytes()
    fields, body = FRAME.read(raw)
    if fields["magic"] != FRAME.magic or fields["format"] != FORMAT_VERSION:
        raise FRAME.error("header", f"{FRAME.magic!r} format {FORMAT_VERSION}", (fields["magic"], fields["format"]))
    FRAME.check_crc(raw, why="corrupted broadcast")
    if fields["fingerprint"] != fingerprint:
        raise FRAME.error("fingerprint", f"{fingerprint.hex()} (this seed, model, init)", fields["fingerprint"].hex())
    if fields["kind"] not in (KIND_FULL, KIND_REPLAY):
        raise FRAME.error("kind", "1 (full) or 2 (replay)", fields["kind"])
    first = STEP.unpack_from(body)[2] if fields["steps"] and len(body) >= STEP.size else None
    standalone = fields["kind"] != KIND_REPLAY or first in (STEP_VOTES_ALONE, STEP_STATE_ALONE)
    return Envelope(fields["kind"], fields["steps"], (fields["target version"], fields["target digest"]),
                    None if standalone else (fields["base version"], fields["base digest"]), body)
