"""Masked layers as a parametrization: ``weight = f(frozen, scores)``, on any model.

Any model built from ``nn.Linear`` and ``nn.Conv2d`` becomes a masked model through
:func:`to_masked`; no layer class is copied. Every weight and bias is overwritten with its
seeded frozen value (:class:`SeededTensor`), frozen, and parametrized by the module a mask
mode makes for it (:meth:`fedmask.methods.base.MaskMode.parametrize`): FedPM's Bernoulli
sample, edge-popup's top-k, Biprop's scaled top-k, Slot Machines' choice among K seeded
candidates, LaPerm's arrangement. The frozen tensor stays the parametrization's
``original`` (never trained, never sent); the only trainable tensors are the ``scores``
of a :class:`MaskedTensor`. What each mode does lives in its module under
:mod:`fedmask.methods`; here is only what every mode shares.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from fedmask.core.weights import derive_seed, fan_in, fan_out, frozen_tensor
from fedmask.names import BATCHNORMS


class StraightThrough(torch.autograd.Function):
    """Forward: a value computed beforehand (a sample, a top-k mask); backward: the gradient
    to ``source`` unchanged."""

    @staticmethod
    def forward(ctx: Any, source: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return value

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class MaskedTensor(nn.Module):
    """A parametrization that trains ``scores`` over a frozen tensor (its ``original``)."""

    scores: nn.Parameter

    def frozen_values(self, original: torch.Tensor) -> torch.Tensor:
        """The frozen values every party must hold alike: the ``original`` (Slot Machines: the candidates)."""
        return original


@dataclass(frozen=True)
class SeededTensor:
    """One Linear/Conv2d tensor as a mask mode sees it: its name, shape and layer fans,
    and the run's seed and init, from which every party draws the same values."""

    name: str
    shape: tuple[int, ...]
    fan_in: int
    fan_out: int
    seed: int
    init: str

    def frozen(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The seeded frozen values (``shape``: another shape drawn from the same stream, e.g. K candidates)."""
        return frozen_tensor(self.seed, self.name, shape or self.shape, self.fan_in, self.init, self.fan_out)

    def generator(self, purpose: str = "scores") -> torch.Generator:
        """A CPU generator seeded by (seed, tensor, purpose): the scores' initial values."""
        return torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, self.name, purpose))


class Parametrizer(Protocol):
    """What :func:`to_masked` needs of a mask mode."""

    def parametrize(self, tensor: SeededTensor) -> tuple[nn.Module, torch.Tensor]:
        """The parametrization of one tensor, and the values its ``original`` takes."""


def maskable(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(``"1.weight"``, module, ``"weight"``) for every weight and bias of a Linear/Conv2d."""
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            for tensor_name in ("weight", "bias"):
                if getattr(module, tensor_name, None) is not None:
                    prefix = f"{module_name}." if module_name else ""
                    yield f"{prefix}{tensor_name}", module, tensor_name


def _freeze_batchnorm(model: nn.Module, batchnorm: str = "stateless") -> None:
    """Swap BatchNorm for a non-affine one (no trained scale or shift, as edge-popup's reference).

    ``stateless`` (fedmask's default) uses batch statistics only, also in evaluation:
    running statistics would be per-party floats that neither masks nor the seed carry.
    ``running`` keeps running statistics for evaluation, as edge-popup's reference does;
    federated runs refuse it (no upload carries them; :func:`check_batchnorm`), the central
    training of the benchmark can use it.
    """
    if batchnorm not in BATCHNORMS:
        raise ValueError(f"batchnorm: expected one of {', '.join(BATCHNORMS)}, got {batchnorm!r}")
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, child_name,
                        nn.BatchNorm2d(child.num_features, affine=False, track_running_stats=batchnorm == "running"))


def to_masked(model: nn.Module, mode: Parametrizer, seed: int, init: str = "signed-kaiming-constant",
              batchnorm: str = "stateless") -> nn.Module:
    """Turn a plain model into a masked one, in place, and return it.

    Every Linear/Conv2d weight and bias is frozen and parametrized by ``mode``, so that the
    whole masked model is a function of ``seed`` alone.
    """
    _freeze_batchnorm(model, batchnorm)
    for name, module, tensor_name in list(maskable(model)):
        param = getattr(module, tensor_name)
        weight_shape = tuple(cast(torch.Tensor, module.weight).shape)
        param.requires_grad_(False)
        tensor = SeededTensor(name, tuple(param.shape), fan_in(weight_shape), fan_out(weight_shape), seed, init)
        parametrization, original = mode.parametrize(tensor)
        with torch.no_grad():
            param.copy_(original)
        parametrize.register_parametrization(module, tensor_name, parametrization)
    leftover = [n for n, p in model.named_parameters() if p.requires_grad and "scores" not in n]
    if leftover:
        raise ValueError(
            f"model has trainable tensors that masks cannot carry: {', '.join(leftover)}; "
            "masked models may only contain Linear/Conv2d (and BatchNorm, made stateless)"
        )
    return model


def check_batchnorm(batchnorm: str, model: str) -> None:
    """Federated runs refuse running BatchNorm statistics (a ValueError naming the key):
    each party's statistics would come from its own data and no upload carries them. Only
    resnet18 has BatchNorm (the conv nets, as edge-popup's reference Conv2/4/6, have none)."""
    if batchnorm == "running" and model == "resnet18":
        raise ValueError("batchnorm: 'running' keeps per-party running statistics that no upload carries; "
                         "federated runs need 'stateless' (the benchmark's central training can use 'running')")


def score_masks(model: nn.Module) -> dict[str, Any]:
    """The model's parametrizations by tensor name (``"0.weight"``), in a fixed order."""
    found = {}
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor_name, plist in module.parametrizations.items():
                prefix = f"{module_name}." if module_name else ""
                found[f"{prefix}{tensor_name}"] = plist[0]
    return dict(sorted(found.items()))


def original_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The parametrization's ``original`` of tensor ``name`` (the frozen values, in place)."""
    module_name, _, tensor_name = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return cast(torch.Tensor, _parametrizations(module)[tensor_name].original)


def _parametrizations(module: nn.Module) -> Any:
    """The ModuleDict that ``parametrize`` adds to a module (untyped in torch's stubs)."""
    return cast(Any, module).parametrizations


def frozen_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen tensors (Slot Machines: the K candidates), for checking that parties
    agree bit for bit."""
    return {name: module.frozen_values(original_tensor(model, name)).detach()
            for name, module in score_masks(model).items()}


@torch.no_grad()
def regenerate_frozen(model: nn.Module, seed: int, init: str) -> None:
    """Put back the seeded frozen values (undoing weight recycling), as :func:`to_masked` drew them."""
    for name, module, tensor_name in maskable(model):
        original = _parametrizations(module)[tensor_name].original
        weight_shape = tuple(_parametrizations(module)["weight"].original.shape)
        values = frozen_tensor(seed, name, tuple(original.shape), fan_in(weight_shape), init, fan_out(weight_shape))
        original.copy_(values.to(original.device))


def num_connections(model: nn.Module) -> int:
    """Masked (or chosen) weights in the model: what a bit-per-parameter figure divides by."""
    return sum(original_tensor(model, name).numel() for name in score_masks(model))


def get_scores(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: m.scores.detach().cpu().numpy().copy() for n, m in score_masks(model).items()}


def set_scores(model: nn.Module, scores: dict[str, np.ndarray]) -> None:
    masks = score_masks(model)
    if set(scores) != set(masks):
        raise ValueError(f"scores: expected tensors {sorted(masks)}, got {sorted(scores)}")
    for name, module in masks.items():
        if tuple(np.shape(scores[name])) != tuple(module.scores.shape):
            raise ValueError(
                f"scores['{name}']: expected shape {tuple(module.scores.shape)}, got {np.shape(scores[name])}"
            )
    with torch.no_grad():
        for name, module in masks.items():
            module.scores.copy_(torch.as_tensor(scores[name], device=module.scores.device))


def topk_mask_np(magnitude: np.ndarray, density: float) -> np.ndarray:
    """The top-k selection in numpy, for parties that agree on it without torch.

    The server's aggregation and both ends of the entropy coder must pick the same weights
    bit for bit; numpy's argpartition on identical float arrays does.
    """
    kept = max(1, round(density * magnitude.size))
    flat = np.zeros(magnitude.size, dtype=np.float64)
    flat[np.argpartition(-magnitude.ravel(), kept - 1)[:kept]] = 1.0
    return flat.reshape(magnitude.shape)


def kaiming_uniform_scores(tensor: SeededTensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Edge-popup's score init, ``kaiming_uniform_`` with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    seeded per tensor (also Slot Machines' default for its candidates' scores)."""
    bound = 1.0 / math.sqrt(tensor.fan_in)
    return torch.rand(shape, generator=tensor.generator()) * 2 * bound - bound
