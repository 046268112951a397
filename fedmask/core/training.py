"""The one local training loop, and evaluation.

Whatever is trainable is trained: the scores of a masked model, or the weights of the dense
baseline. A mask mode may bring its own optimizer and a hook after each step (LaPerm's
inner Adam and its rewiring, :mod:`fedmask.methods.laperm`); everything else is the same
loop for every method, so they are measured alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedmask.core.optimizers import FusedAdam, FusedSGD, fusable


@functools.lru_cache(maxsize=1)
def _accelerators() -> bool:
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def seed_torch(seed: int) -> None:
    """``torch.manual_seed(seed)``, without its cost on a machine with no accelerator: there it
    seeds the CPU generator, as ``manual_seed`` does, but skips queuing a CUDA seeding that
    captures the caller's stack every time (0.1 ms from a shallow stack; inside a Ray
    worker, 5% of a LeNet-300-100 client's round)."""
    if _accelerators():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)

Optimizer = Any  # FusedAdam, FusedSGD or a torch.optim optimizer: zero_grad() and step()


@dataclass(frozen=True)
class LocalTraining:
    """How a client trains in one round (the run config's local keys)."""

    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "adam"  # adam | sgd
    lr: float = 0.1
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0

    def make_optimizer(self, params: Sequence[torch.Tensor]) -> Optimizer:
        """torch's fused Adam or SGD kernels (:mod:`fedmask.core.optimizers`), or torch.optim for
        tensors one fused call cannot take (torch.optim's first use imports torch._dynamo)."""
        params = list(params)
        if not fusable(params):
            if self.optimizer == "adam":
                return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.optimizer == "adam":
            return FusedAdam(params, lr=self.lr, weight_decay=self.weight_decay)
        return FusedSGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


class LocalLoop:
    """Epochs over a client's data with one optimizer, one batch-order generator and one
    step count throughout (a client builds one per round; LaPerm's central benchmark one
    per run)."""

    def __init__(self, model: nn.Module, device: torch.device, optimizer: Optimizer, generator: torch.Generator,
                 after_step: Callable[[int], None] | None = None):
        self.model, self.device, self.optimizer, self.generator = model, device, optimizer, generator
        self.after_step, self.steps = after_step, 0
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0  # over every epoch so far

    def metrics(self) -> dict[str, float]:
        """The mean loss and accuracy over every batch so far."""
        return {"train-loss": self.loss_sum / max(self.seen, 1), "train-accuracy": self.correct / max(self.seen, 1)}

    def epoch(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        """One pass over ``x, y`` in a fresh random order."""
        self.model.train()
        order = torch.randperm(len(x), generator=self.generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx].to(self.device), y[idx].to(self.device)
            self.optimizer.zero_grad()
            out = self.model(xb)
            loss = nn.functional.cross_entropy(out, yb)
            loss.backward()
            self.optimizer.step()
            self.steps += 1
            if self.after_step is not None:
                self.after_step(self.steps)
            self.loss_sum += loss.item() * len(idx)
            self.correct += int((out.argmax(1) == yb).sum())
            self.seen += len(idx)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, training: LocalTraining, device: torch.device,
          seed: int, optimizer: Callable[[list[torch.Tensor]], Optimizer] | None = None,
          after_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """``training.epochs`` passes over ``x, y`` in batches; the mean loss and accuracy seen.

    ``seed`` fixes the batch order and every sample drawn by torch's global generator (FedPM's
    masks), so one client's round is reproducible wherever it runs. ``optimizer`` builds the
    optimizer of the trainable tensors (default: ``training.make_optimizer``); ``after_step``
    is called with the number of steps taken after each one.
    """
    seed_torch(seed)
    model.to(device).train()
    opt = (optimizer or training.make_optimizer)([p for p in model.parameters() if p.requires_grad])
    loop = LocalLoop(model, device, opt, torch.Generator().manual_seed(seed), after_step)
    for _ in range(training.epochs):
        loop.epoch(x, y, training.batch_size)
    return loop.metrics()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device,
             seed: int = 0) -> tuple[float, float]:
    """(mean loss, accuracy) on ``x, y`` in eval mode; ``seed`` fixes sampled eval masks."""
    seed_torch(seed)
    model.to(device).eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        out = model(xb)
        total_loss += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    return total_loss / len(x), correct / len(x)
