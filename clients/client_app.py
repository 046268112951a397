"""The fedmask ClientApp: train scores locally, upload a packed mask, never weights.

Everything a client needs comes in the message: the global state (probabilities or
scores; dense weights for the FedAvg baseline) and a ConfigRecord with the run config,
the round and the partition id. The frozen weights are regenerated here from the seed.
"""

from __future__ import annotations

import functools

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmask import task
from fedmask.codec import choices_to_planes, encode_masks, mask_prior
from fedmask.downlink import decode_state
from fedmask.faults import SLOW_RECORD, attack_masks, attackers, client_fault, corrupt_upload
from fedmask.config import SCHEMA, resolve
from fedmask.data import client_split
from fedmask.masking import upload_arrays
from fedmask.recycling import RECORD, RecycleLog, sync_frozen
from fedmask.weights import derive_seed

app = ClientApp()


@functools.lru_cache(maxsize=2)
def _model_for(config_items: tuple) -> tuple[torch.nn.Module, task.ModelSpec | None]:
    """One model per process and config: regenerating frozen weights each round is waste."""
    config = dict(config_items)
    model = task.make_model(config, task.splits_of(config))
    spec = task.ModelSpec.of(config, model) if task.mask_mode_of(config) else None
    return model, spec


def _instruction(msg: Message) -> tuple[dict, int, int]:
    """The run config, round and partition id that the server put in the message."""
    received = msg.content["config"]
    config = resolve({key: received[key] for key in SCHEMA})
    config["mask-mode"] = str(received.get("mask-mode", ""))
    return config, int(received["server-round"]), int(received["partition-id"])


def _dense_upload(model: torch.nn.Module, corrupt: bool) -> ArrayRecord:
    weights = task.dense_state(model)
    if corrupt:  # a truncated tensor
        first = next(iter(weights))
        weights[first] = weights[first].ravel()[: weights[first].size // 2]
    return ArrayRecord({k: Array(v) for k, v in weights.items()})


def _mask_upload(model: torch.nn.Module, spec: task.ModelSpec, prior, config: dict,  # noqa: ANN001
                 server_round: int, pid: int, corrupt: bool) -> ArrayRecord:
    """A fresh Bernoulli sample (FedPM), the top-k mask (edge-popup, biprop) or the slot
    choices as bit-planes (Slot Machines), coded."""
    masks = upload_arrays(model)
    if task.mask_mode_of(config) == "slots":
        masks = choices_to_planes(masks, config["slots"])
    if pid in attackers(config):
        masks = attack_masks(masks, config, server_round, pid)
    blob = encode_masks(masks, spec.upload, spec.fingerprint, codec=config["uplink-codec"], prior=prior)
    if corrupt:
        blob, _ = corrupt_upload(blob, config, server_round, pid)
    return ArrayRecord({"mask": Array(blob)})


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, server_round, pid = _instruction(msg)
    torch.set_num_threads(config["num-cpus"])
    fault = client_fault(config, server_round, pid)
    if fault == "drop":  # the simulator's mark of a client that never answers (see ledger)
        return Message(RecordDict({}), reply_to=msg)
    if fault == "crash":
        raise RuntimeError(f"injected crash (fault-crash-rate) in round {server_round}, client {pid}")
    arrays = {name: array.numpy() for name, array in msg.content["arrays"].items()}
    recycle = msg.content.array_records.get(RECORD)
    recycle = None if recycle is None else {name: array.numpy() for name, array in recycle.items()}
    model, spec, prior, examples, metrics = local_round(config, server_round, pid, arrays, recycle)
    if spec is None:
        upload = _dense_upload(model, fault == "corrupt")
    else:
        upload = _mask_upload(model, spec, prior, config, server_round, pid, fault == "corrupt")
    reply = RecordDict({"arrays": upload, "metrics": MetricRecord({"num-examples": examples, **metrics})})
    if fault == "slow":  # delivered late by the server's grid (see faults.SLOW_RECORD)
        reply[SLOW_RECORD] = ConfigRecord({"delay": float(config["fault-slow-delay"])})
    return Message(reply, reply_to=msg)


def local_round(config: dict, server_round: int, pid: int, arrays: dict,  # noqa: ANN201
                recycle: dict | None = None):
    """Load the broadcast, train on this partition; returns (model, spec, prior, n, metrics).

    ``spec`` is None for the dense baseline; ``prior`` is what the entropy coder codes
    the mask against (the server holds the same broadcast, so it can decode it).
    ``recycle`` is the broadcast's weight-recycling log, replayed onto the frozen weights.
    """
    splits = task.splits_of(config)
    x, y = client_split(splits, pid, config["num-clients"], config["partitioner"], config["seed"],
                        config["dirichlet-alpha"], config["classes-per-client"])
    model, spec = _model_for(tuple(sorted(config.items())))
    mode = task.mask_mode_of(config)
    prior = None
    if mode is None:
        task.load_dense_state(model, arrays)
    else:
        state = decode_state(arrays, spec.layout)
        task.load_state(model, state, mode)
        if config["recycle-every"]:
            if recycle is None:
                raise ValueError("recycle-every is set but the broadcast carries no 'recycle' log")
            sync_frozen(model, RecycleLog.from_arrays(recycle), spec.layout, spec.fingerprint,
                        config["seed"], config["init"])
        if config["uplink-codec"] == "entropy":
            prior = mask_prior(state, mode, config["density"])
    seed = derive_seed(config["seed"], "train", server_round, pid)
    metrics = task.train(model, x, y, config, task.pick_device(config), seed=seed)
    model.cpu()
    return model, spec, prior, len(x), metrics
