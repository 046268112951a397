"""The fedmask ClientApp: train scores locally, upload a coded mask, never weights.

Everything a client needs comes in the message: the global state (probabilities or
scores; dense weights for the FedAvg baseline) and a :class:`TrainInstruction` (the run
config, the round, the partition id and the mask mode). The frozen weights are
regenerated here from the seed.

A SuperNode started with ``--node-config "partition-id=K num-partitions=N"`` (N the run's
``num-clients``) holds partition K and trains on it whatever the message says; the server
learns which node holds what from a QUERY message (see :mod:`fedmask.placement`). A node
config may also set ``data-dir``, where this node keeps its dataset files. This is also
the app ``flwr run`` starts: a SecAgg+ message goes to the secure ClientApp
(:mod:`clients.secure_client_app`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmask import broadcast, task
from fedmask.aggregators import Replayable
from fedmask.codec import MaskLayout, Prior, choices_to_planes, encode_masks, mask_prior
from fedmask.compression import ErrorFeedback, compress
from fedmask.config import RunConfig
from fedmask.data import client_split
from fedmask.downlink import decode_state
from fedmask.faults import SLOW_RECORD, attack_masks, attackers, client_fault, colluding_masks, corrupt_upload
from fedmask.instruction import TrainInstruction
from fedmask.laperm import arrangement, encode_ranks
from fedmask.masking import get_scores, set_scores, upload_arrays
from fedmask.methods import get_method
from fedmask.placement import NODE_RECORD, TRAINED_RECORD, held_partition, node_info
from fedmask.recycling import RECORD, RecycleLog, sync_frozen
from fedmask.weights import derive_seed

app = ClientApp()


@functools.lru_cache(maxsize=2)
def _model_for(config: RunConfig, mode: str | None) -> tuple[torch.nn.Module, task.ModelSpec | None]:
    """One model per process and config: regenerating frozen weights each round is waste."""
    model = task.make_model(config, task.splits_of(config), mode)
    spec = task.ModelSpec.of(config, model, mode) if mode else None
    return model, spec


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

    __slots__ = ("arrays", "_hash")

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


def broadcast_of(config: RunConfig, mode: str, spec: task.ModelSpec, arrays: dict[str, np.ndarray]) -> Broadcast:
    """The broadcast decoded once per process and round, not once per client: a round's
    clients get the same arrays, found again here by their bytes (:class:`ArraysKey`), or
    without reading them when they are the very state of a lossless broadcast this process
    decoded (:func:`_decoded_broadcast` hands every client of a state the same dict)."""
    for (cached_config, cached_mode, _), received in _RECEIVED.items():
        if received.held.state is arrays and cached_config == config and cached_mode == mode:
            if received.broadcast is None:
                received.broadcast = _new_broadcast(config, mode, spec, arrays)
            return received.broadcast
    key = (config, mode, ArraysKey(arrays))
    found = _BROADCASTS.get(key)
    if found is None:
        found = _new_broadcast(config, mode, spec, arrays)
        while len(_BROADCASTS) >= _BROADCASTS_KEPT:
            del _BROADCASTS[next(iter(_BROADCASTS))]
        _BROADCASTS[(config, mode, key[2].kept())] = found
    return found


def _new_broadcast(config: RunConfig, mode: str, spec: task.ModelSpec, arrays: dict[str, np.ndarray]) -> Broadcast:
    state = decode_state(arrays, spec.layout)
    prior = mask_prior(state, mode, config.density) if config.uplink_codec == "entropy" else None
    return Broadcast(state, task.training_scores(config, state, mode), prior)


@functools.lru_cache(maxsize=2)
def _initial_state(config: RunConfig, mode: str) -> dict[str, np.ndarray]:
    """The seed's first global state (version 0 of the lossless downlink), as the server builds it."""
    model = task.make_model(config, task.splits_of(config), mode)
    return config.method_entry.make_aggregator(config).initial_state(get_scores(model))


def _replayer(config: RunConfig) -> Replayable:
    aggregator = config.method_entry.make_aggregator(config)
    if not isinstance(aggregator, Replayable):
        raise broadcast.BroadcastError("replay", "a method whose update clients can replay", config.method)
    return aggregator


def _held_version(context: Context) -> tuple[int, bytes] | None:
    """(version, digest) of the state this node holds, read without loading the state."""
    if broadcast.HELD_STATE not in context.state or broadcast.HELD_META not in context.state:
        return None
    meta = context.state.config_records[broadcast.HELD_META]
    version = meta["version"]
    return (version if isinstance(version, int) else -1), bytes.fromhex(str(meta["digest"]))


def _held(context: Context) -> broadcast.Held | None:
    """What this node kept of its last lossless broadcast (Flower's per-node context.state)."""
    held = _held_version(context)
    if held is None:
        return None
    arrays = context.state.array_records[broadcast.HELD_STATE]
    return broadcast.Held(*held, {name: array.numpy() for name, array in arrays.items()})


@dataclass
class _Received:
    """A lossless broadcast's state as this process decoded it, shared by its clients."""

    held: broadcast.Held  # read-only arrays
    arrays: dict[str, Array]  # what a node keeps in context.state: the bytes are shared, not copied per node
    broadcast: Broadcast | None = None  # what :func:`broadcast_of` made of ``held.state``


_RECEIVED: dict[tuple, _Received] = {}  # by (config, mode, target version and digest); newest last
_RECEIVED_KEPT = 2


def _decoded_broadcast(blob: np.ndarray, config: RunConfig, mode: str, spec: task.ModelSpec,
                       context: Context) -> _Received:
    """A lossless broadcast decoded once per process and state, not once per client.

    A round's clients get blobs that differ (a replay from the version each node holds, a
    jump, a standalone step) but lead to the same state. A blob that passes the header
    checks (CRC, fingerprint: :func:`broadcast.envelope`) and names a state this process
    has already decoded and checked by its digest gives that state, provided this node
    holds the state the blob replays from (as :func:`broadcast.receive` would insist).
    The cached arrays are read-only: every client of the process shares them, and the
    in-process engines' nodes share the bytes they keep in ``context.state`` (under Ray
    each node's context is pickled to and from a worker, so nothing is shared there).
    """
    raw = np.ascontiguousarray(blob, dtype=np.uint8)
    sent = broadcast.envelope(raw, spec.fingerprint)
    key = (config, mode, sent.target)
    found = _RECEIVED.get(key)
    if found is not None and (sent.base is None or sent.base[0] == 0 or sent.base == _held_version(context)):
        return found
    got = broadcast.receive(raw, spec.layout, spec.fingerprint, _held(context), lambda: _initial_state(config, mode),
                            lambda: _replayer(config), mode, config.density)
    for array in got.state.values():
        array.setflags(write=False)
    while len(_RECEIVED) >= _RECEIVED_KEPT:
        del _RECEIVED[next(iter(_RECEIVED))]
    received = _RECEIVED[(config, mode, (got.version, got.digest))] = _Received(
        got, {k: Array(np.ascontiguousarray(v)) for k, v in got.state.items()})
    return received


def receive_lossless(blob: np.ndarray, instruction: TrainInstruction, context: Context) -> tuple[
        dict[str, np.ndarray], ConfigRecord]:
    """The server's exact state from a lossless broadcast; kept in ``context.state`` for the
    next one; and the reply's confirmation of what this node now holds."""
    config, mode = instruction.config, instruction.mask_mode
    assert mode is not None
    _, spec = _model_for(config, mode)
    assert spec is not None
    try:
        received = _decoded_broadcast(blob, config, mode, spec, context)
    finally:  # a failed receive leaves nothing stale
        for key in (broadcast.HELD_STATE, broadcast.HELD_META):
            if key in context.state:
                del context.state[key]
    got = received.held
    context.state[broadcast.HELD_STATE] = ArrayRecord(received.arrays)
    context.state[broadcast.HELD_META] = ConfigRecord({"version": got.version, "digest": got.digest.hex()})
    return got.state, ConfigRecord({"version": got.version, "digest": got.digest.hex()})


@dataclass
class LocalRound:
    """A client's round after training: what it uploads is derived from this."""

    model: torch.nn.Module
    spec: task.ModelSpec | None  # None for the dense baseline
    prior: Prior | None  # what the entropy coder codes the mask against (the broadcast)
    num_examples: int
    metrics: dict[str, float]
    broadcast: dict[str, np.ndarray] | None = None  # the global state as decoded (mask modes)


def _dense_upload(model: torch.nn.Module, corrupt: bool) -> ArrayRecord:
    weights = task.dense_state(model)
    if corrupt:  # a truncated tensor
        first = next(iter(weights))
        weights[first] = weights[first].ravel()[: weights[first].size // 2]
    return ArrayRecord({k: Array(v) for k, v in weights.items()})


_EF_RECORD, _EF_OWNER = "error-feedback", "error-feedback-owner"  # a node's memory, and whose it is


def _compressed_upload(done: LocalRound, instruction: TrainInstruction, broadcast: dict[str, np.ndarray],
                       context: Context, corrupt: bool) -> ArrayRecord:
    """A compressed dense baseline's upload: ``delta = local - broadcast`` (plus the error
    memory this node keeps in ``context.state`` for error-feedback methods), coded."""
    config, server_round, pid = instruction.config, instruction.server_round, instruction.partition_id
    method = get_method(config.method)
    assert method.compressor is not None
    local = task.dense_state(done.model)
    delta = {k: local[k].astype(np.float32) - np.asarray(broadcast[k], dtype=np.float32) for k in local}
    owner = context.state.config_records.get(_EF_OWNER)
    memory = None
    if method.error_feedback and owner is not None and owner.get("partition-id") == pid:
        memory = {k: a.numpy() for k, a in context.state.array_records[_EF_RECORD].items()}
    feedback = ErrorFeedback(memory)
    corrected = feedback.add(delta)
    layout = MaskLayout.from_arrays(local)
    rng = np.random.default_rng(derive_seed(config.seed, "compress", server_round, pid))
    blob, sent = compress(corrected, layout, layout.fingerprint(config.seed, config.model, "dense"),
                          method.compressor, rng, config.qsgd_levels, config.topk_fraction)
    if method.error_feedback:
        feedback.keep(corrected, sent)
        context.state[_EF_RECORD] = ArrayRecord({k: Array(v) for k, v in feedback.memory.items()})
        context.state[_EF_OWNER] = ConfigRecord({"partition-id": pid})
    if corrupt:
        blob, _ = corrupt_upload(blob, config, server_round, pid)
    return ArrayRecord({"update": Array(blob)})


def _mask_upload(done: LocalRound, instruction: TrainInstruction, corrupt: bool) -> ArrayRecord:
    """A fresh Bernoulli sample (FedPM), the top-k mask (edge-popup, biprop), the slot
    choices as bit-planes (Slot Machines) or LaPerm's ranks, coded."""
    config, server_round, pid = instruction.config, instruction.server_round, instruction.partition_id
    assert done.spec is not None
    if instruction.mask_mode == "laperm":  # an arrangement, coded against the broadcast ranks
        rng = np.random.default_rng(derive_seed(config.seed, "laperm-rank-step", server_round, pid))
        blob = encode_ranks(arrangement(done.model), done.spec.upload, done.spec.fingerprint,
                            codec=config.uplink_codec, prior=done.prior, step=config.laperm_rank_step, rng=rng)
        if corrupt:
            blob, _ = corrupt_upload(blob, config, server_round, pid)
        return ArrayRecord({"mask": Array(blob)})
    masks = upload_arrays(done.model)
    if instruction.mask_mode == "slots":
        masks = choices_to_planes(masks, config.slots)
    if pid in attackers(config):
        crafted = None
        if config.attack == "colluding" and done.broadcast is not None and instruction.mask_mode:
            crafted = colluding_masks(done.broadcast, instruction.mask_mode, config.density)
        masks = attack_masks(masks, config, server_round, pid, crafted)
    blob = encode_masks(masks, done.spec.upload, done.spec.fingerprint, codec=config.uplink_codec, prior=done.prior)
    if corrupt:
        blob, _ = corrupt_upload(blob, config, server_round, pid)
    return ArrayRecord({"mask": Array(blob)})


_SECAGG_RECORD = "secaggplus_configs"  # flwr.common.secure_aggregation.secaggplus_constants.RECORD_KEY_CONFIGS


def on_this_node(instruction: TrainInstruction, node_config: Mapping[str, Any]) -> TrainInstruction:
    """The instruction as this node carries it out: its own partition (node config) wins,
    and a node config's ``data-dir`` says where this node keeps the dataset."""
    own = held_partition(node_info(node_config), instruction.config.num_clients) if instruction.node_data else None
    if own is not None and own != instruction.partition_id:
        instruction = dataclasses.replace(instruction, partition_id=own)
    data_dir = node_config.get("data-dir")
    if isinstance(data_dir, str) and data_dir and data_dir != instruction.config.data_dir:
        instruction = dataclasses.replace(instruction, config=instruction.config.replace(data_dir=data_dir))
    return instruction


@app.query()
def query(msg: Message, context: Context) -> Message:
    """What this node holds: its node config's partition-id and num-partitions (none in plain simulation)."""
    return Message(RecordDict({NODE_RECORD: ConfigRecord(node_info(context.node_config))}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if _SECAGG_RECORD in msg.content.config_records:  # a SecAgg+ stage: the run asked for secure aggregation
        from clients.secure_client_app import app as secure_app

        return secure_app(msg, context)
    instruction = on_this_node(TrainInstruction.from_flat(msg.content["config"]), context.node_config)
    config, server_round, pid = instruction.config, instruction.server_round, instruction.partition_id
    torch.set_num_threads(config.num_cpus)
    fault = client_fault(config, server_round, pid)
    if fault == "drop":  # the simulator's mark of a client that never answers (see ledger)
        return Message(RecordDict({}), reply_to=msg)
    if fault == "crash":
        raise RuntimeError(f"injected crash (fault-crash-rate) in round {server_round}, client {pid}")
    arrays = {name: array.numpy() for name, array in msg.content.array_records["arrays"].items()}
    confirm = None
    if broadcast.RECORD in arrays and instruction.mask_mode is not None:
        arrays, confirm = receive_lossless(arrays[broadcast.RECORD], instruction, context)
    recycle = msg.content.array_records.get(RECORD)
    recycle_arrays = None if recycle is None else {name: array.numpy() for name, array in recycle.items()}
    done = local_round(instruction, arrays, recycle_arrays)
    upload = None
    if done.spec is None and get_method(config.method).compressor:
        upload = _compressed_upload(done, instruction, arrays, context, fault == "corrupt")
    return reply_of(msg, instruction, done, fault, upload, confirm)


def reply_of(msg: Message, instruction: TrainInstruction, done: LocalRound, fault: str | None,
             upload: ArrayRecord | None = None, confirm: ConfigRecord | None = None) -> Message:
    """The reply to a train instruction after its local round: the coded upload (``upload``
    when the caller coded it already) and the metrics."""
    config, pid = instruction.config, instruction.partition_id
    if upload is None and done.spec is None:
        upload = _dense_upload(done.model, fault == "corrupt")
    elif upload is None:
        upload = _mask_upload(done, instruction, fault == "corrupt")
    reply = RecordDict({"arrays": upload, "metrics": MetricRecord({"num-examples": done.num_examples,
                                                                   **done.metrics}),
                        TRAINED_RECORD: ConfigRecord({"partition-id": pid})})
    if confirm is not None:  # the server learns what this node holds only from this
        reply[broadcast.CONFIRM] = confirm
    if fault == "slow":  # delivered late by the server's grid (see faults.SLOW_RECORD)
        reply[SLOW_RECORD] = ConfigRecord({"delay": config.fault_slow_delay})
    return Message(reply, reply_to=msg)


def local_round(instruction: TrainInstruction, arrays: dict[str, np.ndarray],
                recycle: dict[str, np.ndarray] | None = None) -> LocalRound:
    """Load the broadcast, train on this partition.

    ``recycle`` is the broadcast's weight-recycling log, replayed onto the frozen weights.
    """
    config, pid = instruction.config, instruction.partition_id
    model, spec, prior, state = prepare_model(instruction, arrays, recycle)
    x, y = client_data(instruction)
    seed = derive_seed(config.seed, "train", instruction.server_round, pid)
    device = task.pick_device(config)
    metrics = task.train(model, x, y, config, device, seed=seed)
    if device.type != "cpu":  # back for coding; on the CPU the call would only walk the modules (1 ms)
        model.cpu()
    return LocalRound(model, spec, prior, len(x), metrics, state)


def client_data(instruction: TrainInstruction) -> tuple[torch.Tensor, torch.Tensor]:
    """The instruction's partition of the training split."""
    config = instruction.config
    return client_split(task.splits_of(config), instruction.partition_id, config.num_clients, config.partitioner,
                        config.seed, config.dirichlet_alpha, config.classes_per_client)


def prepare_model(instruction: TrainInstruction, arrays: dict[str, np.ndarray],
                  recycle: dict[str, np.ndarray] | None
                  ) -> tuple[torch.nn.Module, task.ModelSpec | None, Prior | None, dict[str, np.ndarray] | None]:
    """This process's model with the broadcast loaded (and the recycling log replayed);
    the prior the upload is coded against, and the decoded global state (None if dense)."""
    config, mode = instruction.config, instruction.mask_mode
    model, spec = _model_for(config, mode)
    if mode is None or spec is None:
        task.load_dense_state(model, arrays)
        return model, spec, None, None
    broadcast = broadcast_of(config, mode, spec, arrays)
    if mode == "laperm":  # ranks: the seeded values put in that order
        task.load_state(model, broadcast.state, mode)
    else:
        set_scores(model, broadcast.scores)
    if config.recycle_every:
        if recycle is None:
            raise ValueError("recycle-every is set but the broadcast carries no 'recycle' log")
        sync_frozen(model, RecycleLog.from_arrays(recycle), spec.layout, spec.fingerprint,
                    config.seed, config.init)
    return model, spec, broadcast.prior, broadcast.state
