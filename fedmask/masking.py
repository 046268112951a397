"""Masked layers as a parametrization: ``weight = frozen * mask(scores)``.

Any model built from ``nn.Linear`` and ``nn.Conv2d`` becomes a masked model through
:func:`to_masked`; no layer class is copied. The frozen tensor stays the parametrization's
``original`` (never trained, never sent); the only trainable tensors are the scores.

Three ways to turn scores into a mask:

- ``topk`` (edge-popup): keep the ``density`` fraction of largest ``|score|`` per tensor.
- ``bernoulli`` (FedPM): ``theta = sigmoid(score)``, ``mask ~ Bernoulli(theta)`` in every
  training forward pass.
- ``biprop`` (multi-prize tickets): the top-k mask of ``topk``, but the weight used is
  ``sign(frozen) * alpha * mask`` with ``alpha`` the mean ``|frozen|`` of the kept weights
  of the tensor: every party derives ``alpha`` from the mask and the seed.

Slot Machines (``slots``) choose instead of mask: every connection holds K seeded
candidate values and K scores, and the weight used is the chosen candidate (the argmax
score, ``greedy``, or a softmax sample, ``probabilistic``); see :class:`SlotChoice`.

LaPerm (``laperm``) neither masks nor chooses: the weight is a shadow copy trained by an
inner Adam and rewired every few steps to an arrangement of the seeded values
(:class:`fedmask.laperm.Rewired`).

All are straight-through: the backward pass hands the mask's (or the one-hot choice's)
gradient to its input as is. Two references differ, each available as a setting:
FedPM's references pass ``theta * grad`` back through the Bernoulli sample
(``fedpm-gradient = "reference"``), and Biprop's reference gives the scores ``g * w``
(its backward returns ``g * |w|`` for an output that is multiplied by ``sign(w)`` after it)
where fedmask's default gives ``g * sign(w) * alpha`` (``biprop-gradient = "reference"``);
the two agree when every ``|w|`` is alpha, as with signed-constant weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from fedmask.weights import derive_seed, fan_in, fan_out, frozen_tensor

MASK_MODES = ("topk", "bernoulli", "biprop", "slots", "laperm")
TOPK_MODES = ("topk", "biprop")  # modes whose state is scores and whose mask is top-k
EVAL_MASKS = ("threshold", "sample")
SLOT_SELECTIONS = ("greedy", "probabilistic")
SLOT_SCORE_INITS = ("kaiming-uniform", "reference")


class TopKMask(torch.autograd.Function):
    """1 for the ``density`` fraction of largest inputs, 0 elsewhere; straight-through."""

    @staticmethod
    def forward(ctx, magnitudes: torch.Tensor, density: float) -> torch.Tensor:
        kept = max(1, round(density * magnitudes.numel()))
        mask = torch.zeros_like(magnitudes)
        mask.view(-1)[magnitudes.flatten().topk(kept, sorted=False).indices] = 1.0
        return mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def bernoulli_sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``torch.bernoulli(probs)``, the same bits, about 3x faster on the CPU.

    On the CPU, ``torch.bernoulli`` of a float32 tensor draws one 24-bit uniform per entry
    from the generator, in order, and keeps the entry when it is below ``probs``: exactly
    ``torch.rand(...) < probs``, which skips the per-entry distribution object
    (``tests/test_scale.py`` checks the identity across sizes and seeds). Elsewhere (CUDA,
    other dtypes) it is ``torch.bernoulli`` itself.
    """
    if probs.device.type == "cpu" and probs.dtype == torch.float32:
        return torch.rand(probs.shape, generator=generator).lt_(probs)  # 1.0 where below, else 0.0
    return torch.bernoulli(probs, generator=generator)


FEDPM_GRADIENTS = ("straight-through", "reference")
BIPROP_GRADIENTS = ("fedmask", "reference")
BATCHNORMS = ("stateless", "running")


class BernoulliMask(torch.autograd.Function):
    """A sample of ``Bernoulli(probs)``.

    ``straight-through`` (fedmask's default): the gradient reaches ``probs`` unchanged.
    ``reference``: it reaches ``probs`` as ``probs * grad``, as both FedPM references do
    (BerivanIsik/sparse-random-networks and FL4Health); with Adam the two differ little,
    with SGD the reference's steps shrink for small theta.
    """

    @staticmethod
    def forward(ctx, probs: torch.Tensor, reference: bool = False) -> torch.Tensor:
        ctx.reference = reference
        if reference:
            ctx.save_for_backward(probs)
        return bernoulli_sample(probs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.reference:
            (probs,) = ctx.saved_tensors
            return probs * grad, None
        return grad, None


def slot_index(scores: torch.Tensor, sample: bool) -> torch.Tensor:
    """The chosen candidate per connection: the argmax over dim 0 (first maximum on ties,
    as numpy's), or with ``sample`` a draw from the softmax (Gumbel-max: the argmax of
    scores plus Gumbel noise, from torch's global generator)."""
    if sample:
        scores = scores - torch.log(-torch.log(torch.rand_like(scores).clamp_(1e-12, 1.0)))
    best, index = scores[0].clone(), torch.zeros(scores.shape[1:], dtype=torch.long, device=scores.device)
    for k in range(1, scores.shape[0]):  # K contiguous passes: much faster than argmax(dim=0)
        better = scores[k] > best
        best = torch.where(better, scores[k], best)
        index.masked_fill_(better, k)
    return index


class SlotWeight(torch.autograd.Function):
    """The chosen candidates' values; straight-through to every candidate's score.

    The weight is ``sum_k onehot_k * candidates_k``; passing the one-hot's gradient through
    as if it were the scores gives score k the gradient ``dL/dw * candidates_k``: how much
    the loss would fall if the connection used that value (the Slot Machines update).
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, candidates: torch.Tensor, sample: bool) -> torch.Tensor:
        ctx.save_for_backward(candidates)
        return candidates.gather(0, slot_index(scores, sample).unsqueeze(0)).squeeze(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (candidates,) = ctx.saved_tensors
        return grad.unsqueeze(0) * candidates, None, None


class SlotChoice(nn.Module):
    """Slot Machines (Aladago & Torresani, 2021) as a parametrization.

    ``candidates`` (K, *shape) are seeded and frozen, ``scores`` (K, *shape) are trained
    (see :class:`SlotWeight`). The parametrization's ``original`` is unused (zeros): the
    candidates are the frozen values.
    """

    def __init__(self, candidates: torch.Tensor, selection: str, eval_mask: str):
        super().__init__()
        if selection not in SLOT_SELECTIONS:
            raise ValueError(f"slot-selection: expected one of {', '.join(SLOT_SELECTIONS)}, got {selection!r}")
        if eval_mask not in EVAL_MASKS:
            raise ValueError(f"eval-mask: expected one of {', '.join(EVAL_MASKS)}, got {eval_mask!r}")
        self.mode, self.selection, self.eval_mask = "slots", selection, eval_mask
        self.register_buffer("candidates", candidates)
        self.scores = nn.Parameter(torch.zeros_like(candidates))

    def sampling(self) -> bool:
        """Sampled when training probabilistically, and in evaluation when ``eval-mask`` is
        ``sample``; the argmax otherwise."""
        return self.selection == "probabilistic" and (self.training or self.eval_mask == "sample")

    def forward(self, unused: torch.Tensor) -> torch.Tensor:
        return SlotWeight.apply(self.scores, self.candidates, self.sampling())


class ScoreMask(nn.Module):
    """Parametrization holding one score per frozen value."""

    def __init__(self, shape: torch.Size, mode: str, density: float, eval_mask: str,
                 fedpm_gradient: str = "straight-through", biprop_gradient: str = "fedmask"):
        super().__init__()
        if fedpm_gradient not in FEDPM_GRADIENTS:
            raise ValueError(f"fedpm-gradient: expected one of {', '.join(FEDPM_GRADIENTS)}, got {fedpm_gradient!r}")
        if biprop_gradient not in BIPROP_GRADIENTS:
            raise ValueError(f"biprop-gradient: expected one of {', '.join(BIPROP_GRADIENTS)}, got {biprop_gradient!r}")
        self.fedpm_gradient, self.biprop_gradient = fedpm_gradient, biprop_gradient
        if mode not in MASK_MODES:
            raise ValueError(f"mode: expected one of {', '.join(MASK_MODES)}, got {mode!r}")
        if mode in TOPK_MODES and not 0.0 < density <= 1.0:
            raise ValueError(f"density: expected a fraction in (0, 1], got {density}")
        if eval_mask not in EVAL_MASKS:
            raise ValueError(
                f"eval-mask: expected one of {', '.join(EVAL_MASKS)}, got {eval_mask!r}"
            )
        self.mode, self.density, self.eval_mask = mode, density, eval_mask
        self.scores = nn.Parameter(torch.zeros(shape))

    def mask(self) -> torch.Tensor:
        if self.mode in TOPK_MODES:
            return TopKMask.apply(self.scores.abs(), self.density)
        probs = torch.sigmoid(self.scores)
        if self.training or self.eval_mask == "sample":
            return BernoulliMask.apply(probs, self.fedpm_gradient == "reference")
        return (probs > 0.5).to(probs.dtype)

    def forward(self, frozen: torch.Tensor) -> torch.Tensor:
        mask = self.mask()
        if self.mode == "biprop":
            with torch.no_grad():  # alpha is a statistic of the kept weights, not trained
                alpha = (frozen.abs() * mask).sum() / mask.sum().clamp(min=1.0)
            if self.biprop_gradient == "reference":
                # the same value; the mask (so the scores) gets g * sign(w) * |w| = g * w, as
                # chrundle/biprop (GetQuantnet_binary returns g * |w|, and its output is
                # multiplied by sign(w) in SubnetConv.forward)
                used = frozen * mask
                return torch.sign(frozen) * alpha * mask.detach() + used - used.detach()
            return torch.sign(frozen) * alpha * mask
        return frozen * mask


def _maskable(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            for tensor_name in ("weight", "bias"):
                if getattr(module, tensor_name, None) is not None:
                    prefix = f"{module_name}." if module_name else ""
                    yield f"{prefix}{tensor_name}", module, tensor_name


def _freeze_batchnorm(model: nn.Module, affine: bool, batchnorm: str = "stateless") -> None:
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
                setattr(
                    parent,
                    child_name,
                    nn.BatchNorm2d(child.num_features, affine=affine, track_running_stats=batchnorm == "running"),
                )


def to_masked(
    model: nn.Module,
    mode: str,
    seed: int,
    init: str = "signed-kaiming-constant",
    density: float = 0.5,
    eval_mask: str = "threshold",
    slots: int = 8,
    slot_selection: str = "greedy",
    fedpm_gradient: str = "straight-through",
    biprop_gradient: str = "fedmask",
    biprop_scale_fan: bool = False,
    slot_score_init: str = "kaiming-uniform",
    batchnorm: str = "stateless",
) -> nn.Module:
    """Turn a plain model into a masked one, in place, and return it.

    Every Linear/Conv2d weight and bias is overwritten with its seeded frozen value,
    frozen, and parametrized by a :class:`ScoreMask` whose scores are seeded too, so that
    the whole masked model is a function of ``seed`` alone. With ``mode = "slots"`` each
    tensor instead gets ``slots`` seeded candidates per entry and a :class:`SlotChoice`.
    """
    if mode == "laperm":  # LaPerm permutes the seeded values: the parametrization is in fedmask.laperm
        from fedmask.laperm import Rewired
    if mode == "slots" and not 2 <= slots <= 64:
        raise ValueError(f"slots: expected a candidate count in 2..64, got {slots}")
    if slot_score_init not in SLOT_SCORE_INITS:
        raise ValueError(f"slot-score-init: expected one of {', '.join(SLOT_SCORE_INITS)}, got {slot_score_init!r}")
    _freeze_batchnorm(model, affine=False, batchnorm=batchnorm)
    for name, module, tensor_name in list(_maskable(model)):
        frozen_param = getattr(module, tensor_name)
        weight_shape = tuple(cast(torch.Tensor, module.weight).shape)
        layer_fan_in, layer_fan_out = fan_in(weight_shape), fan_out(weight_shape)
        frozen_param.requires_grad_(False)
        if mode == "slots":
            candidates = frozen_tensor(seed, name, (slots, *frozen_param.shape), layer_fan_in, init, layer_fan_out)
            with torch.no_grad():
                frozen_param.zero_()
            parametrization: Any = SlotChoice(candidates, slot_selection, eval_mask)
        elif mode == "laperm":
            frozen = frozen_tensor(seed, name, tuple(frozen_param.shape), layer_fan_in, init, layer_fan_out)
            with torch.no_grad():
                frozen_param.copy_(frozen)
            parametrize.register_parametrization(module, tensor_name, Rewired(frozen))
            continue  # the shadow weights start at the seeded values
        else:
            frozen = frozen_tensor(seed, name, tuple(frozen_param.shape), layer_fan_in, init, layer_fan_out)
            if mode == "biprop" and biprop_scale_fan:  # the reference code's scale_fan (see config)
                frozen = frozen / math.sqrt(1.0 - density)
            with torch.no_grad():
                frozen_param.copy_(frozen)
            parametrization = ScoreMask(frozen_param.shape, mode, density, eval_mask, fedpm_gradient, biprop_gradient)
        if mode == "slots" and slot_score_init == "reference":
            _init_reference_slot_scores(parametrization.scores, seed, name, layer_fan_in, layer_fan_out)
        else:
            _init_scores(parametrization.scores, seed, name, mode, layer_fan_in)
        parametrize.register_parametrization(module, tensor_name, parametrization)
    leftover = [n for n, p in model.named_parameters() if p.requires_grad and "scores" not in n]
    if leftover:
        raise ValueError(
            f"model has trainable tensors that masks cannot carry: {', '.join(leftover)}; "
            "masked models may only contain Linear/Conv2d (and BatchNorm, made stateless)"
        )
    return model


def _init_scores(scores: torch.Tensor, seed: int, name: str, mode: str, layer_fan_in: int):
    """Seeded score init: edge-popup's kaiming-uniform (a=sqrt(5)), also for slot scores;
    FedPM's N(0, 1)."""
    generator = torch.Generator(device="cpu").manual_seed(derive_seed(seed, name, "scores"))
    with torch.no_grad():
        if mode in TOPK_MODES or mode == "slots":
            bound = 1.0 / math.sqrt(layer_fan_in)  # kaiming_uniform_ with a=sqrt(5)
            scores.copy_(torch.rand(scores.shape, generator=generator) * 2 * bound - bound)
        else:
            scores.copy_(torch.randn(scores.shape, generator=generator))


def _init_reference_slot_scores(scores: torch.Tensor, seed: int, name: str, layer_fan_in: int,
                                layer_fan_out: int) -> None:
    """Slot Machines' reference score init: U(0, b), b = sqrt(6 / (fan_in + fan_out)) (Glorot's bound)."""
    generator = torch.Generator(device="cpu").manual_seed(derive_seed(seed, name, "scores"))
    bound = math.sqrt(6.0 / (layer_fan_in + layer_fan_out))
    with torch.no_grad():
        scores.copy_(torch.rand(scores.shape, generator=generator) * bound)


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
    out = {}
    for name, module in score_masks(model).items():
        if isinstance(module, SlotChoice):
            out[name] = cast(torch.Tensor, module.candidates).detach()
        else:
            out[name] = original_tensor(model, name).detach()
    return out


@torch.no_grad()
def regenerate_frozen(model: nn.Module, seed: int, init: str) -> None:
    """Put back the seeded frozen values (undoing weight recycling), as :func:`to_masked` drew them."""
    for name, module, tensor_name in _maskable(model):
        plist = _parametrizations(module)[tensor_name]
        if plist[0].mode == "slots":
            raise ValueError("weight recycling applies to top-k masks (edge-popup, biprop), not slots")
        weight_shape = tuple(_parametrizations(module)["weight"].original.shape)
        values = frozen_tensor(seed, name, tuple(plist.original.shape), fan_in(weight_shape), init,
                               fan_out(weight_shape))
        plist.original.copy_(values.to(plist.original.device))


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


@torch.no_grad()
def current_masks(model: nn.Module, sample: bool | None = None) -> dict[str, np.ndarray]:
    """The binary mask of every tensor as ``bool`` arrays.

    For Bernoulli masks ``sample`` chooses a fresh sample (what FedPM uploads) or the
    0.5 threshold; by default it follows the module's train/eval setting.
    """
    out = {}
    for name, module in score_masks(model).items():
        if isinstance(module, SlotChoice):
            raise ValueError("slot models choose candidates, they have no binary mask: use current_choices")
        if module.mode == "laperm":
            raise ValueError("LaPerm models permute weights, they have no binary mask: use laperm.arrangement")
        if module.mode == "bernoulli" and sample is not None:
            probs = torch.sigmoid(module.scores)
            mask = bernoulli_sample(probs) if sample else (probs > 0.5).float()
        else:
            mask = module.mask()
        out[name] = mask.cpu().numpy().astype(bool)
    return out


@torch.no_grad()
def current_choices(model: nn.Module, sample: bool | None = None) -> dict[str, np.ndarray]:
    """Slot Machines: the chosen candidate index per connection (uint8 arrays).

    ``sample`` (probabilistic selection) draws from the softmax, as a client uploads;
    otherwise the argmax. By default it follows the module's train/eval setting.
    """
    out = {}
    for name, module in score_masks(model).items():
        if not isinstance(module, SlotChoice):
            raise ValueError(f"'{name}' is a {module.mode} mask, not a slot choice: use current_masks")
        sampling = module.sampling() if sample is None else sample and module.selection == "probabilistic"
        out[name] = slot_index(module.scores, sampling).cpu().numpy().astype(np.uint8)
    return out


def upload_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """What a client uploads: a fresh mask sample (FedPM), the top-k mask, slot choices, or
    LaPerm's arrangement (the rank of every weight in its row)."""
    if any(m.mode == "laperm" for m in score_masks(model).values()):
        from fedmask.laperm import arrangement

        return arrangement(model)
    if any(m.mode == "slots" for m in score_masks(model).values()):
        return current_choices(model, sample=True)
    return current_masks(model, sample=True)


def topk_mask_np(magnitude: np.ndarray, density: float) -> np.ndarray:
    """The top-k selection in numpy, for parties that agree on it without torch.

    The server's aggregation and both ends of the entropy coder must pick the same weights
    bit for bit; numpy's argpartition on identical float arrays does.
    """
    kept = max(1, round(density * magnitude.size))
    flat = np.zeros(magnitude.size, dtype=np.float64)
    flat[np.argpartition(-magnitude.ravel(), kept - 1)[:kept]] = 1.0
    return flat.reshape(magnitude.shape)
