"""The ClientApp's train step for many clients at once (the ``batched`` engine).

A round's train instructions arrive together; each is read and checked as the ClientApp
reads it, faults are drawn per client as there, and the clients that train are trained
together (:func:`fedmask.batched.train_batched`): one batched computation per group of
clients that share a config and a broadcast. A lossless broadcast is received per node, by
the node's own Context (:func:`clients.received.receive_lossless`, as the ClientApp
receives it), and the clients whose nodes end with the same state train together. Every
client then codes its own upload with
the ClientApp's own code (:func:`clients.local_round.reply_of`) and gets its own reply
message, so the server checks, decodes and weighs each exactly as from the other engines.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients.local_round import prepare_model, reply_of
from clients.received import ArraysKey, receive_lossless
from fedmask import downlink, task
from fedmask.batched import train_batched, unsupported
from fedmask.core.masking import get_scores, set_scores
from fedmask.core.threads import use_threads
from fedmask.core.weights import derive_seed
from fedmask.faults import client_fault
from fedmask.protocol.instruction import TrainInstruction
from fedmask.recycling import RECORD

CLIENTS_PER_BATCH = 10  # clients trained in one batched computation (10 was faster than 50 on 2 CPU cores)

Reply = Message | Exception  # an exception becomes the engine's error reply


@dataclasses.dataclass
class _Member:
    """One client of a group: its message's index, instruction, fault, the state it trains
    from and, under the lossless downlink, the reply's confirmation of what its node holds."""

    index: int
    instruction: TrainInstruction
    fault: str | None
    arrays: dict[str, np.ndarray]
    confirm: ConfigRecord | None


def train_many(messages: list[Message], contexts: Sequence[Context]) -> list[Reply]:
    """Replies to train messages, in their order; ``contexts[i]`` is the Context of the node
    message ``i`` goes to (where a node keeps the state of the lossless downlink)."""
    replies: list[Reply | None] = [None] * len(messages)
    groups: dict[tuple, list[_Member]] = {}
    for i, (msg, context) in enumerate(zip(messages, contexts)):
        try:
            member = _received(i, msg, context)
        except Exception as err:  # as the ClientApp would raise it
            replies[i] = err
            continue
        if member is None:  # a dropped client: the simulator's mark of one that never answers
            replies[i] = Message(RecordDict({}), reply_to=msg)
            continue
        broadcast = {f"arrays/{k}": a for k, a in member.arrays.items()}
        recycle = msg.content.array_records.get(RECORD)
        if recycle is not None:
            broadcast |= {f"{RECORD}/{k}": a.numpy() for k, a in recycle.items()}
        ins = member.instruction
        key = (ins.config, ins.mask_mode, ins.server_round, ArraysKey(broadcast))
        groups.setdefault(key, []).append(member)
    for members in groups.values():
        for start in range(0, len(members), CLIENTS_PER_BATCH):
            _train_group(messages, members[start : start + CLIENTS_PER_BATCH], replies)
    return [r if r is not None else RuntimeError("no reply") for r in replies]


def _received(index: int, msg: Message, context: Context) -> _Member | None:
    """A train message read as the ClientApp reads it: the instruction, the client's fault
    (None back: dropped), and the state it trains from; a lossless broadcast is received by
    the node's own Context, as the ClientApp receives it."""
    instruction = TrainInstruction.from_flat(msg.content["config"])
    config, server_round, pid = instruction.config, instruction.server_round, instruction.partition_id
    why = unsupported(config, instruction.mask_mode)
    if why:
        raise ValueError(f"engine 'batched': {why}")
    fault = client_fault(config, server_round, pid)
    if fault == "drop":
        return None
    if fault == "crash":
        raise RuntimeError(f"injected crash (fault-crash-rate) in round {server_round}, client {pid}")
    arrays = {name: a.numpy() for name, a in msg.content.array_records["arrays"].items()}
    confirm = None
    if downlink.RECORD in arrays:
        arrays, confirm = receive_lossless(arrays[downlink.RECORD], instruction, context)
    return _Member(index, instruction, fault, arrays, confirm)


def _train_group(messages: list[Message], members: list[_Member], replies: list[Reply | None]) -> None:
    first = members[0]
    instruction = first.instruction
    config = instruction.config
    use_threads(config.num_cpus)  # more threads lost time on the shared 2-core machine (bench/scale.py)
    recycle = messages[first.index].content.array_records.get(RECORD)
    recycle_arrays = None if recycle is None else {name: a.numpy() for name, a in recycle.items()}
    try:
        start = prepare_model(instruction, first.arrays, recycle_arrays)
        assert start.mode is not None
        data = [task.client_data(config, m.instruction.partition_id) for m in members]
        seeds = [derive_seed(config.seed, "train", m.instruction.server_round, m.instruction.partition_id)
                 for m in members]
        results = train_batched(start.model, get_scores(start.model), data, seeds, config, task.pick_device(config),
                                start.mode)
    except Exception as err:  # every client of the group fails as it would alone
        for member in members:
            replies[member.index] = err
        return
    for member, result, (x, _) in zip(members, results, data):
        try:
            set_scores(start.model, result.scores)
            done = dataclasses.replace(start, num_examples=len(x), metrics=result.metrics)
            replies[member.index] = _with_generator(result.generator, functools.partial(
                reply_of, messages[member.index], member.instruction, done, member.fault, confirm=member.confirm))
        except Exception as err:
            replies[member.index] = err


def _with_generator(generator: torch.Generator, make: Callable[[], Message]) -> Message:
    """Run ``make`` with torch's global CPU generator at ``generator``'s state: the upload's
    mask sample continues the client's own stream, as it does after one-at-a-time training."""
    saved = torch.get_rng_state()
    torch.set_rng_state(generator.get_state())
    try:
        return make()
    finally:
        torch.set_rng_state(saved)
