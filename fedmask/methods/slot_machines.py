"""Slot Machines (Aladago & Torresani, ICML 2021), federated.

Client: every connection holds K seeded candidate values and K scores; the weight used is
the chosen candidate (the argmax score, ``greedy``, or a softmax sample, ``probabilistic``),
straight-through to every candidate's score; the upload is the chosen index per connection,
as ``ceil(log2 K)`` bit-planes so the one binary codec carries it. Server: a client's choice
is a vote per candidate; votes move the K scores (:class:`SlotMachineAggregator`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmask.core.masking import MaskedTensor, SeededTensor, kaiming_uniform_scores, score_masks
from fedmask.methods.base import MaskMode, Masks, Restriction, Settings, State, mask_mode
from fedmask.methods.votes import VoteRule, Voting
from fedmask.names import EVAL_MASKS, SLOT_SCORE_INITS, SLOT_SELECTIONS
from fedmask.wire.frame import Layout
from fedmask.wire.masks import FRAME, Prior


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


class SlotChoice(MaskedTensor):
    """Slot Machines as a parametrization: ``candidates`` (K, *shape) are seeded and frozen,
    ``scores`` (K, *shape) are trained (see :class:`SlotWeight`). The parametrization's
    ``original`` is unused (zeros): the candidates are the frozen values."""

    def __init__(self, candidates: torch.Tensor, scores: torch.Tensor, selection: str, eval_mask: str):
        super().__init__()
        self.selection, self.eval_mask = selection, eval_mask
        self.register_buffer("candidates", candidates)
        self.scores = nn.Parameter(scores)

    def frozen_values(self, original: torch.Tensor) -> torch.Tensor:
        return self.get_buffer("candidates")

    def sampling(self) -> bool:
        """Sampled when training probabilistically, and in evaluation when ``eval-mask`` is
        ``sample``; the argmax otherwise."""
        return self.selection == "probabilistic" and (self.training or self.eval_mask == "sample")

    def forward(self, unused: torch.Tensor) -> torch.Tensor:
        return SlotWeight.apply(self.scores, self.get_buffer("candidates"), self.sampling())


def slot_bits(slots: int) -> int:
    """Bits that carry one slot index: ceil(log2 K)."""
    return max(1, math.ceil(math.log2(slots)))


def choices_to_planes(choices: Masks, slots: int) -> Masks:
    """Slot indices (integers < K) as the bit-planes ``name/bit0`` (least significant) ..."""
    return {f"{name}/bit{j}": ((index.astype(np.int64) >> j) & 1).astype(bool)
            for name, index in choices.items() for j in range(slot_bits(slots))}


def planes_to_choices(planes: Masks, layout: Layout) -> Masks:
    """The slot indices back from bit-planes (``layout``: the state's); an index >= K
    (possible when K is not a power of two) is a :class:`~fedmask.wire.frame.WireError`."""
    out = {}
    for name, shape in layout.shapes:
        slots = shape[0]
        index = np.zeros(shape[1:], dtype=np.int64)
        for j in range(slot_bits(slots)):
            index |= planes[f"{name}/bit{j}"].astype(np.int64) << j
        if index.size and int(index.max()) >= slots:
            raise FRAME.error(f"'{name}' slot index", f"< {slots} (slots)", int(index.max()))
        out[name] = index.astype(np.uint8)
    return out


@mask_mode
@dataclass(frozen=True)
class Slots(MaskMode):
    """Slot Machines' choice: the state is (K, *shape) scores; a client uploads its choice."""

    name = "slots"
    slots: int = 8  # K candidates per connection
    selection: str = "greedy"  # or "probabilistic": a softmax sample
    eval_mask: str = "threshold"  # probabilistic selection: evaluate the argmax, or "sample"
    score_init: str = "kaiming-uniform"  # or "reference": U(0, Glorot's bound)

    def __post_init__(self) -> None:
        if not 2 <= self.slots <= 64:
            raise ValueError(f"slots: expected a candidate count in 2..64, got {self.slots}")
        for key, value, choices in (("slot-selection", self.selection, SLOT_SELECTIONS),
                                    ("eval-mask", self.eval_mask, EVAL_MASKS),
                                    ("slot-score-init", self.score_init, SLOT_SCORE_INITS)):
            if value not in choices:
                raise ValueError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")

    @classmethod
    def from_config(cls, config: Settings) -> Slots:
        return cls(config["slots"], config["slot-selection"], config["eval-mask"], config["slot-score-init"])

    @classmethod
    def restrictions(cls) -> dict[str, Restriction]:
        return super().restrictions() | {"init": Restriction(
            ("kaiming-uniform", "kaiming-normal"),
            "a signed constant gives every connection only two distinct candidate values")}

    def parametrize(self, tensor: SeededTensor) -> tuple[nn.Module, torch.Tensor]:
        shape = (self.slots, *tensor.shape)
        candidates = tensor.frozen(shape)
        if self.score_init == "reference":  # Slot Machines' reference: U(0, b), b = sqrt(6 / (fan_in + fan_out))
            bound = math.sqrt(6.0 / (tensor.fan_in + tensor.fan_out))
            scores = torch.rand(shape, generator=tensor.generator()) * bound
        else:
            scores = kaiming_uniform_scores(tensor, shape)
        return SlotChoice(candidates, scores, self.selection, self.eval_mask), torch.zeros(tensor.shape)

    @torch.no_grad()
    def choices(self, model: nn.Module, sample: bool | None = None) -> Masks:
        """The chosen candidate per connection (uint8): with ``sample`` (probabilistic
        selection) a draw from the softmax, as a client uploads; else the argmax; by default
        as the module's train/eval setting says."""
        out = {}
        for name, module in score_masks(model).items():
            sampling = module.sampling() if sample is None else sample and module.selection == "probabilistic"
            out[name] = slot_index(module.scores, sampling).cpu().numpy().astype(np.uint8)
        return out

    def upload(self, model: nn.Module, probabilities: bool = False) -> Masks:
        return choices_to_planes(self.choices(model, sample=True), self.slots)

    def upload_layout(self, layout: Layout) -> Layout:
        """The chosen index per connection as ceil(log2 K) bit-planes ``name/bit0`` ..., each
        of the connection shape (the state is (K, *shape) scores per tensor)."""
        planes = [(f"{name}/bit{j}", shape[1:]) for name, shape in layout.shapes for j in range(slot_bits(shape[0]))]
        return Layout(tuple(sorted(planes)))

    def votes(self, upload: Masks, state_layout: Layout) -> Masks:
        return planes_to_choices(upload, state_layout)

    def prior(self, state: State) -> Prior:
        """Each bit-plane's prior is that bit of the global argmax index (also under
        probabilistic selection: argmax is exact comparisons, so every machine derives the
        same prior, where a softmax's ``exp`` may differ in the last bit between CPUs and
        make the CRC refuse every upload)."""
        prior: Prior = {}
        for name, scores in state.items():
            planes = choices_to_planes({name: np.argmax(scores, axis=0)}, scores.shape[0])
            prior |= {k: v.astype(np.float64) for k, v in planes.items()}
        return prior

    def global_mask(self, state: State) -> Masks:
        """The global choice per connection (the argmax candidate)."""
        return {name: np.argmax(scores, axis=0).astype(np.uint8) for name, scores in state.items()}

    def colluding_upload(self, state: State) -> Masks:
        """Candidate K-1-argmax on every connection, as bit-planes."""
        planes: Masks = {}
        for name, scores in state.items():
            slots = scores.shape[0]
            planes |= choices_to_planes({name: slots - 1 - np.argmax(scores, axis=0)}, slots)
        return planes

    def vote_contexts(self, state: State) -> dict[str, tuple[np.ndarray, int]]:
        """Whether the candidate is the current choice."""
        out = {}
        for name, value in state.items():
            choice = np.argmax(value, axis=0)
            onehot = np.arange(value.shape[0]).reshape(-1, *[1] * choice.ndim) == choice[None]
            out[name] = (onehot.astype(np.int64).ravel(), 2)
        return out


# ---------------------------------------------------------------- the server's rule


@dataclass(frozen=True)
class SlotParams:
    server_lr: float = 2.0  # how far the clients' choices move the scores, in units of their spread
    selection: str = "greedy"
    votes: VoteRule = VoteRule()

    @classmethod
    def from_config(cls, config: Settings) -> SlotParams:
        return cls(config["slot-server-lr"], config["slot-selection"], VoteRule.from_config(config))


def _centred(scores: np.ndarray) -> np.ndarray:
    """Scores minus their mean over the K candidates, with unit spread over the tensor."""
    centred = scores - scores.mean(axis=0, keepdims=True)
    spread = centred.std()
    return (centred / (spread if spread > 0 else 1.0)).astype(np.float32)


class SlotMachineAggregator(Voting):
    """Federated Slot Machines: a client's choice of candidate is a vote; votes move scores.

    Per connection the server keeps K scores, centred (their mean over the K candidates
    is 0; neither argmax nor softmax sees it) and scaled to unit spread per tensor as
    edge-popup's are, for the same reason: a local learning rate must be able to change a
    choice in one round. With ``h`` the clients' weighted histogram of choices (the share
    choosing each candidate), the update is ``scores += slot-server-lr * (h - current)``,
    ``current`` being the global choice (one-hot of the argmax for greedy selection, the
    softmax for probabilistic). For softmax this is one gradient-ascent step on the
    log-likelihood of the clients' choices; for greedy, its straight-through analogue.
    Either way a connection on which every client keeps the global choice does not move.
    Setting scores to the histogram (the naive rule) would stall as edge-popup's did.
    """

    mask_mode = "slots"

    def __init__(self, params: SlotParams = SlotParams()):
        super().__init__(params.votes)
        self.params = params

    @classmethod
    def from_config(cls, config: Settings) -> SlotMachineAggregator:
        return cls(SlotParams.from_config(config))

    def initial_state(self, scores: State) -> State:
        return {name: _centred(v.astype(np.float64)) for name, v in scores.items()}

    def votes_of(self, mask: Masks, state: State) -> Masks:
        """Per candidate, whether the client chose it (K, *shape) bools."""
        candidate = np.arange(next(iter(state.values())).shape[0])
        return {name: candidate.reshape(-1, *[1] * idx.ndim) == idx[None] for name, idx in mask.items()}

    def replay(self, state: State, votes: State, clients: float) -> State:
        candidate = np.arange(next(iter(state.values())).shape[0])
        new_state = {}
        for name, scores in state.items():
            centred = _centred(scores.astype(np.float64)).astype(np.float64)
            if self.params.selection == "greedy":
                current = candidate.reshape(-1, *[1] * (scores.ndim - 1)) == centred.argmax(axis=0)[None]
            else:
                shifted = np.exp(centred - centred.max(axis=0, keepdims=True))
                current = shifted / shifted.sum(axis=0, keepdims=True)
            new_state[name] = _centred(centred + self.params.server_lr * (votes[name] - current))
        return new_state

