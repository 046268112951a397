"""The fedmask ClientApp: train scores locally, upload a coded mask, never weights.

Everything a client needs comes in the message: the global state (probabilities or
scores; dense weights for the FedAvg baseline) and a :class:`TrainInstruction` (the run
config, the round, the partition id and the mask mode). The frozen weights are
regenerated here from the seed.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmask import task
from fedmask.codec import Prior, choices_to_planes, encode_masks, mask_prior
from fedmask.config import RunConfig
from fedmask.data import client_split
from fedmask.downlink import decode_state
from fedmask.faults import SLOW_RECORD, attack_masks, attackers, client_fault, corrupt_upload
from fedmask.instruction import TrainInstruction
from fedmask.masking import set_scores, upload_arrays
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


_BROADCASTS: dict[tuple, Broadcast] = {}  # by (config, mode, digest of the arrays); newest last
_BROADCASTS_KEPT = 2


def arrays_digest(arrays: dict[str, np.ndarray]) -> bytes:
    """A digest of named arrays: names, dtypes, shapes and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes() if value.ndim == 0 else value.view(np.uint8).data)
    return digest.digest()


def broadcast_of(config: RunConfig, mode: str, spec: task.ModelSpec, arrays: dict[str, np.ndarray]) -> Broadcast:
    """The broadcast decoded once per process and round, not once per client: a round's
    clients get the same arrays, found again here by a digest of their bytes."""
    key = (config, mode, arrays_digest(arrays))
    found = _BROADCASTS.get(key)
    if found is None:
        state = decode_state(arrays, spec.layout)
        prior = mask_prior(state, mode, config.density) if config.uplink_codec == "entropy" else None
        found = Broadcast(state, task.scores_of_state(state, mode), prior)
        while len(_BROADCASTS) >= _BROADCASTS_KEPT:
            del _BROADCASTS[next(iter(_BROADCASTS))]
        _BROADCASTS[key] = found
    return found


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
    recycle = msg.content.array_records.get(RECORD)
    recycle_arrays = None if recycle is None else {name: array.numpy() for name, array in recycle.items()}
    done = local_round(instruction, arrays, recycle_arrays)
    return reply_of(msg, instruction, done, fault)


def reply_of(msg: Message, instruction: TrainInstruction, done: LocalRound, fault: str | None) -> Message:
    """The reply to a train instruction after its local round: the coded upload and metrics."""
    config = instruction.config
    if done.spec is None:
        upload = _dense_upload(done.model, fault == "corrupt")
    else:
        upload = _mask_upload(done, instruction, fault == "corrupt")
    reply = RecordDict({"arrays": upload, "metrics": MetricRecord({"num-examples": done.num_examples,
                                                                   **done.metrics})})
    if fault == "slow":  # delivered late by the server's grid (see faults.SLOW_RECORD)
        reply[SLOW_RECORD] = ConfigRecord({"delay": config.fault_slow_delay})
    return Message(reply, reply_to=msg)


def local_round(instruction: TrainInstruction, arrays: dict[str, np.ndarray],
                recycle: dict[str, np.ndarray] | None = None) -> LocalRound:
    """Load the broadcast, train on this partition.

    ``recycle`` is the broadcast's weight-recycling log, replayed onto the frozen weights.
    """
    config, pid = instruction.config, instruction.partition_id
    model, spec, prior = prepare_model(instruction, arrays, recycle)
    x, y = client_data(instruction)
    seed = derive_seed(config.seed, "train", instruction.server_round, pid)
    metrics = task.train(model, x, y, config, task.pick_device(config), seed=seed)
    model.cpu()
    return LocalRound(model, spec, prior, len(x), metrics)


def client_data(instruction: TrainInstruction) -> tuple[torch.Tensor, torch.Tensor]:
    """The instruction's partition of the training split."""
    config = instruction.config
    return client_split(task.splits_of(config), instruction.partition_id, config.num_clients, config.partitioner,
                        config.seed, config.dirichlet_alpha, config.classes_per_client)


def prepare_model(instruction: TrainInstruction, arrays: dict[str, np.ndarray],
                  recycle: dict[str, np.ndarray] | None) -> tuple[torch.nn.Module, task.ModelSpec | None, Prior | None]:
    """This process's model with the broadcast loaded (and the recycling log replayed);
    the prior the upload is coded against."""
    config, mode = instruction.config, instruction.mask_mode
    model, spec = _model_for(config, mode)
    if mode is None or spec is None:
        task.load_dense_state(model, arrays)
        return model, spec, None
    broadcast = broadcast_of(config, mode, spec, arrays)
    set_scores(model, broadcast.scores)
    if config.recycle_every:
        if recycle is None:
            raise ValueError("recycle-every is set but the broadcast carries no 'recycle' log")
        sync_frozen(model, RecycleLog.from_arrays(recycle), spec.layout, spec.fingerprint,
                    config.seed, config.init)
    return model, spec, broadcast.prior
