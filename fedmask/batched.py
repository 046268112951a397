"""Several clients' local rounds as one batched computation (the ``batched`` engine).

The frozen weights are the same for every client of a round; only the scores differ. So
the scores of B clients are stacked (B, *shape) and one batched matmul per layer trains
all of them at once, on the CPU or on CUDA. What each client would have done alone is
kept: its own batch order (its randperm generator), its own mask samples (its own
generator, drawn in the order the one-at-a-time forward draws them: each Linear's weight,
then its bias), its own Adam (or SGD) state, its own loss, mean over its own batch. The
results equal the one-at-a-time path up to the summation order of the batched matmuls
(``tests/test_scale.py``: at least 99.9% of the mask entries agree after a round).

Supported: ``nn.Sequential`` models of ``Flatten``, ``Linear`` and ``ReLU`` (``mlp``,
``lenet-300-100``) with FedPM (``bernoulli``), edge-popup (``topk``) or ``biprop``
masks. :func:`unsupported` says why anything else is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn

from fedmask.config import RunConfig
from fedmask.core.masking import original_tensor
from fedmask.core.optimizers import adam_step, sgd_step
from fedmask.methods import MODES
from fedmask.methods.base import MaskMode

BATCHED_MODES = tuple(name for name, mode in MODES.items() if mode.batched)
BATCHED_MODELS = ("mlp", "lenet-300-100")


def unsupported(config: RunConfig, mode: str | None) -> str | None:
    """Why ``config`` cannot run batched (a sentence naming the key), or None."""
    if mode is None:
        return f"method {config.method!r} trains dense weights; batched clients train masks " \
               f"({', '.join(BATCHED_MODES)})"
    if not MODES[mode].batched:
        return f"method {config.method!r} trains {mode!r}; batched clients train {', '.join(BATCHED_MODES)} masks"
    if config.model not in BATCHED_MODELS:
        return f"model {config.model!r}: batched clients support {', '.join(BATCHED_MODELS)} (Linear layers)"
    if config.secure_aggregation:
        return "secure-aggregation runs Flower's SecAgg+ workflow, one client at a time"
    if config.fedpm_gradient != "straight-through" or config.biprop_gradient != "fedmask":
        return "fedpm-gradient/biprop-gradient 'reference': batched clients train with fedmask's gradients"
    return None


@dataclass
class _Layer:
    weight: torch.Tensor  # frozen (out, in)
    bias: torch.Tensor  # frozen (out,)
    names: tuple[str, str]  # the score tensors' names: weight, bias


@dataclass
class ClientResult:
    """One client's trained scores, metrics, and its generator after training (the
    upload's sample continues from it, as the one-at-a-time path continues torch's)."""

    scores: dict[str, np.ndarray]
    metrics: dict[str, float]
    generator: torch.Generator


def _layers(model: nn.Module) -> list[nn.Module | _Layer]:
    out: list[nn.Module | _Layer] = []
    for name, module in cast(nn.Sequential, model).named_children():
        if isinstance(module, nn.Linear):
            w, b = f"{name}.weight", f"{name}.bias"
            out.append(_Layer(original_tensor(model, w).detach(), original_tensor(model, b).detach(), (w, b)))
        elif isinstance(module, (nn.Flatten, nn.ReLU)):
            out.append(module)
        else:
            raise ValueError(f"batched clients: layer {name} ({type(module).__name__}) is not Flatten/Linear/ReLU")
    return out


def train_batched(
    model: nn.Module,
    scores: dict[str, np.ndarray],
    data: list[tuple[torch.Tensor, torch.Tensor]],
    seeds: list[int],
    config: RunConfig,
    device: torch.device,
    mode: MaskMode,
) -> list[ClientResult]:
    """Train ``len(data)`` clients from the same starting ``scores`` (the broadcast), each
    on its own data with its own seed, together; the model (masked by ``mode``) is only read."""
    layers = _layers(model)
    frozen = [(m.weight.to(device), m.bias.to(device)) if isinstance(m, _Layer) else None for m in layers]
    clients = len(data)
    params = {name: torch.as_tensor(value, dtype=torch.float32).to(device).expand(clients, *value.shape).clone()
              for name, value in scores.items()}
    for value in params.values():
        value.requires_grad_(True)
    sample_gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    upload_gens = sample_gens if device.type == "cpu" else [torch.Generator().manual_seed(s) for s in seeds]
    order_gens = [torch.Generator().manual_seed(s) for s in seeds]
    bs = config.batch_size
    # every client steps once per iteration until its own batches end, so the clients of
    # one iteration share their step count (Adam's bias correction)
    batches: list[list[torch.Tensor]] = []
    for (x, _), gen in zip(data, order_gens):
        own = []
        for _ in range(config.local_epochs):
            order = torch.randperm(len(x), generator=gen)
            own += [order[start : start + bs] for start in range(0, len(x), bs)]
        batches.append(own)
    optimizer = _Optimizer(config, params)
    totals = np.zeros((clients, 3))  # loss sum, correct, seen
    for step in range(max(len(b) for b in batches)):
        active = [i for i in range(clients) if step < len(batches[i])]
        idx = torch.tensor(active, device=device)
        sizes = [len(batches[i][step]) for i in active]
        width = max(sizes)
        xb = torch.stack([_padded(data[i][0][batches[i][step]], width) for i in active]).to(device)
        yb = torch.stack([_padded(data[i][1][batches[i][step]], width) for i in active]).to(device)
        valid = (torch.arange(width).unsqueeze(0) < torch.tensor(sizes).unsqueeze(1)).to(device)
        h = xb
        for layer, tensors in zip(layers, frozen):
            if isinstance(layer, _Layer):
                assert tensors is not None
                gens = [sample_gens[i] for i in active]
                weight = mode.batched_weight(tensors[0], _rows(params[layer.names[0]], idx, active), gens)
                bias = mode.batched_weight(tensors[1], _rows(params[layer.names[1]], idx, active), gens)
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            elif isinstance(layer, nn.Flatten):
                h = h.flatten(2)
            else:
                h = torch.relu(h)
        losses = nn.functional.cross_entropy(h.flatten(0, 1), yb.flatten(), reduction="none").view(len(active), width)
        per_client = (losses * valid).sum(1) / torch.tensor(sizes, device=device, dtype=losses.dtype)
        optimizer.zero_grad()
        per_client.sum().backward()
        optimizer.step(idx, step + 1)
        with torch.no_grad():
            correct = ((h.argmax(2) == yb) & valid).sum(1)
        for row, i in enumerate(active):
            totals[i] += (float(per_client[row].detach()) * sizes[row], int(correct[row]), sizes[row])
    results = []
    for i in range(clients):
        seen = max(totals[i, 2], 1)
        results.append(ClientResult(
            {name: value[i].detach().cpu().numpy().copy() for name, value in params.items()},
            {"train-loss": totals[i, 0] / seen, "train-accuracy": totals[i, 1] / seen},
            upload_gens[i]))
    return results


def _padded(value: torch.Tensor, width: int) -> torch.Tensor:
    if len(value) == width:
        return value
    pad = value.new_zeros((width - len(value), *value.shape[1:]))
    return torch.cat([value, pad])


def _rows(scores: torch.Tensor, idx: torch.Tensor, active: list[int]) -> torch.Tensor:
    """The active clients' rows of the stacked scores."""
    return scores if len(active) == scores.shape[0] else scores.index_select(0, idx)


class _Optimizer:
    """torch's fused Adam / SGD, per client: rows of the stacked scores step only when their
    client has a batch."""

    def __init__(self, config: RunConfig, params: dict[str, torch.Tensor]):
        self.config, self.params = config, params
        self.buffers = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in params.items()}
        self.started = False

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def step(self, idx: torch.Tensor, step: int) -> None:
        cfg = self.config
        steps: dict[torch.device, torch.Tensor] = {}  # Adam's step count, one tensor per device
        for name, param in self.params.items():
            full = len(idx) == param.shape[0]
            p = param if full else param.index_select(0, idx)
            grad = cast(torch.Tensor, param.grad)
            grad = grad if full else grad.index_select(0, idx)
            first, second = (b if full else b.index_select(0, idx) for b in self.buffers[name])
            # the kernels each client alone runs (fedmask.core.optimizers), elementwise: stacked, an
            # entry may round otherwise in the last bit (the CPU kernel's scalar tail loop)
            if cfg.optimizer == "adam":
                if p.device not in steps:
                    steps[p.device] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
                adam_step([p], [grad], [first], [second], [steps[p.device]], cfg.lr, cfg.weight_decay)
            else:
                sgd_step([p], [grad], [first], cfg.lr, cfg.momentum, cfg.weight_decay, first=step == 1)
            if not full:
                param.index_copy_(0, idx, p)
                self.buffers[name][0].index_copy_(0, idx, first)
                self.buffers[name][1].index_copy_(0, idx, second)
