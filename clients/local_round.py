"""A client's round, from a decoded broadcast to the reply: load, train, code the upload.

Shared by the ClientApp (one client a message) and the batched engine (a round's clients
trained together, then each replied to as here). What a method changes comes from its
mask mode (:class:`fedmask.methods.base.MaskMode`): the masked layers, what is uploaded
and how it is coded; the dense baselines send their weights, or a compressed update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from clients.received import broadcast_of, model_for
from fedmask import downlink, task
from fedmask.core.weights import derive_seed
from fedmask.faults import SLOW_RECORD, attack_masks, attackers, corrupt_upload, poisoned
from fedmask.methods.base import MaskMode
from fedmask.protocol.instruction import TrainInstruction
from fedmask.protocol.placement import NODE_RECORD, TRAINED_RECORD, held_partition, node_info
from fedmask.recycling import RECORD as RECYCLE_RECORD
from fedmask.recycling import RecycleLog, sync_frozen
from fedmask.wire.frame import Layout
from fedmask.wire.masks import Prior


@dataclass
class LocalRound:
    """A client's round after training: what it uploads is derived from this."""

    model: torch.nn.Module
    mode: MaskMode | None  # None for the dense baselines
    spec: task.ModelSpec | None
    prior: Prior | None  # what the entropy coder codes the upload against (from the broadcast)
    num_examples: int
    metrics: dict[str, float]
    broadcast: dict[str, np.ndarray]  # the global state as decoded (dense weights for the baselines)


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


def answer_query(msg: Message, context: Context) -> Message:
    """What this node holds: its node config's partition-id and num-partitions (none in plain simulation)."""
    return Message(RecordDict({NODE_RECORD: ConfigRecord(node_info(context.node_config))}), reply_to=msg)


def prepare_model(instruction: TrainInstruction, arrays: dict[str, np.ndarray],
                  recycle: dict[str, np.ndarray] | None) -> LocalRound:
    """This process's model with the broadcast loaded (and the recycling log replayed);
    the round before training (no examples, no metrics yet)."""
    config = instruction.config
    mode = task.mode_of(config, instruction.mask_mode)
    model, spec = model_for(config, instruction.mask_mode)
    if mode is None or spec is None:
        task.load_dense_state(model, arrays)
        return LocalRound(model, None, None, None, 0, {}, arrays)
    broadcast = broadcast_of(config, mode, spec, arrays)
    mode.load_scores(model, broadcast.scores)
    if config.recycle_every:
        if recycle is None:
            raise ValueError("recycle-every is set but the broadcast carries no 'recycle' log")
        sync_frozen(model, RecycleLog.from_arrays(recycle), spec.layout, spec.fingerprint, config.seed, config.init)
    return LocalRound(model, mode, spec, broadcast.prior, 0, {}, broadcast.state)


def local_round(instruction: TrainInstruction, arrays: dict[str, np.ndarray],
                recycle: dict[str, np.ndarray] | None = None) -> LocalRound:
    """Load the broadcast, train on this partition (``recycle``: the broadcast's weight-recycling log)."""
    config, pid = instruction.config, instruction.partition_id
    done = prepare_model(instruction, arrays, recycle)
    x, y = task.client_data(config, pid)
    seed = derive_seed(config.seed, "train", instruction.server_round, pid)
    device = task.pick_device(config)
    metrics = task.train(done.model, x, y, config, device, seed, done.mode)
    if device.type != "cpu":  # back for coding; on the CPU the call would only walk the modules (1 ms)
        done.model.cpu()
    return dataclasses.replace(done, num_examples=len(x), metrics=metrics)


# ---------------------------------------------------------------- uploads

_EF_RECORD, _EF_OWNER = "error-feedback", "error-feedback-owner"  # a node's memory, and whose it is


def _poisoning(instruction: TrainInstruction) -> bool:
    config = instruction.config
    return config.attack == "poison" and instruction.partition_id in attackers(config)


def _local_weights(done: LocalRound, instruction: TrainInstruction, views: bool = False) -> dict[str, np.ndarray]:
    """The dense weights a client sends or codes: its own (``views``: of the model's memory,
    to be serialized before it trains again), or (a poisoning attacker) the broadcast plus
    a poisoned update."""
    local = task.dense_state(done.model, copy=not views)
    if not _poisoning(instruction):
        return local
    delta = {k: local[k].astype(np.float32) - np.asarray(done.broadcast[k], dtype=np.float32) for k in local}
    return {k: (np.asarray(done.broadcast[k], dtype=np.float32) + v).astype(local[k].dtype)
            if local[k].dtype.kind == "f" else local[k] for k, v in poisoned(delta).items()}


def _dense_upload(done: LocalRound, instruction: TrainInstruction, corrupt: bool) -> ArrayRecord:
    weights = _local_weights(done, instruction, views=True)  # an Array holds its own bytes
    if corrupt:  # a truncated tensor
        first = next(iter(weights))
        weights[first] = weights[first].ravel()[: weights[first].size // 2]
    return ArrayRecord({k: Array(v) for k, v in weights.items()})


def compressed_upload(done: LocalRound, instruction: TrainInstruction, context: Context, corrupt: bool) -> ArrayRecord:
    """A compressed dense baseline's upload: ``delta = local - broadcast`` (plus the error
    memory this node keeps in ``context.state`` for error-feedback methods), coded."""
    config, server_round, pid = instruction.config, instruction.server_round, instruction.partition_id
    coding = config.method_entry.compression(config)
    assert coding is not None
    local = _local_weights(done, instruction)
    owner = context.state.config_records.get(_EF_OWNER)
    memory = None
    if coding.error_feedback and owner is not None and owner.get("partition-id") == pid and not _poisoning(instruction):
        memory = {k: a.numpy() for k, a in context.state.array_records[_EF_RECORD].items()}
    layout = Layout.from_arrays(local)
    rng = np.random.default_rng(derive_seed(config.seed, "compress", server_round, pid))
    blob, memory = coding.upload(local, done.broadcast, memory, layout,
                                 layout.fingerprint(config.seed, config.model, "dense"), rng, (server_round, pid))
    if memory is not None and not _poisoning(instruction):  # an attacker keeps no memory of its crafted updates
        context.state[_EF_RECORD] = ArrayRecord({k: Array(v) for k, v in memory.items()})
        context.state[_EF_OWNER] = ConfigRecord({"partition-id": pid})
    if corrupt:
        blob, _ = corrupt_upload(blob, config, server_round, pid)
    return ArrayRecord({"update": Array(blob)})


def _mask_upload(done: LocalRound, instruction: TrainInstruction, corrupt: bool) -> ArrayRecord:
    """The mode's upload (a fresh Bernoulli sample, the top-k mask, the slot choices as
    bit-planes, LaPerm's ranks), a Byzantine client's instead, coded."""
    config, server_round, pid = instruction.config, instruction.server_round, instruction.partition_id
    mode, spec = done.mode, done.spec
    assert mode is not None and spec is not None
    codec = mode.uplink_codec(config.uplink_codec)
    probabilities = codec == "relative-entropy"
    if mode.has_mask and pid in attackers(config):
        crafted = mode.colluding_upload(done.broadcast) if config.attack == "colluding" else None
        lie = attack_masks(mode.upload(done.model), config, server_round, pid, crafted)
        upload = {k: v.astype(np.float64) for k, v in lie.items()} if probabilities else lie  # a certain "sample"
    else:
        upload = mode.upload(done.model, probabilities)
    # the upload's own randomness: LaPerm's stochastic rounding, the relative-entropy coder's choice
    rng = np.random.default_rng(derive_seed(config.seed, "laperm-rank-step", server_round, pid))
    blob = mode.encode_upload(upload, spec.upload, spec.fingerprint, codec, done.prior, rng,
                              (server_round, pid))
    if corrupt:
        blob, _ = corrupt_upload(blob, config, server_round, pid)
    return ArrayRecord({"mask": Array(blob)})


def reply_of(msg: Message, instruction: TrainInstruction, done: LocalRound, fault: str | None,
             upload: ArrayRecord | None = None, confirm: ConfigRecord | None = None) -> Message:
    """The reply to a train instruction after its local round: the coded upload (``upload``
    when the caller coded it already) and the metrics."""
    config, pid = instruction.config, instruction.partition_id
    if upload is None and done.mode is None:
        upload = _dense_upload(done, instruction, fault == "corrupt")
    elif upload is None:
        upload = _mask_upload(done, instruction, fault == "corrupt")
    reply = RecordDict({"arrays": upload, "metrics": MetricRecord({"num-examples": done.num_examples,
                                                                   **done.metrics}),
                        TRAINED_RECORD: ConfigRecord({"partition-id": pid})})
    if confirm is not None:  # the server learns what this node holds only from this
        reply[downlink.CONFIRM] = confirm
    if fault == "slow":  # delivered late by the server's grid (see faults.SLOW_RECORD)
        reply[SLOW_RECORD] = ConfigRecord({"delay": config.fault_slow_delay})
    return Message(reply, reply_to=msg)


def recycle_log(msg: Message) -> dict[str, np.ndarray] | None:
    """The broadcast's weight-recycling log, if it carries one."""
    record = msg.content.array_records.get(RECYCLE_RECORD)
    return None if record is None else {name: array.numpy() for name, array in record.items()}
