"""Edge-popup: top-k masks over scores (Ramanujan et al., CVPR 2020), federated.

Client: a score per frozen weight; the forward pass keeps the ``density`` fraction of
largest ``|score|`` per tensor (straight-through backward); the upload is that top-k mask,
coded against the global top-k. Server: votes move the global scores (:class:`EdgePopupAggregator`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmask.core.masking import (
    MaskedTensor,
    SeededTensor,
    StraightThrough,
    kaiming_uniform_scores,
    score_masks,
    topk_mask_np,
)
from fedmask.methods.base import MaskMode, Masks, Settings, State, mask_mode
from fedmask.methods.votes import VoteRule, Voting
from fedmask.names import EDGE_POPUP_SERVER_RULES
from fedmask.wire.masks import ContextPrior, Prior


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


class TopKScores(MaskedTensor):
    """``weight = frozen * topk(|scores|)``."""

    def __init__(self, scores: torch.Tensor, density: float):
        super().__init__()
        self.density = density
        self.scores = nn.Parameter(scores)

    def mask(self) -> torch.Tensor:
        return TopKMask.apply(self.scores.abs(), self.density)

    def forward(self, frozen: torch.Tensor) -> torch.Tensor:
        return frozen * self.mask()


def standardised(magnitude: np.ndarray) -> np.ndarray:
    """Non-negative scores with unit spread; the ranking, all top-k needs, is unchanged
    (also what clients train from under ``vote-levels``: :meth:`TopK.scores_of_state`)."""
    spread = magnitude.std()
    return (np.maximum(magnitude, 0.0) / (spread if spread > 0 else 1.0)).astype(np.float32)


@mask_mode
@dataclass(frozen=True)
class TopK(MaskMode):
    """Edge-popup's mask: the state is scores; a client uploads its top-k mask."""

    name = "topk"
    recyclable = True
    density: float = 0.5  # fraction of weights kept per tensor
    standardise: bool = False  # train from the state divided by its spread (``vote-levels``' levels)

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density: expected a fraction in (0, 1], got {self.density}")

    @classmethod
    def from_config(cls, config: Settings) -> TopK:
        return cls(config["density"], config["edge-popup-server-rule"] == "vote-levels")

    def parametrize(self, tensor: SeededTensor) -> tuple[nn.Module, torch.Tensor]:
        scores = kaiming_uniform_scores(tensor, tensor.shape)
        return TopKScores(scores, self.density), tensor.frozen()

    def scores_of_state(self, state: State) -> State:
        if self.standardise:  # integer levels 0..L-1: unit spread, as the other rules keep the scores
            return {k: standardised(v.astype(np.float64)) for k, v in state.items()}
        return state

    @torch.no_grad()
    def upload(self, model: nn.Module, probabilities: bool = False) -> Masks:
        return {name: module.mask().cpu().numpy().astype(bool) for name, module in score_masks(model).items()}

    def prior(self, state: State) -> Prior:
        """The global top-k, as 0/1 probabilities (the coder adds a flip rate). Under
        ``vote-levels`` (the state takes at most ``edge-popup-levels`` values) also each
        weight's context for the grouped model (:class:`ContextPrior`): twice the rank of
        its level among the tensor's levels, plus 1 when it is in the top-k (which its level
        decides everywhere but at the level the top-k boundary cuts through). A client's
        bits in each context then cost what their own share of ones says: a weight far from
        the boundary rarely flips, one next to it often. Measured on MNIST-10k (Dirichlet
        0.3, 5 local epochs, rounds 11-20): 0.134 bits per weight against 0.200 with one
        flip rate per tensor."""
        probs = {k: topk_mask_np(np.abs(v), self.density).astype(np.float64) for k, v in state.items()}
        if not self.standardise:
            return probs
        contexts = {}
        for name, value in state.items():
            level = np.unique(np.abs(value), return_inverse=True)[1].ravel()
            contexts[name] = 2 * level + probs[name].ravel().astype(np.int64)
        return ContextPrior(probs, contexts)

    def global_mask(self, state: State) -> Masks:
        return {k: topk_mask_np(np.abs(v), self.density) == 1.0 for k, v in state.items()}

    def vote_contexts(self, state: State) -> dict[str, tuple[np.ndarray, int]]:
        """Whether the weight is in the current top-k."""
        return {k: (topk_mask_np(np.abs(v), self.density).astype(np.int64).ravel(), 2) for k, v in state.items()}

    batched = True

    def batched_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Each client's top-k mask (clients, *shape), straight-through to its scores."""
        magnitudes = scores.abs()
        flat = magnitudes.flatten(1)
        kept = max(1, round(self.density * flat.shape[1]))
        chosen = torch.zeros_like(flat)
        chosen.scatter_(1, flat.topk(kept, dim=1, sorted=False).indices, 1.0)
        return StraightThrough.apply(magnitudes, chosen.view_as(magnitudes))

    def batched_weight(self, frozen: torch.Tensor, scores: torch.Tensor,
                       generators: list[torch.Generator]) -> torch.Tensor:
        return frozen * self.batched_mask(scores)


# ---------------------------------------------------------------- the server's rule


@dataclass(frozen=True)
class EdgePopupParams:
    density: float = 0.5
    server_lr: float = 2.0  # how far a unanimous vote moves a score, in spreads
    rule: str = "pseudo-gradient"  # or "vote-average", "vote-levels"
    vote_weight: float = 0.3  # vote-average / vote-levels: the running average's weight of this round
    levels: int = 64  # vote-levels: integer levels of the state
    votes: VoteRule = VoteRule()

    def __post_init__(self) -> None:
        if self.rule not in EDGE_POPUP_SERVER_RULES:
            raise ValueError(f"edge-popup-server-rule: expected one of {', '.join(EDGE_POPUP_SERVER_RULES)}, "
                             f"got {self.rule!r}")

    @classmethod
    def from_config(cls, config: Settings) -> EdgePopupParams:
        return cls(config["density"], config["edge-popup-server-lr"], config["edge-popup-server-rule"],
                   config["edge-popup-vote-weight"], config["edge-popup-levels"], VoteRule.from_config(config))


def _from_levels(level: np.ndarray, levels: int) -> np.ndarray:
    """Integer levels 0..levels-1 as the state: the levels themselves, as float32."""
    return np.clip(level, 0, levels - 1).astype(np.float32)


def _to_levels(scores: np.ndarray, levels: int) -> np.ndarray:
    return np.clip(np.rint(scores.astype(np.float64)), 0, levels - 1)


class EdgePopupAggregator(Voting):
    """Federated edge-popup: votes move scores, they do not replace them.

    Setting each score to its vote frequency (the naive rule) leaves the scores in a few
    levels (0, 1/n, ..., 1) far apart compared with what one local epoch can move, so after
    two or three rounds no client flips a mask bit any more and training stops (51% on
    digits, measured). Here the server keeps score magnitudes, standardised per tensor so
    that a local learning rate means the same in every layer and dataset, and treats
    ``vote - current global mask`` as a pseudo-gradient: only disagreement with the current
    selection moves a score, by ``edge-popup-server-lr`` spreads for a unanimous vote.
    Weights that all clients keep or all drop keep their ranks.

    Under non-IID data that rule churns: a weight on which the clients disagree (vote
    near 0.5) is pushed down while kept and up while dropped, so it crosses the top-k
    boundary back and forth (12% of the mask flipped a round on Fashion-MNIST, Dirichlet
    0.3). ``edge-popup-server-rule = "vote-average"`` instead makes the magnitude a running
    average of the votes, ``(1 - m) |s| + m * lr * vote``: its fixed point is the mean vote,
    so a contested weight settles instead of oscillating (weights with the same vote history
    end up tied; top-k breaks ties by position, the same on every party).

    Every score still moves a little every round under either rule, so a client that
    missed k rounds needs k rounds of votes to catch up losslessly (15-19 bits per
    parameter on Fashion-MNIST, 10 clients of 100 a round). ``"vote-levels"`` keeps the
    same running average on ``L = edge-popup-levels`` integer levels: the level moves to
    ``round((1 - m) * level + m * (L - 1) * vote)``, so it stays put unless the votes pull
    it more than half a level (``1 / (2m)`` levels of vote share) away. The state then
    takes at most L values, changes on few weights per round, and the lossless downlink
    sends it coded against the levels the client holds. The state is the levels
    themselves; clients train from them standardised per tensor
    (:meth:`TopK.scores_of_state`), so a local learning rate means what it means
    under the other rules (raw levels 0..L-1 sit far apart for one epoch of local steps:
    the clients then flip almost nothing and the mask stalls, measured: 4x fewer flips
    and 4-5 points lower on Fashion-MNIST with a fixed scale of unit spread for uniform
    levels). ``edge-popup-server-lr`` does not enter this rule.
    """

    mask_mode = "topk"

    def __init__(self, params: EdgePopupParams = EdgePopupParams()):
        super().__init__(params.votes)
        self.params = params

    @classmethod
    def from_config(cls, config: Settings) -> EdgePopupAggregator:
        return cls(EdgePopupParams.from_config(config))

    def initial_state(self, scores: State) -> State:
        if self.params.rule == "vote-levels":
            levels = self.params.levels
            out = {}
            for name, v in scores.items():
                magnitude = np.abs(v.astype(np.float64))
                top = magnitude.max()
                scaled = magnitude / top * levels if top > 0 else magnitude
                out[name] = _from_levels(np.minimum(np.floor(scaled), levels - 1), levels)
            return out
        return {name: standardised(np.abs(v.astype(np.float64))) for name, v in scores.items()}

    def replay(self, state: State, votes: State, clients: float) -> State:
        p = self.params
        new_state = {}
        for name, scores in state.items():
            if p.rule == "vote-levels":
                held = _to_levels(scores, p.levels)
                pulled = (1.0 - p.vote_weight) * held + p.vote_weight * (p.levels - 1) * votes[name]
                new_state[name] = _from_levels(np.clip(np.rint(pulled), 0, p.levels - 1), p.levels)
                continue
            magnitude = standardised(np.abs(scores.astype(np.float64)))
            if p.rule == "vote-average":
                moved = (1.0 - p.vote_weight) * magnitude + p.vote_weight * p.server_lr * votes[name]
            else:
                moved = magnitude + p.server_lr * (votes[name] - topk_mask_np(magnitude, p.density))
            new_state[name] = standardised(moved)
        return new_state
