"""The fedmask ClientApp: train scores locally, upload a coded mask, never weights.

Everything a client needs comes in the message: the global state (probabilities or
scores; dense weights for the FedAvg baseline) and a :class:`TrainInstruction` (the run
config, the round, the partition id and the mask mode). The frozen weights are
regenerated here from the seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmask import broadcast, task
from fedmask.aggregators import Replayable
from fedmask.codec import Prior, choices_to_planes, encode_masks, mask_prior
from fedmask.config import RunConfig
from fedmask.data import client_split
from fedmask.downlink import decode_state
from fedmask.faults import SLOW_RECORD, attack_masks, attackers, client_fault, corrupt_upload
from fedmask.instruction import TrainInstruction
from fedmask.masking import get_scores, upload_arrays
from fedmask.recycling import RECORD, RecycleLog, sync_frozen
from fedmask.weights import derive_seed

app = ClientApp()


@functools.lru_cache(maxsize=2)
def _model_for(config: RunConfig, mode: str | None) -> tuple[torch.nn.Module, task.ModelSpec | None]:
    """One model per process and config: regenerating frozen weights each round is waste."""
    model = task.make_model(config, task.splits_of(config), mode)
    spec = task.ModelSpec.of(config, model, mode) if mode else None
    return model, spec


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


def _held(context: Context) -> broadcast.Held | None:
    """What this node kept of its last lossless broadcast (Flower's per-node context.state)."""
    if broadcast.HELD_STATE not in context.state or broadcast.HELD_META not in context.state:
        return None
    meta = context.state.config_records[broadcast.HELD_META]
    arrays = context.state.array_records[broadcast.HELD_STATE]
    version = meta["version"]
    return broadcast.Held(version if isinstance(version, int) else -1, bytes.fromhex(str(meta["digest"])),
                          {name: array.numpy() for name, array in arrays.items()})


def receive_lossless(blob: np.ndarray, instruction: TrainInstruction, context: Context) -> tuple[
        dict[str, np.ndarray], ConfigRecord]:
    """The server's exact state from a lossless broadcast; kept in ``context.state`` for the
    next one; and the reply's confirmation of what this node now holds."""
    config, mode = instruction.config, instruction.mask_mode
    assert mode is not None
    _, spec = _model_for(config, mode)
    assert spec is not None
    held = _held(context)
    for key in (broadcast.HELD_STATE, broadcast.HELD_META):  # a failed receive leaves nothing stale
        if key in context.state:
            del context.state[key]
    got = broadcast.receive(blob, spec.layout, spec.fingerprint, held, lambda: _initial_state(config, mode),
                            lambda: _replayer(config), mode, config.density)
    context.state[broadcast.HELD_STATE] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in got.state.items()})
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


def _dense_upload(model: torch.nn.Module, corrupt: bool) -> ArrayRecord:
    weights = task.dense_state(model)
    if corrupt:  # a truncated tensor
        first = next(iter(weights))
        weights[first] = weights[first].ravel()[: weights[first].size // 2]
    return ArrayRecord({k: Array(v) for k, v in weights.items()})


def _mask_upload(done: LocalRound, instruction: TrainInstruction, corrupt: bool) -> ArrayRecord:
    """A fresh Bernoulli sample (FedPM), the top-k mask (edge-popup, biprop) or the slot
    choices as bit-planes (Slot Machines), coded."""
    config, server_round, pid = instruction.config, instruction.server_round, instruction.partition_id
    assert done.spec is not None
    masks = upload_arrays(done.model)
    if instruction.mask_mode == "slots":
        masks = choices_to_planes(masks, config.slots)
    if pid in attackers(config):
        masks = attack_masks(masks, config, server_round, pid)
    blob = encode_masks(masks, done.spec.upload, done.spec.fingerprint, codec=config.uplink_codec, prior=done.prior)
    if corrupt:
        blob, _ = corrupt_upload(blob, config, server_round, pid)
    return ArrayRecord({"mask": Array(blob)})


@app.train()
def train(msg: Message, context: Context) -> Message:
    instruction = TrainInstruction.from_flat(msg.content["config"])
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
    if done.spec is None:
        upload = _dense_upload(done.model, fault == "corrupt")
    else:
        upload = _mask_upload(done, instruction, fault == "corrupt")
    reply = RecordDict({"arrays": upload, "metrics": MetricRecord({"num-examples": done.num_examples,
                                                                   **done.metrics})})
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
    config, mode, pid = instruction.config, instruction.mask_mode, instruction.partition_id
    splits = task.splits_of(config)
    x, y = client_split(splits, pid, config.num_clients, config.partitioner, config.seed,
                        config.dirichlet_alpha, config.classes_per_client)
    model, spec = _model_for(config, mode)
    prior = None
    if mode is None or spec is None:
        task.load_dense_state(model, arrays)
    else:
        state = decode_state(arrays, spec.layout)
        task.load_state(model, state, mode)
        if config.recycle_every:
            if recycle is None:
                raise ValueError("recycle-every is set but the broadcast carries no 'recycle' log")
            sync_frozen(model, RecycleLog.from_arrays(recycle), spec.layout, spec.fingerprint,
                        config.seed, config.init)
        if config.uplink_codec == "entropy":
            prior = mask_prior(state, mode, config.density)
    seed = derive_seed(config.seed, "train", instruction.server_round, pid)
    metrics = task.train(model, x, y, config, task.pick_device(config), seed=seed)
    model.cpu()
    return LocalRound(model, spec, prior, len(x), metrics)
