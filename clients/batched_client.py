"""The ClientApp's train step for many clients at once (the ``batched`` engine).

A round's train instructions arrive together; each is read and checked as the ClientApp
reads it, faults are drawn per client as there, and the clients that train are trained
together (:func:`fedmask.batched.train_batched`): one batched computation per group of
clients that share a config and a broadcast. Every client then codes its own upload with
the ClientApp's own code (:func:`clients.local_round.reply_of`) and gets its own reply
message, so the server checks, decodes and weighs each exactly as from the other engines.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from flwr.app import Message, RecordDict

from clients.local_round import prepare_model, reply_of
from clients.received import ArraysKey
from fedmask import task
from fedmask.batched import train_batched, unsupported
from fedmask.core.masking import get_scores, set_scores
from fedmask.core.weights import derive_seed
from fedmask.faults import client_fault
from fedmask.protocol.instruction import TrainInstruction
from fedmask.recycling import RECORD

CLIENTS_PER_BATCH = 10  # clients trained in one batched computation (10 was faster than 50 on 2 CPU cores)

Reply = Message | Exception  # an exception becomes the engine's error reply


def train_many(messages: list[Message]) -> list[Reply]:
    """Replies to train messages, in their order."""
    replies: list[Reply | None] = [None] * len(messages)
    groups: dict[tuple, list[tuple[int, TrainInstruction, str | None]]] = {}
    for i, msg in enumerate(messages):
        try:
            instruction = TrainInstruction.from_flat(msg.content["config"])
            config, server_round, pid = instruction.config, instruction.server_round, instruction.partition_id
            why = unsupported(config, instruction.mask_mode)
            if why:
                raise ValueError(f"engine 'batched': {why}")
            fault = client_fault(config, server_round, pid)
            if fault == "drop":
                replies[i] = Message(RecordDict({}), reply_to=msg)
                continue
            if fault == "crash":
                raise RuntimeError(f"injected crash (fault-crash-rate) in round {server_round}, client {pid}")
        except Exception as err:  # as the ClientApp would raise it
            replies[i] = err
            continue
        records = msg.content.array_records
        broadcast = {f"arrays/{k}": a.numpy() for k, a in records["arrays"].items()}
        if RECORD in records:
            broadcast |= {f"{RECORD}/{k}": a.numpy() for k, a in records[RECORD].items()}
        key = (config, instruction.mask_mode, server_round, ArraysKey(broadcast))
        groups.setdefault(key, []).append((i, instruction, fault))
    for members in groups.values():
        for start in range(0, len(members), CLIENTS_PER_BATCH):
            _train_group(messages, members[start : start + CLIENTS_PER_BATCH], replies)
    return [r if r is not None else RuntimeError("no reply") for r in replies]


def _train_group(messages: list[Message], members: list[tuple[int, TrainInstruction, str | None]],
                 replies: list[Reply | None]) -> None:
    first_msg = messages[members[0][0]]
    instruction = members[0][1]
    config = instruction.config
    torch.set_num_threads(config.num_cpus)  # more threads lost time on the shared 2-core machine (bench/scale.py)
    arrays = {name: a.numpy() for name, a in first_msg.content.array_records["arrays"].items()}
    recycle = first_msg.content.array_records.get(RECORD)
    recycle_arrays = None if recycle is None else {name: a.numpy() for name, a in recycle.items()}
    try:
        start = prepare_model(instruction, arrays, recycle_arrays)
        assert start.mode is not None
        data = [task.client_data(config, ins.partition_id) for _, ins, _ in members]
        seeds = [derive_seed(config.seed, "train", ins.server_round, ins.partition_id) for _, ins, _ in members]
        results = train_batched(start.model, get_scores(start.model), data, seeds, config, task.pick_device(config),
                                start.mode)
    except Exception as err:  # every client of the group fails as it would alone
        for i, _, _ in members:
            replies[i] = err
        return
    for (i, ins, fault), result, (x, _) in zip(members, results, data):
        try:
            set_scores(start.model, result.scores)
            done = dataclasses.replace(start, num_examples=len(x), metrics=result.metrics)
            replies[i] = _with_generator(result.generator, functools.partial(reply_of, messages[i], ins, done, fault))
        except Exception as err:
            replies[i] = err


def _with_generator(generator: torch.Generator, make: Callable[[], Message]) -> Message:
    """Run ``make`` with torch's global CPU generator at ``generator``'s state: the upload's
    mask sample continues the client's own stream, as it does after one-at-a-time training."""
    saved = torch.get_rng_state()
    torch.set_rng_state(generator.get_state())
    try:
        return make()
    finally:
        torch.set_rng_state(saved)
