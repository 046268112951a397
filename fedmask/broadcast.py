"""The ``lossless`` downlink: every client ends up with the server's state, bit for bit,
for a few bits per parameter.

The server's next state is a deterministic function of the previous state and the round's
aggregated votes (:class:`fedmask.aggregators.Replayable`): FedPM's theta is the clamped
posterior mode of this round's counts of ones (with the prior reset every round it does
not even depend on the previous state); edge-popup, Biprop and Slot Machines move the
previous scores by the votes. So instead of the state the server sends *steps*: a round's
vote tensors, entropy-coded, and every client replays the server's update with the same
float64 operations (:meth:`Replayable.replay`). A client holds what it last received in
Flower's per-node ``context.state``; the initial state (version 0) is a pure function of
the seed, so a client that holds nothing regenerates it.

What a node is sent (the server picks the shortest that it knows the node can use):

- ``replay`` from the version the node confirmed holding: the steps since then (nothing
  at all when the node already holds the current state);
- ``replay`` from version 0 (the seed's state): every step of the run so far; any node
  can use it, also one whose state was lost;
- for FedPM (prior reset every round): the last step alone, coded without context
  (``standalone``): theta follows from the counts alone;
- for FedPM, to a node that holds an older state the server still keeps: the last step
  alone, coded with the contexts of the state the node holds (``jump``): a replay from
  that state of one step, which the node decodes as any replay. Under partial
  participation a node typically last took part several rounds ago; the state it holds
  still predicts this round's counts better than no context at all. A node that holds
  nothing can be sent the jump from the seed's state (version 0), which it regenerates;
- ``state``, when every tensor of the current state takes at most 256 values (edge-popup's
  ``vote-levels``, FedPM's theta): the state itself, its values coded with the values of
  the state the node holds as contexts (the seed's state for a node that holds nothing),
  or without context. A state that moves little between rounds then costs well under a
  bit per parameter whatever the node missed, where a replay costs every step it missed;
- ``full``: the float32 state, as the ``float32`` codec sends it. A plug-in aggregator, or
  FedPM with an accumulated prior (``fedpm-prior-reset != 1``, whose theta depends on past
  rounds' counts), has an update clients cannot replay: it gets this, unless its state is
  few-valued (FedPM's theta then takes at most clients-since-reset + 1 values: ``state``)
  or the node already holds the current state (a header). So does every node after a
  resume, until it confirms a state.

A node's reply carries a ConfigRecord ``downlink`` with the version and digest of the
state it now holds; the server updates what it knows of the node only from that, and
forgets a node that did not answer (it may or may not have taken the broadcast). A node
that cannot use a replay (its state is gone) fails the round with a clear error; the
server then knows nothing of it and sends it a self-contained broadcast next time.

Wire format (one uint8 Array ``lossless`` in the ``arrays`` record; little-endian)::

    magic "FMSL" | format u8 | kind u8 (1 full, 2 replay) | steps u16 | fingerprint 8s
    | base version u32 | base digest 8s | target version u32 | target digest 8s | crc32 u32

``full``: the float32 tensors in layout order. ``replay``: ``steps`` steps, each
``version u32 | digest 8s | standalone u8 | clients f64`` and one section per tensor
(``standalone``: 0 votes coded against the state before the step, 1 votes without context,
2 the state's own values coded against the state before it, 3 the state's values without
context)::

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
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import constriction
import numpy as np

from fedmask.aggregators import MaskAggregator, Replayable, State
from fedmask.codec import MaskLayout
from fedmask.masking import topk_mask_np

RECORD = "lossless"  # the Array of the ``arrays`` record that carries a lossless broadcast
CONFIRM = "downlink"  # the reply's ConfigRecord: version and digest of the state the node holds
HELD_STATE, HELD_META = "downlink-held", "downlink-held-meta"  # in a node's context.state
MAGIC = b"FMSL"
KEPT_STATES_BYTES = 256 * 2**20  # recent states the server keeps for jumps (at least one)
FORMAT_VERSION = 1
KIND_FULL, KIND_REPLAY = 1, 2
HEADER = struct.Struct("<4sBBH8sI8sI8sI")
STEP = struct.Struct("<I8sBd")
SECTION = struct.Struct("<BIII")
MODEL_CONSTANT, MODEL_RAW, MODEL_ORDER0, MODEL_CONTEXT = 0, 1, 2, 3
THETA_BINS = 32
# a step's ``standalone`` byte: what its sections hold and what they are coded against
STEP_VOTES, STEP_VOTES_ALONE, STEP_STATE, STEP_STATE_ALONE = 0, 1, 2, 3
STATE_VALUES = 256  # a state whose tensors take at most this many values can be sent as itself
_CODER_SLACK = 8  # bytes: the range coder ends on a whole word and may need one more
Contexts = dict[str, tuple[np.ndarray, int]]  # per tensor: (a small integer per entry, how many)


class BroadcastError(ValueError):
    """A lossless broadcast this node cannot turn into the server's state; says why."""

    def __init__(self, field: str, expected: object, got: object):
        self.field = field
        super().__init__(f"lossless broadcast rejected: {field}: expected {expected}, got {got}")


def state_digest(state: State, layout: MaskLayout) -> bytes:
    """8 bytes of SHA-256 over the float32 tensors in layout order: two parties with the
    same digest hold the same state bit for bit."""
    digest = hashlib.sha256()
    for name, _ in layout.shapes:
        digest.update(np.ascontiguousarray(state[name], dtype=np.float32).tobytes())
    return digest.digest()[:8]


def replayable(aggregator: MaskAggregator) -> bool:
    """Whether clients can replay this aggregator's update: a :class:`Replayable` whose
    ``aggregate`` is the base class's (a subclass that rewrote it may do anything else)."""
    if not (isinstance(aggregator, Replayable) and type(aggregator).aggregate is Replayable.aggregate):
        return False
    # FedPM with an accumulated prior (fedpm-prior-reset != 1) needs the counts of past rounds
    return aggregator.absorbing or aggregator.mask_mode != "bernoulli"


def vote_contexts(state: State, mask_mode: str, density: float) -> Contexts:
    """Per tensor, (context of every vote entry, number of contexts), from a state both ends hold."""
    out = {}
    for name, value in state.items():
        if mask_mode == "bernoulli":
            bins = np.minimum(np.floor(value.astype(np.float64) * THETA_BINS), THETA_BINS - 1)
            out[name] = (np.maximum(bins, 0).astype(np.int64).ravel(), THETA_BINS)
        elif mask_mode == "slots":
            choice = np.argmax(value, axis=0)
            onehot = np.arange(value.shape[0]).reshape(-1, *[1] * choice.ndim) == choice[None]
            out[name] = (onehot.astype(np.int64).ravel(), 2)
        else:
            out[name] = (topk_mask_np(np.abs(value), density).astype(np.int64).ravel(), 2)
    return out


def few_valued(state: State) -> bool:
    """Whether every tensor takes at most :data:`STATE_VALUES` values (a state that can be
    sent as itself: FedPM's theta with the prior reset, edge-popup's ``vote-levels``)."""
    for value in state.values():
        patterns = np.unique(np.ascontiguousarray(value, np.float32).view(np.uint32))
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


def _table_bytes(values: np.ndarray, hist: np.ndarray | None) -> bytes:
    raw = values.astype("<f8").tobytes() + (b"" if hist is None else hist.astype("<u4").tobytes())
    return zlib.compress(raw, 9)


def _ideal_bytes(hist: np.ndarray) -> float:
    counts = hist[hist > 0].astype(np.float64)
    return float(-(counts * np.log2(counts / counts.sum())).sum()) / 8.0 if counts.size else 0.0


def _by_context(contexts: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """The positions of each context's entries, in order: one stable sort instead of a pass
    per context (the same groups, in the same order, as ``flatnonzero(contexts == c)``)."""
    order = np.argsort(contexts, kind="stable")
    return np.split(order, np.cumsum(counts)[:-1])


def _range_code(groups: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    encoder = constriction.stream.queue.RangeEncoder()
    for symbols, hist in groups:
        if symbols.size:
            model = constriction.stream.model.Categorical(hist / hist.sum(), perfect=False)
            encoder.encode(symbols.astype(np.int32), model)
    return encoder.get_compressed().astype("<u4").tobytes()


def _raw_dtype(distinct: int) -> str:
    return "u1" if distinct <= 2**8 else "<u2" if distinct <= 2**16 else "<u4"


def encode_votes(votes: np.ndarray, contexts: np.ndarray | None, num_contexts: int) -> bytes:
    """One tensor's votes (any float64 values, exactly) as a section; see the module doc."""
    flat = np.ascontiguousarray(votes, dtype=np.float64).ravel()
    values, symbols = np.unique(flat, return_inverse=True)
    symbols = symbols.ravel()
    distinct = values.size
    if distinct <= 1:
        return _section(MODEL_CONSTANT, distinct, _table_bytes(values, None), b"")
    raw = symbols.astype(_raw_dtype(distinct)).tobytes()
    options: list[tuple[float, int]] = [(float(len(raw) + len(_table_bytes(values, None))), MODEL_RAW)]
    order0 = np.bincount(symbols, minlength=distinct)
    options.append((_ideal_bytes(order0) + _CODER_SLACK + len(_table_bytes(values, order0)), MODEL_ORDER0))
    if contexts is not None:
        hist = np.bincount(contexts * distinct + symbols, minlength=num_contexts * distinct).reshape(
            num_contexts, distinct)
        ideal = sum(_ideal_bytes(row) for row in hist) + _CODER_SLACK
        options.append((ideal + len(_table_bytes(values, hist.ravel())), MODEL_CONTEXT))
    model = min(options)[1]
    if model == MODEL_RAW:
        return _section(model, distinct, _table_bytes(values, None), raw)
    if model == MODEL_ORDER0:
        return _section(model, distinct, _table_bytes(values, order0), _range_code([(symbols, order0)]))
    assert contexts is not None
    positions = _by_context(contexts, hist.sum(axis=1))
    groups = [(symbols[where], hist[c]) for c, where in enumerate(positions)]
    return _section(model, distinct, _table_bytes(values, hist.ravel()), _range_code(groups))


def _section(model: int, distinct: int, table: bytes, data: bytes) -> bytes:
    return SECTION.pack(model, distinct, len(table), len(data)) + table + data


def decode_votes(name: str, body: bytes, offset: int, size: int, contexts: np.ndarray | None,
                 num_contexts: int) -> tuple[np.ndarray, int]:
    """(the float64 votes of ``size`` entries, the offset after the section)."""
    if offset + SECTION.size > len(body):
        raise BroadcastError(f"'{name}' section", "a section header", "end of broadcast")
    model, distinct, table_len, data_len = SECTION.unpack_from(body, offset)
    offset += SECTION.size
    if offset + table_len + data_len > len(body) or model > MODEL_CONTEXT or (model == MODEL_CONTEXT
                                                                             and contexts is None):
        raise BroadcastError(f"'{name}' section", "model 0..3 (3 only after a state) within the broadcast",
                             (model, table_len, data_len))
    try:
        table = zlib.decompress(body[offset : offset + table_len])
    except zlib.error as err:
        raise BroadcastError(f"'{name}' table", "a zlib stream", str(err)) from None
    data = body[offset + table_len : offset + table_len + data_len]
    offset += table_len + data_len
    rows = {MODEL_CONSTANT: 0, MODEL_RAW: 0, MODEL_ORDER0: 1, MODEL_CONTEXT: num_contexts}[model]
    if len(table) != 8 * distinct + 4 * rows * distinct or (model == MODEL_CONSTANT and distinct > 1):
        raise BroadcastError(f"'{name}' table", f"{distinct} values and {rows} histogram(s)", f"{len(table)} bytes")
    values = np.frombuffer(table[: 8 * distinct], dtype="<f8")
    hist = np.frombuffer(table[8 * distinct :], dtype="<u4").astype(np.float64).reshape(rows, distinct)
    if model == MODEL_CONSTANT:
        if distinct == 0 and size:
            raise BroadcastError(f"'{name}' values", f"{size} votes", "none")
        return np.full(size, values[0] if distinct else 0.0), offset
    if model == MODEL_RAW:
        dtype = np.dtype(_raw_dtype(distinct))
        if len(data) != size * dtype.itemsize:
            raise BroadcastError(f"'{name}' raw symbols", f"{size * dtype.itemsize} bytes", len(data))
        symbols = np.frombuffer(data, dtype=dtype).astype(np.int64)
    else:
        symbols = _range_decode(name, data, hist, size, contexts if model == MODEL_CONTEXT else None)
    if symbols.size != size or (symbols.size and (symbols.min() < 0 or symbols.max() >= distinct)):
        raise BroadcastError(f"'{name}' symbols", f"{size} symbols below {distinct}", symbols.size)
    return values[symbols], offset


def _range_decode(name: str, data: bytes, hist: np.ndarray, size: int, contexts: np.ndarray | None) -> np.ndarray:
    if len(data) % 4:
        raise BroadcastError(f"'{name}' coded symbols", "whole 32-bit words", f"{len(data)} bytes")
    counts = np.bincount(contexts, minlength=len(hist))[: len(hist)] if contexts is not None else np.array([size])
    if contexts is not None and contexts.size and contexts.max() >= len(hist):
        raise BroadcastError(f"'{name}' contexts", f"below {len(hist)}", int(contexts.max()))
    if [int(h.sum()) for h in hist] != counts.tolist():
        raise BroadcastError(f"'{name}' histograms", counts.tolist(), [int(h.sum()) for h in hist])
    groups = [np.arange(size)] if contexts is None else _by_context(contexts, counts)
    symbols = np.zeros(size, dtype=np.int64)
    try:
        decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(data, dtype="<u4").astype(np.uint32))
        for positions, row in zip(groups, hist):
            if positions.size:
                model = constriction.stream.model.Categorical(row / row.sum(), perfect=False)
                symbols[positions] = decoder.decode(model, positions.size)
    except Exception as err:  # noqa: BLE001 - whatever the coder says, the stream is bad
        raise BroadcastError(f"'{name}' coded symbols", "a valid range-coded stream", str(err)) from None
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


def _encode_sections(values: State, layout: MaskLayout, contexts: Contexts | None) -> bytes:
    """One section per tensor, in layout order (see the module doc)."""
    return b"".join(encode_votes(values[name], None if contexts is None else contexts[name][0],
                                 1 if contexts is None else contexts[name][1])
                    for name, _ in layout.shapes)


def _decode_sections(body: bytes, offset: int, layout: MaskLayout,
                     contexts: Contexts | None) -> tuple[dict[str, np.ndarray], int]:
    """The float64 values of every tensor's section from ``offset``, and the offset after them."""
    out = {}
    for name, shape in layout.shapes:
        ctx = None if contexts is None else contexts[name]
        flat, offset = decode_votes(name, body, offset, math.prod(shape), None if ctx is None else ctx[0],
                                    1 if ctx is None else ctx[1])
        out[name] = flat.reshape(shape)
    return out, offset


def encode_step(version: int, digest: bytes, votes: State, clients: float, layout: MaskLayout,
                previous: State | None, mask_mode: str, density: float) -> Step:
    """A step coded against ``previous`` (the state before it), or standalone when None."""
    contexts = None if previous is None else vote_contexts(previous, mask_mode, density)
    head = STEP.pack(version, digest, int(previous is None), float(clients))
    return Step(version, digest, previous is None, head + _encode_sections(votes, layout, contexts))


def encode_state(version: int, digest: bytes, state: State, layout: MaskLayout, held: State | None) -> Step:
    """A few-valued state itself as a step, coded with the values of ``held`` (a state the
    node holds) as contexts, or without context when None."""
    contexts = None if held is None else value_contexts(held)
    head = STEP.pack(version, digest, STEP_STATE_ALONE if contexts is None else STEP_STATE, 0.0)
    return Step(version, digest, contexts is None, head + _encode_sections(state, layout, contexts))


def pack(kind: int, steps: int, fingerprint: bytes, base: tuple[int, bytes], target: tuple[int, bytes],
         body: bytes) -> np.ndarray:
    """A broadcast blob: the header, its CRC over the header before it and the body."""
    head = HEADER.pack(MAGIC, FORMAT_VERSION, kind, steps, fingerprint, base[0], base[1], target[0], target[1], 0)
    head = head[:-4]
    crc = zlib.crc32(body, zlib.crc32(head))
    return np.frombuffer(head + struct.pack("<I", crc) + body, dtype=np.uint8).copy()


def full_blob(state: State, layout: MaskLayout, fingerprint: bytes, version: int) -> np.ndarray:
    body = b"".join(np.ascontiguousarray(state[name], dtype="<f4").tobytes() for name, _ in layout.shapes)
    return pack(KIND_FULL, 0, fingerprint, (0, bytes(8)), (version, state_digest(state, layout)), body)


def replay_blob(steps: list[Step], fingerprint: bytes, base: tuple[int, bytes],
                target: tuple[int, bytes]) -> np.ndarray:
    return pack(KIND_REPLAY, len(steps), fingerprint, base, target, b"".join(s.data for s in steps))


@dataclass
class Held:
    """A state a node holds, with its version (the round that made it; 0 = the seed's)."""

    version: int
    digest: bytes
    state: State


def receive(blob: np.ndarray, layout: MaskLayout, fingerprint: bytes, held: Held | None,
            initial: Callable[[], State], aggregator: Callable[[], Replayable] | None, mask_mode: str,
            density: float) -> Held:
    """The server's state from a lossless broadcast, checked against its digest.

    ``held`` is what this node kept from its last broadcast (None: nothing); ``initial``
    regenerates the seed's state (version 0); ``aggregator`` gives the update to replay.
    """
    sent = envelope(blob, fingerprint)
    raw = np.ascontiguousarray(blob, dtype=np.uint8).tobytes()
    kind, count = HEADER.unpack_from(raw)[2:4]
    (target_v, target_d), body = sent.target, raw[HEADER.size :]
    if kind == KIND_FULL:
        sizes = [4 * math.prod(shape) for _, shape in layout.shapes]
        if sum(sizes) != len(body):
            raise BroadcastError("length", f"{HEADER.size + sum(sizes)} bytes (float32 state)", len(raw))
        full, start = {}, 0
        for (name, shape), size in zip(layout.shapes, sizes):
            full[name] = np.frombuffer(body[start : start + size], dtype="<f4").astype(np.float32).reshape(shape)
            start += size
        return _checked(Held(target_v, target_d, full), layout, "full state")
    offset = 0
    state: State | None = None
    current: Held | None = None
    if sent.base is not None:  # not a replay whose first step stands alone
        current = _base(*sent.base, held, initial, layout)
        state = current.state
    for index in range(count):
        if offset + STEP.size > len(body):
            raise BroadcastError(f"step {index}", "a step header", "end of broadcast")
        step_v, step_d, standalone, clients = STEP.unpack_from(body, offset)
        offset += STEP.size
        if (standalone > STEP_STATE_ALONE or (standalone in (STEP_VOTES, STEP_STATE) and state is None)
                or not math.isfinite(clients)):
            raise BroadcastError(f"step {index}", "standalone 0..3 (0 and 2 after a state), finite clients",
                                 (standalone, clients))
        if standalone in (STEP_STATE, STEP_STATE_ALONE):  # the state itself, no replay
            contexts = value_contexts(state or {}) if standalone == STEP_STATE else None
            if standalone == STEP_STATE and contexts is None:
                raise BroadcastError(f"step {index}", f"a base state of at most {STATE_VALUES} values per tensor",
                                     "more")
            values, offset = _decode_sections(body, offset, layout, contexts)
            state = {}
            for name, exact in values.items():
                with np.errstate(over="ignore", invalid="ignore"):
                    state[name] = exact.astype(np.float32)
                if not np.array_equal(state[name].astype(np.float64), exact):
                    raise BroadcastError(f"'{name}' state values", "float32 values", "values float32 cannot hold")
            current = _checked(Held(step_v, step_d, state), layout, f"step {index} (round {step_v})")
            continue
        contexts = None if standalone else vote_contexts(state or {}, mask_mode, density)
        votes, offset = _decode_sections(body, offset, layout, contexts)
        if aggregator is None:
            raise BroadcastError("replay", "a method whose update clients can replay", "a plug-in")
        shapes = state or {name: np.zeros(shape, np.float32) for name, shape in layout.shapes}
        state = aggregator().replay(shapes, votes, clients)
        current = _checked(Held(step_v, step_d, state), layout, f"step {index} (round {step_v})")
    if offset != len(body):
        raise BroadcastError("length", f"{HEADER.size + offset} bytes", len(raw))
    if current is None or (current.version, current.digest) != (target_v, target_d):
        got = None if current is None else (current.version, current.digest.hex())
        raise BroadcastError("target", (target_v, target_d.hex()), got)
    return current


@dataclass(frozen=True)
class Envelope:
    """What a broadcast's header says: the state it leads to, and the state it replays
    from (None when it stands alone: a full state, or a replay whose first step is standalone)."""

    target: tuple[int, bytes]
    base: tuple[int, bytes] | None


def envelope(blob: np.ndarray, fingerprint: bytes) -> Envelope:
    """The header of a broadcast after the checks that need no decoding: magic and format,
    the CRC over header and body, and the run's fingerprint.

    A broadcast that passes these came whole from this run's server, so its state is the
    one its target digest names: a process that already decoded and checked a state with
    that digest can use it instead of decoding again (when the node holds the base).
    """
    raw = np.ascontiguousarray(blob, dtype=np.uint8).reshape(-1).data
    if len(raw) < HEADER.size:
        raise BroadcastError("length", f">= {HEADER.size} bytes", len(raw))
    magic, version, kind, count, fp, base_v, base_d, target_v, target_d, crc = HEADER.unpack_from(raw)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise BroadcastError("header", f"{MAGIC!r} format {FORMAT_VERSION}", (magic, version))
    got_crc = zlib.crc32(raw[HEADER.size :], zlib.crc32(raw[: HEADER.size - 4]))
    if got_crc != crc:
        raise BroadcastError("crc32", f"{crc:08x}", f"{got_crc:08x} (corrupted broadcast)")
    if fp != fingerprint:
        raise BroadcastError("fingerprint", f"{fingerprint.hex()} (this seed, model, init)", fp.hex())
    if kind not in (KIND_FULL, KIND_REPLAY):
        raise BroadcastError("kind", "1 (full) or 2 (replay)", kind)
    standalone = kind != KIND_REPLAY or (count and len(raw) >= HEADER.size + STEP.size
                                         and STEP.unpack_from(raw, HEADER.size)[2] in (STEP_VOTES_ALONE,
                                                                                      STEP_STATE_ALONE))
    return Envelope((target_v, target_d), None if standalone else (base_v, base_d))


def _base(version: int, digest: bytes, held: Held | None, initial: Callable[[], State], layout: MaskLayout) -> Held:
    """The state a replay starts from: what this node holds, or the seed's (version 0)."""
    if held is not None and (held.version, held.digest) == (version, digest):
        return held
    if version == 0:
        return _checked(Held(0, digest, initial()), layout, "the seed's initial state")
    have = "nothing" if held is None else f"round {held.version} ({held.digest.hex()})"
    raise BroadcastError("base state", f"round {version} ({digest.hex()}), as the server last heard from this node",
                         f"{have}: the node lost or never had it; the server sends a self-contained broadcast "
                         "next time")


def _checked(held: Held, layout: MaskLayout, what: str) -> Held:
    got = state_digest(held.state, layout)
    if got != held.digest:
        raise BroadcastError(f"digest of {what}", held.digest.hex(), got.hex())
    return held


# ---------------------------------------------------------------- the server's side


@dataclass
class LosslessDownlink:
    """The server's history of steps and what it knows each node holds."""

    layout: MaskLayout
    fingerprint: bytes
    mask_mode: str
    density: float
    can_replay: bool  # False: a plug-in, or the check in :meth:`record` failed: full states only
    absorbing: bool
    start: int  # the first version the history can replay from (0, or the round of a resume)
    versions: dict[int, bytes] = field(default_factory=dict)
    chained: list[Step] = field(default_factory=list)
    standalone: Step | None = None  # the last step, coded without context (absorbing only)
    held: dict[int, int] = field(default_factory=dict)  # node id -> confirmed version
    awaiting: set[int] = field(default_factory=set)
    few_valued: bool = False  # the current state can be sent as itself (a state step)
    # absorbing or few-valued: copies of recent states (contexts for a jump, oldest first);
    # absorbing: the last step's votes
    kept_states: dict[int, State] = field(default_factory=dict)
    last_votes: tuple[State, float] | None = None
    _cache: dict[object, np.ndarray] = field(default_factory=dict)
    _kept_few: dict[int, bool] = field(default_factory=dict)  # per kept version: few-valued?

    @classmethod
    def create(cls, aggregator: MaskAggregator, layout: MaskLayout, fingerprint: bytes, mask_mode: str,
               density: float, state: State, version: int = 0) -> LosslessDownlink:
        out = cls(layout, fingerprint, mask_mode, density, replayable(aggregator),
                  bool(getattr(aggregator, "absorbing", False)), version)
        out.versions[version] = state_digest(state, layout)
        return out

    @property
    def current(self) -> int:
        return max(self.versions)

    def record(self, version: int, previous: State, new_state: State, votes: State | None = None,
               clients: float = 0.0, replay: Callable[[State, State, float], State] | None = None) -> None:
        """A new state from ``votes``; checks that a client's replay reaches it bit for bit.

        Without votes (an aggregator clients cannot replay) only the new version is kept.
        """
        digest = state_digest(new_state, self.layout)
        last = self.current  # the version of ``previous`` (not version - 1 after a round without replies)
        self.versions[version] = digest
        self._cache.clear()
        if self.can_replay and (votes is None or replay is None
                                or state_digest(replay(previous, votes, clients), self.layout) != digest):
            self.can_replay = False  # a plug-in, or an aggregator whose replay is not its update
        # a few-valued state can be sent as itself whether or not clients can replay the update
        # (FedPM with an accumulated prior: theta takes at most clients-since-reset + 1 values)
        self.few_valued = few_valued(new_state)
        if self.can_replay:
            assert votes is not None
            self.chained.append(encode_step(version, digest, votes, clients, self.layout, previous,
                                            self.mask_mode, self.density))
            if self.absorbing:
                self.standalone = encode_step(version, digest, votes, clients, self.layout, None,
                                              self.mask_mode, self.density)
                self.last_votes = (votes, clients)
        if (self.can_replay and self.absorbing) or self.few_valued:
            # copies: the downlink owns them, so they stay the states their digests name
            if last not in self.kept_states:
                self.kept_states[last] = {name: value.copy() for name, value in previous.items()}
            self.kept_states[version] = {name: value.copy() for name, value in new_state.items()}
            kept_bytes = sum(a.nbytes for kept in self.kept_states.values() for a in kept.values())
            while len(self.kept_states) > 1 and kept_bytes > KEPT_STATES_BYTES:
                oldest_version = min(self.kept_states)
                oldest = self.kept_states.pop(oldest_version)
                self._kept_few.pop(oldest_version, None)
                kept_bytes -= sum(a.nbytes for a in oldest.values())

    def message_for(self, node: int, state: State) -> tuple[np.ndarray, str]:
        """The shortest broadcast of the current state this node can use, and its kind."""
        target = (self.current, self.versions[self.current])
        options: list[tuple[str, object]] = [("full", "full")]
        known = self.held.get(node)
        for held in (known, 0 if self.start == 0 else None):  # what the node holds, or the seed's state
            # a replay from it; without replayable steps, only from the current state (a header)
            if held is not None and held in self.versions and held >= self.start and (
                    self.can_replay or held == target[0]):
                options.append(("replay", held))
        if self.can_replay and self.absorbing and self.standalone is not None and self.standalone.version == target[0]:
            options.append(("standalone", "standalone"))
            if known is not None and known < target[0] - 1 and known >= self.start and known in self.kept_states:
                options.append(("jump", ("jump", known)))
            elif known is None and self.start == 0 and 0 < target[0] - 1 and 0 in self.kept_states:
                # a node that holds nothing regenerates the seed's state: the counts coded against it
                options.append(("jump", ("jump", 0)))
        if self.few_valued:
            options.append(("state", ("state", None)))
            # coded against what the node holds, or else the seed's state, which every node regenerates
            for base in (known, 0 if self.start == 0 else None):
                if base is not None and self.start <= base < target[0] and self._few_kept(base):
                    options.append(("state", ("state", base)))
                    break
        blobs = [(self._blob(key, state, target), kind) for kind, key in options]
        return min(blobs, key=lambda b: b[0].size)

    def _few_kept(self, version: int) -> bool:
        """Whether the server keeps this version and its values can serve as contexts."""
        if version not in self.kept_states:
            return False
        if version not in self._kept_few:
            self._kept_few[version] = few_valued(self.kept_states[version])
        return self._kept_few[version]

    def _blob(self, key: object, state: State, target: tuple[int, bytes]) -> np.ndarray:
        if key not in self._cache:
            if key == "full":
                self._cache[key] = full_blob(state, self.layout, self.fingerprint, target[0])
            elif key == "standalone":
                assert self.standalone is not None
                self._cache[key] = replay_blob([self.standalone], self.fingerprint, (0, bytes(8)), target)
            elif isinstance(key, tuple) and key[0] == "state":  # ("state", version it is coded against)
                held = key[1]
                step = encode_state(target[0], target[1], state, self.layout,
                                    None if held is None else self.kept_states[held])
                base = (0, bytes(8)) if held is None else (held, self.versions[held])
                self._cache[key] = replay_blob([step], self.fingerprint, base, target)
            elif isinstance(key, tuple):  # ("jump", version the node holds)
                assert self.last_votes is not None
                held = key[1]
                votes, clients = self.last_votes
                step = encode_step(target[0], target[1], votes, clients, self.layout, self.kept_states[held],
                                   self.mask_mode, self.density)
                self._cache[key] = replay_blob([step], self.fingerprint, (held, self.versions[held]), target)
            else:
                assert isinstance(key, int)
                steps = [s for s in self.chained if s.version > key]
                self._cache[key] = replay_blob(steps, self.fingerprint, (key, self.versions[key]), target)
        return self._cache[key]

    def sent(self, nodes: list[int]) -> None:
        """Nodes just sent a broadcast: until they confirm, the server does not know what they hold."""
        self.awaiting = set(nodes)

    def confirm(self, node: int, version: object, digest: object) -> bool:
        """A node's reply says what it holds; believed only when it is a state the server made."""
        self.awaiting.discard(node)
        ok = (isinstance(version, int) and not isinstance(version, bool) and isinstance(digest, str)
              and self.versions.get(version, b"").hex() == digest)
        if ok and isinstance(version, int):
            self.held[node] = version
        else:
            self.held.pop(node, None)
        return ok

    def end_round(self) -> None:
        """Nodes that were sent a broadcast and did not confirm: the server knows nothing of them."""
        for node in self.awaiting:
            self.held.pop(node, None)
        self.awaiting = set()
