"""The ``lossless`` downlink: every client ends up with the server's state, bit for bit,
for a few bits per parameter.

The server's next state is a deterministic function of the previous state and the round's
aggregated votes (a built-in rule's :meth:`replay`, :mod:`fedmask.methods`): FedPM's theta is the clamped
posterior mode of this round's counts of ones (with the prior reset every round it does
not even depend on the previous state); edge-popup, Biprop and Slot Machines move the
previous scores by the votes. So instead of the state the server sends *steps*: a round's
vote tensors, entropy-coded, and every client replays the server's update with the same
float64 operations. A client holds what it last received in
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

The dense baselines' ``ef-qsgd`` downlink is this protocol too: a step is the round's
update as the server squeezed it (QSGD levels with server error feedback,
:class:`fedmask.methods.dense.SqueezedDownlink`), its few values per tensor coded as votes
are (one context), and the replay adds it to the state the node holds
(:func:`fedmask.methods.dense.apply_update`), as the server did to its own state: the
quantization is lossy, the broadcast of its result is exact. The initial state is the
seed's dense weights; after a resume, until a node confirms a state, it is sent the
float32 state.

The bytes of each broadcast are :mod:`fedmask.wire.lossless`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedmask.wire.frame import Layout
from fedmask.wire.lossless import (
    FRAME,
    HEADER_BYTES,
    KIND_FULL,
    STATE_VALUES,
    STEP,
    STEP_STATE,
    STEP_STATE_ALONE,
    STEP_UPLOADS,
    STEP_VOTES,
    ContextIndex,
    Contexts,
    State,
    Step,
    Symbols,
    context_index,
    decode_sections,
    encode_relay,
    encode_state,
    encode_step,
    envelope,
    few_valued,
    full_blob,
    read_relay,
    replay_blob,
    state_digest,
    symbols_of,
    value_contexts,
)

RECORD = "lossless"  # the Array of the ``arrays`` record that carries a lossless broadcast
CONFIRM = "downlink"  # the reply's ConfigRecord: version and digest of the state the node holds
HELD_STATE, HELD_META = "downlink-held", "downlink-held-meta"  # in a node's context.state
KEPT_STATES_BYTES = 256 * 2**20  # recent states the server keeps for jumps (at least one)
KEPT_INDEX_BYTES = 64 * 2**20  # the contexts of kept states, indexed (:class:`ContextIndex`), recently used
EXACT_BASES = 2  # per round: how many of the states nodes hold (the most recent) get every option coded exactly
FAST_TABLES = 6  # zlib level of the context tables of a broadcast coded for an older state (exact: 9)

Replay = Callable[[State, State, float], State]  # (state, the round's votes, clients) -> next state
# (state, round, the round's uploads: (partition, weight, bytes)) -> the state the server made of them
Rebuild = Callable[[State, int, list[tuple[int, float, bytes]]], State]
VoteContexts = Callable[[State], Contexts]  # the contexts a state gives the next step's votes
Indexed = dict[str, ContextIndex]


@dataclass
class Held:
    """A state a node holds, with its version (the round that made it; 0 = the seed's)."""

    version: int
    digest: bytes
    state: State


# ---------------------------------------------------------------- a node's side


def receive(blob: np.ndarray, layout: Layout, fingerprint: bytes, held: Held | None,
            initial: Callable[[], State], replay: Replay | None, contexts: VoteContexts,
            rebuild: Rebuild | None = None) -> Held:
    """The server's state from a lossless broadcast, checked against its digest.

    ``held`` is what this node kept from its last broadcast (None: nothing); ``initial``
    regenerates the seed's state (version 0); ``replay`` is the method's update (None: a
    plug-in, whose update a node cannot replay), ``contexts`` what a state tells of the
    next votes (the method's) and ``rebuild`` the round's state from its relayed uploads.
    """
    sent = envelope(blob, fingerprint)
    target = sent.target
    if sent.kind == KIND_FULL:
        return _checked(Held(*target, _full_state(sent.body, layout)), layout, "full state")
    current = None if sent.base is None else _base(*sent.base, held, initial, layout)
    offset = 0
    for index in range(sent.steps):
        if offset + STEP.size > len(sent.body):
            raise FRAME.error(f"step {index}", "a step header", "end of broadcast")
        version, digest, standalone, clients = STEP.unpack_from(sent.body, offset)
        state = None if current is None else current.state
        if (standalone > STEP_UPLOADS or (standalone in (STEP_VOTES, STEP_STATE, STEP_UPLOADS) and state is None)
                or not math.isfinite(clients)):
            raise FRAME.error(f"step {index}", "standalone 0..4 (0, 2 and 4 after a state), finite clients",
                              (standalone, clients))
        if standalone in (STEP_STATE, STEP_STATE_ALONE):  # the state itself, no replay
            state, offset = _state_step(sent.body, offset + STEP.size, layout, state, standalone, index)
        elif standalone == STEP_UPLOADS:  # the round's uploads: aggregated here as on the server
            uploads, offset = read_relay(sent.body, offset + STEP.size)
            if rebuild is None or state is None:
                raise FRAME.error("relay", "a method whose uploads a node can aggregate", "a plug-in")
            state = rebuild(state, version, uploads)
        else:
            votes, offset = decode_sections(sent.body, offset + STEP.size, layout,
                                            None if state is None else contexts(state))
            if replay is None:
                raise FRAME.error("replay", "a method whose update clients can replay", "a plug-in")
            state = replay(state or {name: np.zeros(shape, np.float32) for name, shape in layout.shapes},
                           votes, clients)
        current = _checked(Held(version, digest, state), layout, f"step {index} (round {version})")
    if offset != len(sent.body):
        raise FRAME.error("length", f"{FRAME.size + offset} bytes", FRAME.size + len(sent.body))
    if current is None or (current.version, current.digest) != target:
        got = None if current is None else (current.version, current.digest.hex())
        raise FRAME.error("target", (target[0], target[1].hex()), got)
    return current


def _full_state(body: bytes, layout: Layout) -> State:
    """A ``full`` broadcast's float32 tensors, in layout order."""
    sizes = [4 * math.prod(shape) for _, shape in layout.shapes]
    if sum(sizes) != len(body):
        raise FRAME.error("length", f"{FRAME.size + sum(sizes)} bytes (float32 state)", FRAME.size + len(body))
    full, start = {}, 0
    for (name, shape), size in zip(layout.shapes, sizes):
        full[name] = np.frombuffer(body[start : start + size], dtype="<f4").astype(np.float32).reshape(shape)
        start += size
    return full


def _state_step(body: bytes, offset: int, layout: Layout, state: State | None, standalone: int,
                index: int) -> tuple[State, int]:
    """A state step's values, coded with the values of the state before it as contexts (or none)."""
    contexts = value_contexts(state or {}) if standalone == STEP_STATE else None
    if standalone == STEP_STATE and contexts is None:
        raise FRAME.error(f"step {index}", f"a base state of at most {STATE_VALUES} values per tensor", "more")
    values, offset = decode_sections(body, offset, layout, contexts)
    new_state = {}
    for name, exact in values.items():
        with np.errstate(over="ignore", invalid="ignore"):
            new_state[name] = exact.astype(np.float32)
        if not np.array_equal(new_state[name].astype(np.float64), exact):
            raise FRAME.error(f"'{name}' state values", "float32 values", "values float32 cannot hold")
    return new_state, offset


def _base(version: int, digest: bytes, held: Held | None, initial: Callable[[], State], layout: Layout) -> Held:
    """The state a replay starts from: what this node holds, or the seed's (version 0)."""
    if held is not None and (held.version, held.digest) == (version, digest):
        return held
    if version == 0:
        return _checked(Held(0, digest, initial()), layout, "the seed's initial state")
    have = "nothing" if held is None else f"round {held.version} ({held.digest.hex()})"
    raise FRAME.error("base state", f"round {version} ({digest.hex()}), as the server last heard from this node",
                      f"{have}: the node lost or never had it; the server sends a self-contained broadcast "
                      "next time")


def _checked(held: Held, layout: Layout, what: str) -> Held:
    got = state_digest(held.state, layout)
    if got != held.digest:
        raise FRAME.error(f"digest of {what}", held.digest.hex(), got.hex())
    return held


# ---------------------------------------------------------------- the server's side


@dataclass
class LosslessDownlink:
    """The server's history of steps and what it knows each node holds.

    What a round costs the server: every node's options are sized without building their
    bytes, and only each node's pick is built. The steps of a replay are coded once, when
    the round that made them ends. A jump or a state coded against the state a node holds
    is coded once a round per distinct held state, from what those codings share: the
    round's votes (or the state's values) as symbols, coded once (:class:`Symbols`), and
    each kept state's contexts with their positions, indexed once in its life
    (:class:`ContextIndex`). What is left per held state is its histograms, their table and
    the range coding. Nodes that last took part in many different rounds hold many
    different states: the :data:`EXACT_BASES` most recent of a round's held states get
    every option, their tables compressed at zlib level 9 (what was sent before this was
    measured); an older one gets a single coding against it (the jump where the method has
    one, else the state), its context tables at level :data:`FAST_TABLES` (a few hundred
    bytes more, a tenth of the time), besides the options every node shares. See
    ``bench/results/rounds.md`` for what that trades.
    """

    layout: Layout
    fingerprint: bytes
    contexts: VoteContexts  # what a state tells of the next round's votes (the method's)
    can_replay: bool  # False: a plug-in, or the check in :meth:`record` failed: full states only
    absorbing: bool  # the update ignores the previous state (FedPM with the prior reset every round)
    start: int  # the first version the history can replay from (0, or the round of a resume)
    versions: dict[int, bytes] = field(default_factory=dict)
    chained: list[Step] = field(default_factory=list)
    standalone: Step | None = None  # the last step, coded without context (absorbing only)
    held: dict[int, int] = field(default_factory=dict)  # node id -> confirmed version
    awaiting: set[int] = field(default_factory=set)
    few_valued: bool = False  # the current state can be sent as itself (a state step)
    # absorbing or few-valued: copies of recent states (contexts for a jump, oldest first);
    # absorbing: the last step's votes, as symbols, and the clients they came from
    kept_states: dict[int, State] = field(default_factory=dict)
    last_votes: tuple[dict[str, Symbols], float] | None = None
    relays: dict[int, Step] = field(default_factory=dict)  # by version: the round's uploads, relayed
    exact_bases: int = EXACT_BASES
    # the current version's broadcasts: (steps, the state they replay from), and the bytes built
    _plans: dict[object, tuple[list[Step], tuple[int, bytes]]] = field(default_factory=dict)
    _blobs: dict[object, np.ndarray] = field(default_factory=dict)
    _state_symbols: dict[str, Symbols] | None = None  # the current state's values, for state steps
    _kept_few: dict[int, bool] = field(default_factory=dict)  # per kept version: few-valued?
    # ("votes" | "values", kept version) -> its contexts indexed (None: too many values) and their
    # bytes; the least recently used first
    _indexes: dict[tuple[str, int], tuple[Indexed | None, int]] = field(default_factory=dict)
    _index_bytes: int = 0

    @classmethod
    def create(cls, layout: Layout, fingerprint: bytes, contexts: VoteContexts, can_replay: bool, absorbing: bool,
               state: State, version: int = 0, seed_state: State | None = None) -> LosslessDownlink:
        """The history of a run whose current state ``state`` was made by round ``version``.

        A resumed run (``version`` > 0) has lost its steps and what its nodes held; but every
        node can regenerate the seed's state (``seed_state``, version 0), so a few-valued state
        is sent coded against it (and, from the next round, FedPM's counts as a jump from it)
        instead of the float32 state."""
        out = cls(layout, fingerprint, contexts, can_replay, absorbing, version)
        out.versions[version] = state_digest(state, layout)
        if version and seed_state is not None:
            out.versions[0] = state_digest(seed_state, layout)
            out.kept_states[0] = {name: value.copy() for name, value in seed_state.items()}
            out.few_valued = few_valued(state)
        return out

    @property
    def current(self) -> int:
        return max(self.versions)

    def record(self, version: int, previous: State, new_state: State, votes: State | None = None,
               clients: float = 0.0, replay: Replay | None = None,
               uploads: list[tuple[int, float, bytes]] | None = None) -> None:
        """A new state from ``votes``; checks that a client's replay reaches it bit for bit.

        Without votes (an aggregator clients cannot replay) only the new version is kept.
        ``uploads``: the round's aggregated uploads (partition, weight, bytes), kept so that a
        node holding the state before can be sent them instead (relative-entropy uploads are
        a small fraction of the coded votes).
        """
        digest = state_digest(new_state, self.layout)
        last = self.current  # the version of ``previous`` (not version - 1 after a round without replies)
        self.versions[version] = digest
        self._plans, self._blobs, self._state_symbols = {}, {}, None
        if self.can_replay and (votes is None or replay is None
                                or state_digest(replay(previous, votes, clients), self.layout) != digest):
            self.can_replay = False  # a plug-in, or an aggregator whose replay is not its update
        # a few-valued state can be sent as itself whether or not clients can replay the update
        # (FedPM with an accumulated prior: theta takes at most clients-since-reset + 1 values)
        self.few_valued = few_valued(new_state)
        if self.can_replay:
            assert votes is not None
            symbols = symbols_of(votes)  # coded twice below, and against every older state a node holds
            self.chained.append(encode_step(version, digest, symbols, clients, self.layout,
                                            context_index(self.contexts(previous))))
            if uploads is not None and last in self.versions and (last == self.start or last in self.relays):
                self.relays[version] = encode_relay(version, digest, uploads, clients)
            if self.absorbing:
                self.standalone = encode_step(version, digest, symbols, clients, self.layout, None)
                self.last_votes = (symbols, clients)
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
                for kind in ("votes", "values"):
                    self._indexes.pop((kind, oldest_version), None)
                kept_bytes -= sum(a.nbytes for a in oldest.values())

    def message_for(self, node: int, state: State) -> tuple[np.ndarray, str]:
        """The shortest broadcast of the current state this node can use, and its kind."""
        return self.messages_for([node], state)[0]

    def messages_for(self, nodes: list[int], state: State) -> list[tuple[np.ndarray, str]]:
        """Each node's shortest broadcast of the current state ``state`` that it can use, and
        its kind; the first of the shortest in the order :meth:`_options` lists them."""
        target = (self.current, self.versions[self.current])
        held = sorted({self.held[node] for node in nodes if node in self.held}, reverse=True)
        exact = {0, *held[: self.exact_bases]}  # the seed's state serves every node that holds nothing
        out = []
        for node in nodes:
            best: tuple[int, str, object] | None = None
            for kind, key in self._options(node, exact):
                size = self._size(key, state, target)
                if best is None or size < best[0]:
                    best = (size, kind, key)
            assert best is not None
            out.append((self._blob(best[2], state, target), best[1]))
        return out

    def _options(self, node: int, exact: set[int]) -> list[tuple[str, object]]:
        """(kind, key) of every broadcast this node can use: ``"full"``, a replay from a
        version (an int), ``("relay", base)``, ``"standalone"``, ``("jump", base, zlib level)``,
        ``("state", base or None, zlib level)``. A held state not in ``exact`` gets one coding
        against it."""
        target = self.current
        options: list[tuple[str, object]] = [("full", "full")]
        known = self.held.get(node)
        for held in (known, 0 if self.start == 0 else None):  # what the node holds, or the seed's state
            # a replay from it; without replayable steps, only from the current state (a header)
            if held is not None and held in self.versions and held >= self.start and (
                    self.can_replay or held == target):
                options.append(("replay", held))
                if held < target and all(v in self.relays for v in self.versions if v > held):
                    options.append(("relay", ("relay", held)))  # the uploads of every round since
        jump = None
        if self.can_replay and self.absorbing and self.standalone is not None and self.standalone.version == target:
            options.append(("standalone", "standalone"))
            if known is not None and known < target - 1 and known >= self.start and known in self.kept_states:
                jump = known
            elif known is None and 0 < target - 1 and 0 in self.kept_states:
                jump = 0  # a node that holds nothing regenerates the seed's state: the counts coded against it
            if jump is not None:
                options.append(("jump", ("jump", jump, 9 if jump in exact else FAST_TABLES)))
        if self.few_valued:
            options.append(("state", ("state", None, 9)))
            # coded against what the node holds, or else the seed's state, which every node regenerates
            for base in (known, 0):
                if base is not None and (base >= self.start or base == 0) and base < target and self._few_kept(base):
                    if base in exact or jump != base:  # an older state: the jump from it, else the state
                        options.append(("state", ("state", base, 9 if base in exact else FAST_TABLES)))
                    break
        return options

    def _few_kept(self, version: int) -> bool:
        """Whether the server keeps this version and its values can serve as contexts."""
        if version not in self.kept_states:
            return False
        if version not in self._kept_few:
            self._kept_few[version] = few_valued(self.kept_states[version])
        return self._kept_few[version]

    def _index(self, kind: str, version: int) -> Indexed | None:
        """A kept state's contexts, indexed once: ``"votes"`` (the method's, for a jump) or
        ``"values"`` (its values' ranks, for a state step); the most recently used are kept,
        :data:`KEPT_INDEX_BYTES` at most (at least one)."""
        key = (kind, version)
        if key in self._indexes:
            found = self._indexes.pop(key)  # back at the end: the most recently used
        else:
            state = self.kept_states[version]
            indexed = context_index(self.contexts(state) if kind == "votes" else value_contexts(state))
            found = (indexed, sum(index.index().nbytes for index in (indexed or {}).values()))
        self._indexes[key] = found
        self._index_bytes = sum(size for _, size in self._indexes.values())
        while len(self._indexes) > 1 and self._index_bytes > KEPT_INDEX_BYTES:
            self._index_bytes -= self._indexes.pop(next(iter(self._indexes)))[1]
        return found[0]

    def _size(self, key: object, state: State, target: tuple[int, bytes]) -> int:
        """The bytes of broadcast ``key``, built only as far as its steps."""
        if key == "full":
            return HEADER_BYTES + 4 * self.layout.num_params
        steps, _ = self._plan(key, state, target)
        return HEADER_BYTES + sum(len(step.data) for step in steps)

    def _plan(self, key: object, state: State, target: tuple[int, bytes]) -> tuple[list[Step], tuple[int, bytes]]:
        """The steps of broadcast ``key`` (any but ``"full"``) and the state they replay from."""
        if key not in self._plans:
            if key == "standalone":
                assert self.standalone is not None
                plan = [self.standalone], (0, bytes(8))
            elif isinstance(key, tuple) and key[0] == "relay":  # ("relay", version the node holds)
                held = key[1]
                plan = [self.relays[v] for v in sorted(self.versions) if v > held], (held, self.versions[held])
            elif isinstance(key, tuple) and key[0] == "state":  # ("state", version coded against, zlib level)
                _, held, level = key
                if self._state_symbols is None:
                    self._state_symbols = symbols_of(state)
                step = encode_state(target[0], target[1], self._state_symbols, self.layout,
                                    None if held is None else self._index("values", held), level)
                plan = [step], ((0, bytes(8)) if held is None else (held, self.versions[held]))
            elif isinstance(key, tuple):  # ("jump", version the node holds, zlib level)
                assert self.last_votes is not None
                _, held, level = key
                votes, clients = self.last_votes
                step = encode_step(target[0], target[1], votes, clients, self.layout, self._index("votes", held),
                                   level)
                plan = [step], (held, self.versions[held])
            else:
                assert isinstance(key, int)
                plan = [s for s in self.chained if s.version > key], (key, self.versions[key])
            self._plans[key] = plan
        return self._plans[key]

    def _blob(self, key: object, state: State, target: tuple[int, bytes]) -> np.ndarray:
        if key not in self._blobs:
            if key == "full":
                self._blobs[key] = full_blob(state, self.layout, self.fingerprint, target[0])
            else:
                steps, base = self._plan(key, state, target)
                self._blobs[key] = replay_blob(steps, self.fingerprint, base, target)
        return self._blobs[key]

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
