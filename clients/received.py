"""What a ClientApp process keeps between messages: its model and the broadcasts it decoded.

A round's clients in one process (the in-process engines; a Ray worker serving many nodes)
get the same broadcast, each in new array objects; decoding, checking and converting it
once per process instead of once per client is most of what makes a client cheap. This
module holds those caches: the model per config (:func:`model_for`), the decoded broadcast
per content (:func:`broadcast_of`, found again by :class:`ArraysKey`), and the lossless
downlink's decoded states (:func:`receive_lossless`; the masks' ``lossless`` and the dense
baselines' ``ef-qsgd``), which each node also keeps in Flower's per-node ``context.state``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from fedmask import downlink, task
from fedmask.config import RunConfig
from fedmask.core.masking import get_scores
from fedmask.methods import BUILTIN
from fedmask.methods.base import MaskMode
from fedmask.methods.dense import apply_update, dense_fingerprint, update_contexts
from fedmask.protocol.instruction import TrainInstruction
from fedmask.wire.frame import Layout
from fedmask.wire.lossless import envelope
from fedmask.wire.masks import Prior
from fedmask.wire.state import decode_state


@functools.lru_cache(maxsize=2)
def model_for(config: RunConfig, mode_name: str | None) -> tuple[torch.nn.Module, task.ModelSpec | None]:
    """One model per process and config: regenerating frozen weights each round is waste."""
    mode = task.mode_of(config, mode_name)
    model = task.make_model(config, task.splits_of(config), mode)
    return model, None if mode is None else task.ModelSpec.of(config, model, mode)


@dataclass(frozen=True)
class Broadcast:
    """A decoded broadcast: what every client of a round starts from."""

    state: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]  # what the model's scores are set to (logit(theta) for FedPM)
    prior: Prior | None  # the entropy coder's side information


_BROADCASTS: dict[tuple, Broadcast] = {}  # by (config, mode, ArraysKey of the arrays); newest last
_BROADCASTS_KEPT = 2
_SAMPLE_STRIDE = 4099  # bytes between those the key's hash reads (a prime: no alignment with float32 rows)


class ArraysKey:
    """Named arrays as a dict key: equal when their names, dtypes, shapes and every byte are.

    A round's clients in one process receive the same broadcast in new array objects, and
    each must find it again. A digest of every byte cost about 2 ms a megabyte per client;
    here the hash reads one byte in :data:`_SAMPLE_STRIDE` and equality compares every byte
    (at memory speed), so a hit costs one comparison and a sampled collision is only a miss.
    """

    __slots__ = ("_hash", "arrays")

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = tuple((name, np.ascontiguousarray(arrays[name])) for name in sorted(arrays))
        self._hash = hash(tuple((name, a.dtype.str, a.shape, _bytes_of(a)[::_SAMPLE_STRIDE].tobytes())
                                for name, a in self.arrays))

    def kept(self) -> ArraysKey:
        """The key with its own read-only copies, for a cache that outlives the arrays' owner."""
        copy = object.__new__(ArraysKey)
        copy.arrays = tuple((name, _read_only(a.copy())) for name, a in self.arrays)
        copy._hash = self._hash
        return copy

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ArraysKey):
            return NotImplemented
        return self._hash == other._hash and len(self.arrays) == len(other.arrays) and all(
            name == other_name and a.dtype == b.dtype and a.shape == b.shape
            and np.array_equal(_bytes_of(a), _bytes_of(b))
            for (name, a), (other_name, b) in zip(self.arrays, other.arrays))


def _bytes_of(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1).view(np.uint8)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def broadcast_of(config: RunConfig, mode: MaskMode, spec: task.ModelSpec, arrays: dict[str, np.ndarray]) -> Broadcast:
    """The broadcast decoded once per process and round, not once per client: a round's
    clients get the same arrays, found again here by their bytes (:class:`ArraysKey`), or
    without reading them when they are the very state of a lossless broadcast this process
    decoded (:func:`_decoded_broadcast` hands every client of a state the same dict)."""
    for (cached_config, cached_mode, _), received in _RECEIVED.items():
        if received.held.state is arrays and cached_config == config and cached_mode == mode.name:
            if received.broadcast is None:
                received.broadcast = _new_broadcast(config, mode, spec, arrays)
            return received.broadcast
    key = (config, mode.name, ArraysKey(arrays))
    found = _BROADCASTS.get(key)
    if found is None:
        found = _new_broadcast(config, mode, spec, arrays)
        while len(_BROADCASTS) >= _BROADCASTS_KEPT:
            del _BROADCASTS[next(iter(_BROADCASTS))]
        _BROADCASTS[(config, mode.name, key[2].kept())] = found
    return found


def _new_broadcast(config: RunConfig, mode: MaskMode, spec: task.ModelSpec, arrays: dict[str, np.ndarray]) -> Broadcast:
    state = decode_state(arrays, spec.layout)
    prior = mode.prior(state) if mode.uplink_codec(config.uplink_codec) != "packbits" else None
    return Broadcast(state, mode.scores_of_state(state), prior)


# ---------------------------------------------------------------- the lossless downlink


@functools.lru_cache(maxsize=2)
def _initial_state(config: RunConfig, mode_name: str | None) -> dict[str, np.ndarray]:
    """The seed's first global state (version 0 of the lossless downlink), as the server
    builds it: the dense baselines' seeded weights, or the mask rule's first state."""
    model = task.make_model(config, task.splits_of(config), task.mode_of(config, mode_name))
    if mode_name is None:
        return task.dense_state(model)
    return config.method_entry.make_aggregator(config).initial_state(get_scores(model))


@dataclass(frozen=True)
class _Party:
    """What a node needs to turn a lossless broadcast into the server's state."""

    mode: str | None  # the mask mode; None: dense weights (the ef-qsgd downlink)
    layout: Layout
    fingerprint: bytes
    replay: downlink.Replay | None
    contexts: downlink.VoteContexts
    rebuild: downlink.Rebuild | None


def _party(config: RunConfig, mode_name: str | None) -> _Party:
    """A mask method's replay of its rule, or a dense baseline's: its state plus the update sent."""
    if mode_name is None:
        layout = Layout.from_arrays(_initial_state(config, None))
        return _Party(None, layout, dense_fingerprint(layout, config.seed, config.model), apply_update,
                      update_contexts, None)
    mode = task.mode_of(config, mode_name)
    _, spec = model_for(config, mode_name)
    assert mode is not None and spec is not None
    return _Party(mode.name, spec.layout, spec.fingerprint, _replay(config), mode.vote_contexts,
                  _rebuild(config, mode, spec))


@functools.lru_cache(maxsize=2)
def _replay(config: RunConfig) -> downlink.Replay | None:
    """The method's update, which this node replays (None: a plug-in, which a node never imports)."""
    if config.method not in BUILTIN or BUILTIN[config.method].aggregator is None:
        return None
    return getattr(BUILTIN[config.method].make_aggregator(config), "replay", None)


def _rebuild(config: RunConfig, mode: MaskMode, spec: task.ModelSpec) -> downlink.Rebuild | None:
    """A round's state from its relayed uploads, aggregated as the server did (None: a plug-in)."""
    if config.method not in BUILTIN or BUILTIN[config.method].aggregator is None:
        return None
    method = BUILTIN[config.method]

    def rebuild(state: dict[str, np.ndarray], server_round: int,
                uploads: list[tuple[int, float, bytes]]) -> dict[str, np.ndarray]:
        aggregator = method.make_aggregator(config)  # a replayable rule holds no memory between rounds
        prior = mode.prior(state)
        for pid, weight, data in uploads:
            upload = mode.decode_upload(np.frombuffer(data, np.uint8), spec.upload, spec.fingerprint, prior,
                                        mode.uplink_codec(config.uplink_codec), {}, (server_round, pid))
            aggregator.fold(server_round, state, mode.votes(upload, spec.layout), weight)
        return aggregator.finish(server_round, state).state

    return rebuild


def _held_version(context: Context) -> tuple[int, bytes] | None:
    """(version, digest) of the state this node holds, read without loading the state."""
    if downlink.HELD_STATE not in context.state or downlink.HELD_META not in context.state:
        return None
    meta = context.state.config_records[downlink.HELD_META]
    version = meta["version"]
    return (version if isinstance(version, int) else -1), bytes.fromhex(str(meta["digest"]))


def _held(context: Context) -> downlink.Held | None:
    """What this node kept of its last lossless broadcast (Flower's per-node context.state)."""
    held = _held_version(context)
    if held is None:
        return None
    arrays = context.state.array_records[downlink.HELD_STATE]
    return downlink.Held(*held, {name: array.numpy() for name, array in arrays.items()})


@dataclass
class _Received:
    """A lossless broadcast's state as this process decoded it, shared by its clients."""

    held: downlink.Held  # read-only arrays
    arrays: dict[str, Array]  # what a node keeps in context.state: the bytes are shared, not copied per node
    broadcast: Broadcast | None = None  # what :func:`broadcast_of` made of ``held.state``


_RECEIVED: dict[tuple, _Received] = {}  # by (config, mode, target version and digest); newest last
_RECEIVED_KEPT = 2


def _decoded_broadcast(blob: np.ndarray, config: RunConfig, party: _Party, context: Context) -> _Received:
    """A lossless broadcast decoded once per process and state, not once per client.

    A round's clients get blobs that differ (a replay from the version each node holds, a
    jump, a standalone step) but lead to the same state. A blob that passes the header
    checks (CRC, fingerprint: :func:`fedmask.wire.lossless.envelope`) and names a state this
    process has already decoded and checked by its digest gives that state, provided this
    node holds the state the blob replays from (as :func:`fedmask.downlink.receive` would
    insist). The cached arrays are read-only: every client of the process shares them, and
    the in-process engines' nodes share the bytes they keep in ``context.state`` (under Ray
    each node's context is pickled to and from a worker, so nothing is shared there).
    """
    raw = np.ascontiguousarray(blob, dtype=np.uint8)
    sent = envelope(raw, party.fingerprint)
    key = (config, party.mode, sent.target)
    found = _RECEIVED.get(key)
    if found is not None and (sent.base is None or sent.base[0] == 0 or sent.base == _held_version(context)):
        return found
    got = downlink.receive(raw, party.layout, party.fingerprint, _held(context),
                           lambda: _initial_state(config, party.mode), party.replay, party.contexts, party.rebuild)
    for array in got.state.values():
        array.setflags(write=False)
    while len(_RECEIVED) >= _RECEIVED_KEPT:
        del _RECEIVED[next(iter(_RECEIVED))]
    received = _RECEIVED[(config, party.mode, (got.version, got.digest))] = _Received(
        got, {k: Array(np.ascontiguousarray(v)) for k, v in got.state.items()})
    return received


def receive_lossless(blob: np.ndarray, instruction: TrainInstruction, context: Context) -> tuple[
        dict[str, np.ndarray], ConfigRecord]:
    """The server's exact state from a lossless broadcast; kept in ``context.state`` for the
    next one; and the reply's confirmation of what this node now holds."""
    config = instruction.config
    try:
        received = _decoded_broadcast(blob, config, _party(config, instruction.mask_mode), context)
    finally:  # a failed receive leaves nothing stale
        for key in (downlink.HELD_STATE, downlink.HELD_META):
            if key in context.state:
                del context.state[key]
    got = received.held
    context.state[downlink.HELD_STATE] = ArrayRecord(received.arrays)
    context.state[downlink.HELD_META] = ConfigRecord({"version": got.version, "digest": got.digest.hex()})
    return got.state, ConfigRecord({"version": got.version, "digest": got.digest.hex()})
