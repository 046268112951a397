"""FedPM: Bernoulli masks over seeded weights, and Bayesian aggregation (Isik et al., ICLR 2023).

Client: ``theta = sigmoid(score)``; every training forward pass uses a fresh mask
``m ~ Bernoulli(theta)``, straight-through in the backward pass; the scores start at
``logit(global theta)``, and the upload is one more sample, coded against the broadcast
theta. Server: a Beta(1, 1) prior per weight counts the ones and zeros of the uploaded
samples; the new theta is the posterior mode, clamped to ``[eps, 1 - eps]``. Evaluation
thresholds theta at 0.5 or samples a mask (``eval-mask``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmask.core.masking import MaskedTensor, SeededTensor, StraightThrough, score_masks
from fedmask.methods.base import MaskMode, Masks, Settings, State, mask_mode
from fedmask.methods.votes import VoteRule, Voting
from fedmask.names import EVAL_MASKS, FEDPM_GRADIENTS, FEDPM_PRIOR_RESET_RULES
from fedmask.wire.frame import Layout
from fedmask.wire.masks import Prior, encode_relative

THETA_BINS = 32  # the lossless downlink's contexts: theta in 32 bins


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


class BernoulliScores(MaskedTensor):
    """``weight = frozen * m``, ``m ~ Bernoulli(sigmoid(scores))`` in training (and in
    evaluation with ``eval-mask = "sample"``), ``sigmoid(scores) > 0.5`` otherwise."""

    def __init__(self, scores: torch.Tensor, eval_mask: str, reference_gradient: bool):
        super().__init__()
        self.eval_mask, self.reference_gradient = eval_mask, reference_gradient
        self.scores = nn.Parameter(scores)

    def mask(self) -> torch.Tensor:
        probs = torch.sigmoid(self.scores)
        if self.training or self.eval_mask == "sample":
            return BernoulliMask.apply(probs, self.reference_gradient)
        return (probs > 0.5).to(probs.dtype)

    def forward(self, frozen: torch.Tensor) -> torch.Tensor:
        return frozen * self.mask()


def logit(theta: np.ndarray) -> np.ndarray:
    p = np.clip(theta.astype(np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p)).astype(np.float32)


@mask_mode
@dataclass(frozen=True)
class Bernoulli(MaskMode):
    """FedPM's mask: the state is theta; a client uploads one sample of its own theta."""

    name = "bernoulli"
    probabilistic = True
    default_uplink = "relative-entropy"  # about KL(q || theta) bits, not the sample's entropy (bench/results/uplink.md)
    eval_mask: str = "threshold"  # evaluation: threshold theta at 0.5, or "sample" a mask
    gradient: str = "straight-through"  # or "reference": probs * grad, as FedPM's references
    # uplink-codec = "relative-entropy": C bits of KL a block, t more bits of candidates, debiased means
    block_bits: int = 8
    extra_bits: int = 0
    debias: bool = True

    def __post_init__(self) -> None:
        if self.eval_mask not in EVAL_MASKS:
            raise ValueError(f"eval-mask: expected one of {', '.join(EVAL_MASKS)}, got {self.eval_mask!r}")
        if self.gradient not in FEDPM_GRADIENTS:
            raise ValueError(f"fedpm-gradient: expected one of {', '.join(FEDPM_GRADIENTS)}, got {self.gradient!r}")

    @classmethod
    def from_config(cls, config: Settings) -> Bernoulli:
        return cls(config["eval-mask"], config["fedpm-gradient"], config["rec-block-bits"], config["rec-extra-bits"],
                   config["rec-debias"])

    @staticmethod
    def seed_state(scores: State) -> State:
        return {k: (1.0 / (1.0 + np.exp(-v))).astype(np.float32) for k, v in scores.items()}

    def parametrize(self, tensor: SeededTensor) -> tuple[nn.Module, torch.Tensor]:
        scores = torch.randn(tensor.shape, generator=tensor.generator())  # FedPM's N(0, 1)
        return BernoulliScores(scores, self.eval_mask, self.gradient == "reference"), tensor.frozen()

    def scores_of_state(self, state: State) -> State:
        return {k: logit(v) for k, v in state.items()}

    @torch.no_grad()
    def upload(self, model: nn.Module, probabilities: bool = False) -> Masks:
        """A fresh sample of every tensor's mask (torch's global generator, tensors in name
        order), or with ``probabilities`` the client's theta, ``sigmoid(scores)``, which the
        relative-entropy codec samples from with the server's shared randomness."""
        if probabilities:
            return {name: torch.sigmoid(module.scores.double()).cpu().numpy()
                    for name, module in score_masks(model).items()}
        return {name: bernoulli_sample(torch.sigmoid(module.scores)).cpu().numpy().astype(bool)
                for name, module in score_masks(model).items()}

    def encode_upload(self, upload: Masks, layout: Layout, fingerprint: bytes, codec: str, prior: Prior | None,
                      rng: np.random.Generator, bind: tuple[int, int] | None = None) -> np.ndarray:
        """A sample coded as any mask, or (``relative-entropy``) ``upload``'s probabilities
        coded as the index of a sample among candidates drawn from the broadcast theta."""
        if codec != "relative-entropy":
            return super().encode_upload(upload, layout, fingerprint, codec, prior, rng, bind)
        if prior is None or bind is None:
            raise ValueError("uplink-codec 'relative-entropy' needs the broadcast theta and the round and client")
        return encode_relative(upload, layout, fingerprint, prior, bind, self.block_bits, self.extra_bits, self.debias,
                               int(rng.integers(0, 2**63)))

    def prior(self, state: State) -> Prior:
        return {k: v.astype(np.float64) for k, v in state.items()}

    def global_mask(self, state: State) -> Masks:
        return {name: value > 0.5 for name, value in state.items()}

    def colluding_upload(self, state: State) -> Masks:
        """The weights theta leans against (theta < 0.5; a tie at 0.5 is kept, not attacked)."""
        return {name: value < 0.5 for name, value in state.items()}

    def vote_contexts(self, state: State) -> dict[str, tuple[np.ndarray, int]]:
        out = {}
        for name, value in state.items():
            bins = np.minimum(np.floor(value.astype(np.float64) * THETA_BINS), THETA_BINS - 1)
            out[name] = (np.maximum(bins, 0).astype(np.int64).ravel(), THETA_BINS)
        return out

    def state_diagnostics(self, state: State) -> dict[str, float]:
        return {"theta_entropy_bits": theta_entropy_bits(state)}

    batched = True

    def batched_weight(self, frozen: torch.Tensor, scores: torch.Tensor,
                       generators: list[torch.Generator]) -> torch.Tensor:
        probs = torch.sigmoid(scores)
        with torch.no_grad():
            sample = torch.empty_like(probs)
            if probs.device.type == "cpu":
                # each client's uniforms from its own generator, then one comparison for all
                # (bernoulli_sample's identity); the draws run on the pool's threads
                def draw(row: int) -> None:
                    torch.rand(probs.shape[1:], generator=generators[row], out=sample[row])

                if torch.get_num_threads() > 1:
                    list(_pool().map(draw, range(len(generators))))
                else:
                    for row in range(len(generators)):
                        draw(row)
                sample.lt_(probs)
            else:
                for row, generator in enumerate(generators):
                    sample[row] = bernoulli_sample(probs[row], generator)
        return frozen * StraightThrough.apply(probs, sample)


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """Threads that draw different clients' random numbers at once (torch releases the GIL)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="fedmask-draw")
    return _POOL


def theta_entropy_bits(theta: State) -> float:
    """Mean binary entropy of theta, bits per parameter (0 at 0 or 1, 1 at 0.5)."""
    total, count = 0.0, 0
    for value in theta.values():
        t = np.asarray(value, dtype=np.float64).ravel()
        inside = (t > 0.0) & (t < 1.0)
        p = np.where(inside, t, 0.5)
        h = -(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))
        total += float(np.where(inside, h, 0.0).sum())
        count += t.size
    return total / max(count, 1)


def theta_saturated(theta: State, eps: float) -> float:
    """Fraction of theta at FedPM's clamp: <= eps or >= 1 - eps, compared in theta's own
    dtype (the clamp is applied in float64, then theta is rounded to float32)."""
    at_clamp, count = 0, 0
    for value in theta.values():
        low, high = np.asarray(eps).astype(value.dtype), np.asarray(1.0 - eps).astype(value.dtype)
        at_clamp += int(np.count_nonzero((value <= low) | (value >= high)))
        count += value.size
    return at_clamp / max(count, 1)


# ---------------------------------------------------------------- the server's rule


@dataclass(frozen=True)
class FedPMParams:
    eps: float = 0.01  # theta stays in [eps, 1 - eps]
    prior_reset: int = 1  # reset the Beta prior every this many rounds (1: every round; 0: never)
    prior_reset_rule: str = "fedmask"  # which rounds reset: "fedmask" or FL4Health's
    votes: VoteRule = VoteRule()

    def __post_init__(self) -> None:
        if self.prior_reset_rule not in FEDPM_PRIOR_RESET_RULES:
            raise ValueError(f"fedpm-prior-reset-rule: expected one of {', '.join(FEDPM_PRIOR_RESET_RULES)}, "
                             f"got {self.prior_reset_rule!r}")

    @classmethod
    def from_config(cls, config: Settings) -> FedPMParams:
        return cls(config["fedpm-eps"], config["fedpm-prior-reset"], config["fedpm-prior-reset-rule"],
                   VoteRule.from_config(config))


def fedpm_theta(ones: np.ndarray, zeros: np.ndarray, eps: float) -> np.ndarray:
    """FedPM's theta from counts of ones and zeros: the Beta(1, 1) posterior mode, clamped.

    The one formula the server's update and a client's replay of the lossless downlink
    share, so both compute the same float32 bits.
    """
    alpha, beta = 1.0 + ones, 1.0 + zeros
    mode = (alpha - 1.0) / (alpha + beta - 2.0)
    return np.clip(mode, eps, 1.0 - eps).astype(np.float32)


def prior_resets(server_round: int, period: int, rule: str = "fedmask") -> bool:
    """Whether FedPM's Beta prior is reset before this round's counts (``period`` 0: never).

    ``fedmask``: rounds 1, period+1, 2*period+1, ...; ``fl4health``: rounds with
    ``(round + 1) % period == 0`` (FL4Health's FedPm). With period 1 or 2 they agree on
    which rounds reset (every round; every other round, from round 1 in both cases as the
    counts start empty); from period 3 on they do not.
    """
    if not period:
        return False
    if rule == "fl4health":
        return (server_round + 1) % period == 0
    return (server_round - 1) % period == 0


class FedPMAggregator(Voting):
    """FedPM's Bayesian aggregation (Isik et al., ICLR 2023).

    A Beta(1, 1) prior per weight counts the ones and zeros of the uploaded samples;
    the new theta is the posterior mode ``(alpha-1)/(alpha+beta-2)``, clamped to
    ``[eps, 1-eps]`` so that no weight is decided for good. Counts are unweighted, as in
    the reference; the prior is reset every ``fedpm-prior-reset`` rounds (1 = every round,
    which makes theta the plain mean of this round's samples; 0 = never), on the rounds
    :func:`prior_resets` names for ``fedpm-prior-reset-rule``.
    """

    mask_mode = "bernoulli"

    def __init__(self, params: FedPMParams = FedPMParams()):
        super().__init__(params.votes)
        self.params = params
        self.ones: State = {}
        self.zeros: State = {}

    @classmethod
    def from_config(cls, config: Settings) -> FedPMAggregator:
        return cls(FedPMParams.from_config(config))

    @property
    def replayable(self) -> bool:  # type: ignore[override]
        """Nodes replay the update only when theta depends on this round's counts alone."""
        return self.absorbing

    @property
    def absorbing(self) -> bool:
        """With the prior reset every round, theta depends on this round's counts alone."""
        return self.params.prior_reset == 1

    def state_dict(self) -> State:
        return {f"ones/{k}": v for k, v in self.ones.items()} | {f"zeros/{k}": v for k, v in self.zeros.items()}

    def load_state_dict(self, arrays: State) -> None:
        self.ones = {k[5:]: v for k, v in arrays.items() if k.startswith("ones/")}
        self.zeros = {k[6:]: v for k, v in arrays.items() if k.startswith("zeros/")}

    def weight_of(self, weight: float) -> float:
        return 1.0  # counts are unweighted

    def round_votes(self, shares: State, clients: int) -> State:
        return {k: v * clients for k, v in shares.items()}  # the counts of ones

    def apply(self, server_round: int, state: State, votes: State, clients: float) -> State:
        return self.aggregate_counts(server_round, state, votes, int(clients))

    def replay(self, state: State, votes: State, clients: float) -> State:
        """theta from one round's counts of ones (prior reset every round), as the server's."""
        if not self.absorbing:
            raise ValueError("fedpm-prior-reset: a client can replay FedPM's update only when the prior "
                             f"is reset every round (1), got {self.params.prior_reset}")
        eps = self.params.eps
        return {name: fedpm_theta(np.zeros(state[name].shape) + votes[name],
                                  np.zeros(state[name].shape) + (clients - votes[name]), eps) for name in state}

    def aggregate_counts(self, server_round: int, state: State, ones: State, clients: int) -> State:
        """The update from per-weight counts of ones alone (what secure aggregation reveals)."""
        if not self.ones or prior_resets(server_round, self.params.prior_reset, self.params.prior_reset_rule):
            self.ones = {k: np.zeros(v.shape) for k, v in state.items()}
            self.zeros = {k: np.zeros(v.shape) for k, v in state.items()}
        new_state = {}
        for name in state:
            self.ones[name] += ones[name]
            self.zeros[name] += clients - ones[name]
            new_state[name] = fedpm_theta(self.ones[name], self.zeros[name], self.params.eps)
        return new_state

    def state_diagnostics(self, state: State) -> dict[str, float]:
        return {"theta_saturated": theta_saturated(state, self.params.eps)}
