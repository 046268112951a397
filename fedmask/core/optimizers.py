"""Local training's Adam and SGD: torch's fused kernels, called without ``torch.optim``.

Why not ``torch.optim``: its first use in a process imports ``torch._dynamo`` (about 2.6 s on
this project's 2-core machine), and every process that trains pays it: each Ray worker, the
in-process and batched engines, the quickstart. These classes keep the optimizer state
themselves and call the kernels ``torch.optim.Adam(fused=True)`` and
``torch.optim.SGD(fused=True)`` call, so a step gives the same bits as those
(``tests/test_scale.py`` checks it). Against torch's default (unfused) optimizers, a value may
differ in the last bit: the CPU kernel computes each tensor's last ``numel % 8`` entries in a
scalar loop that rounds otherwise (SGD without momentum gives the same bits). So FedPM and
FedAvg runs moved in the last digits when fedmask switched to these kernels. Fused, a step is
one pass over each tensor instead of one per operation: LeNet-300-100's Adam step takes 0.24 ms
instead of 0.67.

Only what local training uses: constant learning rate, L2 weight decay, SGD momentum
without dampening or Nesterov; floating-point tensors of one dtype on one CPU or CUDA device
(:func:`fusable`), every one with a gradient from the first step on (autograd's, in the
tensor's own layout).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as local training always used them
ADAM_EPS = 1e-8
ACCEPTED = "parameters must be floating-point tensors of one dtype, on one CPU or CUDA device"


def fusable(params: Sequence[torch.Tensor]) -> bool:
    """Whether one fused kernel call takes ``params``: floating point, on the CPU or CUDA, all of
    one dtype and device (torch.optim groups a mixed list first; the CUDA kernel refuses one)."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) \
        and len({(p.dtype, p.device) for p in params}) == 1


class _Fused:
    """What both optimizers share: the tensors (checked), ``zero_grad``, and which tensors have
    a gradient this step (the others are left as they are, as in torch)."""

    def __init__(self, params: Iterable[torch.Tensor]):
        self.params = list(params)
        if not fusable(self.params):
            raise ValueError(f"{type(self).__name__}: {ACCEPTED}")

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _live(self) -> list[int]:
        return [i for i, p in enumerate(self.params) if p.grad is not None]


class FusedAdam(_Fused):
    """Adam (L2 ``weight_decay`` added to the gradient, as ``torch.optim.Adam``)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, weight_decay: float = 0.0):
        super().__init__(params)
        self.lr, self.weight_decay = lr, weight_decay
        self.first = [torch.zeros_like(p) for p in self.params]
        self.second = [torch.zeros_like(p) for p in self.params]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        live = self._live()
        for i in live:
            self.steps[i] += 1
        adam_step([self.params[i] for i in live], [self.params[i].grad for i in live],  # type: ignore[misc]
                  [self.first[i] for i in live], [self.second[i] for i in live], [self.steps[i] for i in live],
                  self.lr, self.weight_decay)


def adam_step(params: list[torch.Tensor], grads: list[torch.Tensor], first: list[torch.Tensor],
              second: list[torch.Tensor], steps: list[torch.Tensor], lr: float, weight_decay: float) -> None:
    """torch's fused Adam kernel over tensors already stepped to ``steps`` (1 on the first)."""
    if params:
        torch._fused_adam_(params, grads, first, second, [], steps, lr=lr, beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1],
                           weight_decay=weight_decay, eps=ADAM_EPS, amsgrad=False, maximize=False)


class FusedSGD(_Fused):
    """SGD with heavy-ball ``momentum`` (the first step's buffer is the gradient) and L2
    ``weight_decay``, as ``torch.optim.SGD`` with dampening 0."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)  # made on the first step, as torch does

    @torch.no_grad()
    def step(self) -> None:
        live = self._live()
        if not live:
            return
        buffers = [self.buffers[i] for i in live]
        first = self.momentum != 0 and all(b is None for b in buffers)
        if first:
            for i in live:
                self.buffers[i] = torch.empty_like(self.params[i])
        elif self.momentum != 0 and any(b is None for b in buffers):
            raise ValueError("FusedSGD: a tensor got its first gradient after the first step")
        sgd_step([self.params[i] for i in live], [self.params[i].grad for i in live],  # type: ignore[misc]
                 [self.buffers[i] for i in live], self.lr, self.momentum, self.weight_decay, first)  # type: ignore[misc]


def sgd_step(params: list[torch.Tensor], grads: list[torch.Tensor], buffers: list[torch.Tensor], lr: float,
             momentum: float, weight_decay: float, first: bool) -> None:
    """torch's fused SGD kernel (dampening 0, no Nesterov); ``buffers`` are the momentum
    buffers (ignored without momentum), ``first`` whether this is their first step."""
    torch._fused_sgd_(params, grads, buffers if momentum != 0 else [], weight_decay=weight_decay, momentum=momentum,
                      lr=lr, dampening=0.0, nesterov=False, maximize=False, is_first_step=first)
