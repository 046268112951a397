"""Iterative Weight Recycling (Gorbett & Whitley, 2023), federated.

At a recycling round, inside every masked tensor, the ``recycle-fraction`` of weights with
the lowest global scores take copies of the values of the weights with the highest: a small
random network gets more of the values that proved useful, at no storage cost.

Every party must hold bitwise the same frozen weights, so the recycling is a pure function
of state all parties share: the global scores after that round's aggregation
(:func:`recycle_plan`). The sets it picks are pairs of bit masks per tensor (``low``,
``high``, equally many ones, disjoint); ``low``'s i-th entry in flat index order takes the
value of ``high``'s i-th. The server keeps the run's events (round and coded sets) as a
:class:`RecycleLog` and sends the whole log with every broadcast, so a client that missed
the recycling rounds (not sampled, joined late, a fresh process) replays it from the seed;
those bytes travel in the message and the ledger weighs them (``downlink_recycle_bytes``).
The sets are entropy-coded with the mask codec (about ``2 H(fraction)`` bits per weight
and event), so the log is small next to a float32 broadcast.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedmask.core.masking import original_tensor, regenerate_frozen, score_masks
from fedmask.wire.frame import Layout
from fedmask.wire.masks import FRAME, READABLE_FORMATS, decode_masks, encode_masks

RECORD = "recycle"  # the name of the broadcast's ArrayRecord that carries the log

if TYPE_CHECKING:
    from fedmask.config import RunConfig


def recycle_plan(state: dict[str, np.ndarray], fraction: float) -> dict[str, np.ndarray]:
    """The ``low`` and ``high`` sets (bool masks) of every tensor, from the global scores.

    Ranked by ``|score|`` with a stable sort (ties go to the lower flat index), so any
    party with the same float32 scores picks the same sets.
    """
    plan = {}
    for name, scores in sorted(state.items()):
        magnitude = np.abs(np.asarray(scores, dtype=np.float32)).ravel()
        count = int(fraction * magnitude.size)
        order = np.argsort(magnitude, kind="stable")
        low, high = np.zeros(magnitude.size, bool), np.zeros(magnitude.size, bool)
        low[order[:count]] = True
        high[order[magnitude.size - count:]] = True
        plan[f"{name}/high"] = high.reshape(scores.shape)
        plan[f"{name}/low"] = low.reshape(scores.shape)
    return plan


def plan_layout(state_layout: Layout) -> Layout:
    """The coded plan's tensors: ``name/high`` and ``name/low`` of every state tensor."""
    return Layout(tuple(sorted((f"{name}/{part}", shape) for name, shape in state_layout.shapes
                                   for part in ("high", "low"))))


def check_plan(plan: dict[str, np.ndarray], state_layout: Layout) -> None:
    """A decoded plan must pair every low weight with one high weight, in disjoint sets."""
    for name, _ in state_layout.shapes:
        low, high = plan[f"{name}/low"], plan[f"{name}/high"]
        if int(low.sum()) != int(high.sum()):
            raise FRAME.error(f"recycle '{name}'", f"as many high as low weights ({int(low.sum())})",
                                 int(high.sum()))
        if (low & high).any():
            raise FRAME.error(f"recycle '{name}'", "disjoint low and high sets", "overlapping sets")


@torch.no_grad()
def apply_plan(model: nn.Module, plan: dict[str, np.ndarray]) -> None:
    """Copy each tensor's high-score values onto its low-score weights, in place."""
    for name in score_masks(model):
        flat = original_tensor(model, name).view(-1)
        low = torch.as_tensor(np.flatnonzero(plan[f"{name}/low"].ravel()), device=flat.device)
        high = torch.as_tensor(np.flatnonzero(plan[f"{name}/high"].ravel()), device=flat.device)
        flat[low] = flat[high]


@dataclass
class RecycleLog:
    """The run's recycling events: (round, coded plan), oldest first."""

    events: list[tuple[int, np.ndarray]] = field(default_factory=list)

    def add(self, server_round: int, plan: dict[str, np.ndarray], state_layout: Layout,
            fingerprint: bytes) -> None:
        blob = encode_masks(plan, plan_layout(state_layout), fingerprint, codec="entropy")
        self.events.append((server_round, blob))

    def digests(self) -> tuple[str, ...]:
        """One digest per event, to tell which events a model has already applied."""
        return tuple(hashlib.sha256(f"{r}:".encode() + blob.tobytes()).hexdigest()[:16] for r, blob in self.events)

    def to_record(self) -> ArrayRecord:
        arrays = {"rounds": Array(np.array([r for r, _ in self.events], dtype=np.int64))}
        arrays |= {f"event-{i}": Array(blob) for i, (_, blob) in enumerate(self.events)}
        return ArrayRecord(arrays)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> RecycleLog:
        """From the record's (or a checkpoint's) arrays; says which field is wrong."""
        if "rounds" not in arrays:
            raise FRAME.error("recycle log", "an array 'rounds'", sorted(arrays))
        rounds = [int(r) for r in np.asarray(arrays["rounds"]).ravel()]
        missing = [f"event-{i}" for i in range(len(rounds)) if f"event-{i}" not in arrays]
        if missing or len(arrays) != len(rounds) + 1:
            raise FRAME.error("recycle log", f"'rounds' and event-0..event-{len(rounds) - 1}", sorted(arrays))
        return cls([(r, np.asarray(arrays[f"event-{i}"])) for i, r in enumerate(rounds)])

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {name: array.numpy() for name, array in self.to_record().items()}


def sync_frozen(model: nn.Module, log: RecycleLog, state_layout: Layout, fingerprint: bytes,
                seed: int, init: str) -> None:
    """Bring the model's frozen weights to what the log says, bit for bit.

    A model that applied a prefix of the log (the same process, a later round) applies
    the new events only; any other model regenerates its weights from the seed and replays
    every event, so the result never depends on which rounds this party saw.
    """
    wanted = log.digests()
    applied: tuple[str, ...] = getattr(model, "_recycled", ())
    if wanted[: len(applied)] != applied:
        regenerate_frozen(model, seed, init)
        applied = ()
    layout = plan_layout(state_layout)
    setattr(model, "_recycled", ("incomplete",))  # noqa: B010 - until done: a failure here forces a replay
    for (_, blob), digest in list(zip(log.events, wanted))[len(applied):]:
        plan = decode_masks(blob, layout, fingerprint, formats=READABLE_FORMATS)  # older checkpoints' logs
        check_plan(plan, state_layout)
        apply_plan(model, plan)
        applied = (*applied, digest)
    setattr(model, "_recycled", applied)  # noqa: B010 - a plain attribute, not a submodule


def is_recycle_round(config: RunConfig, server_round: int) -> bool:
    """Rounds ``recycle-every``, ``2 * recycle-every``, ... before the last one."""
    every = config.recycle_every
    return bool(every) and server_round % every == 0 and server_round < config.num_rounds
