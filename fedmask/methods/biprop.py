"""Biprop, multi-prize tickets (Diffenderfer & Kailkhura, ICLR 2021), federated.

The top-k mask of edge-popup, but the weight used is ``sign(frozen) * alpha * mask`` with
``alpha`` the mean ``|frozen|`` of the kept weights of the tensor: every party derives
``alpha`` from the mask and the seed, so the upload is the mask alone and the server
aggregates it as edge-popup's (:class:`BipropAggregator`). Only the layer maths differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedmask.core.masking import SeededTensor, kaiming_uniform_scores
from fedmask.methods.base import Settings, mask_mode
from fedmask.methods.edge_popup import EdgePopupAggregator, TopK, TopKScores
from fedmask.names import BIPROP_GRADIENTS


class BipropScores(TopKScores):
    """``weight = sign(frozen) * alpha * topk(|scores|)``, alpha the mean kept ``|frozen|``.

    ``fedmask`` (the default) gives the scores ``g * sign(w) * alpha``; ``reference`` gives
    ``g * w``, as chrundle/biprop (its backward returns ``g * |w|`` for an output that is
    multiplied by ``sign(w)`` after it). The two agree when every ``|w|`` is alpha, as with
    signed-constant weights.
    """

    def __init__(self, scores: torch.Tensor, density: float, reference_gradient: bool):
        super().__init__(scores, density)
        self.reference_gradient = reference_gradient

    def forward(self, frozen: torch.Tensor) -> torch.Tensor:
        mask = self.mask()
        with torch.no_grad():  # alpha is a statistic of the kept weights, not trained
            alpha = (frozen.abs() * mask).sum() / mask.sum().clamp(min=1.0)
        if self.reference_gradient:
            # the same value; the mask (so the scores) gets g * sign(w) * |w| = g * w, as
            # chrundle/biprop (GetQuantnet_binary returns g * |w|, and its output is
            # multiplied by sign(w) in SubnetConv.forward)
            used = frozen * mask
            return torch.sign(frozen) * alpha * mask.detach() + used - used.detach()
        return torch.sign(frozen) * alpha * mask


@mask_mode
@dataclass(frozen=True)
class Biprop(TopK):
    """Biprop's mask: edge-popup's top-k, with the scaled signed weights of :class:`BipropScores`."""

    name = "biprop"
    gradient: str = "fedmask"  # or "reference" (chrundle/biprop's g * w)
    scale_fan: bool = False  # the reference code's scale_fan: frozen weights / sqrt(1 - density)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gradient not in BIPROP_GRADIENTS:
            raise ValueError(f"biprop-gradient: expected one of {', '.join(BIPROP_GRADIENTS)}, got {self.gradient!r}")

    @classmethod
    def from_config(cls, config: Settings) -> Biprop:
        return cls(config["density"], config["edge-popup-server-rule"] == "vote-levels", config["biprop-gradient"],
                   config["biprop-scale-fan"])

    def parametrize(self, tensor: SeededTensor) -> tuple[nn.Module, torch.Tensor]:
        frozen = tensor.frozen()
        if self.scale_fan:
            frozen = frozen / math.sqrt(1.0 - self.density)
        scores = kaiming_uniform_scores(tensor, tensor.shape)
        return BipropScores(scores, self.density, self.gradient == "reference"), frozen

    def batched_weight(self, frozen: torch.Tensor, scores: torch.Tensor,
                       generators: list[torch.Generator]) -> torch.Tensor:
        if self.gradient == "reference":
            raise NotImplementedError("biprop-gradient 'reference': batched clients train with fedmask's gradients")
        mask = self.batched_mask(scores)
        with torch.no_grad():
            alpha = (frozen.abs() * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1.0)
        return torch.sign(frozen) * alpha.view(-1, *[1] * frozen.dim()) * mask


class BipropAggregator(EdgePopupAggregator):
    """Biprop federated: the same top-k votes as edge-popup."""

    mask_mode = "biprop"
