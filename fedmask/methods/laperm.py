"""LaPerm (Qiu & Suda, "Train-by-Reconnect", NeurIPS 2020), centrally and federated.

LaPerm never changes a weight's value, only where it sits. Every party regenerates the
seeded values; each *row* of a tensor (the incoming weights of one output unit: a row of a
Linear weight, one output channel of a Conv2d weight; a bias is one row) keeps its
multiset of values for good, as the reference code permutes each weight vector.

Training (the paper's, :meth:`LaPerm.optimizer` and :meth:`LaPerm.after_step` in the one
local loop, :mod:`fedmask.core.training`): an inner Adam (``laperm-lr``) updates a
shadow copy of the weights, which the forward pass uses; every ``laperm-sync`` steps (k)
each row is rewired: its sorted seed values are assigned in the rank order of the shadow
row, and the shadow is reset to the result (Adam's moments are kept, as in the
reference). A client rewires once more at the end of its local round, so what it holds is
a pure arrangement of the seed's values.

Federated protocol:

- **state** (broadcast): per tensor, the rank of every weight inside its row
  (``weight = sorted_row[rank]``), as float32 (exact below 2**24). Downlink: 32 bits per
  weight, as FedAvg's.
- **upload**: the client's final ranks, coded against the broadcast ranks both ends hold
  (:mod:`fedmask.wire.ranks`): per tensor the displacements ``d = rank_client - rank_global``
  range-coded under a quantized Laplace(0, b) with ``b`` (float32) in the section header,
  or the ranks bit-packed with ``ceil(log2 m)`` bits each (m the row length) when that is
  shorter. 28-byte header (magic ``FMPR``, fingerprint of seed/model/init/layout, CRC32
  over the payload and a digest of the broadcast ranks), 11 bytes per tensor. With
  ``laperm-rank-step`` s > 1 the displacements are sent as ``d / s`` stochastically
  rounded (lossy, unbiased; about log2(s) bits per weight fewer): the server then holds
  approximate ranks ``prior + s * q``, which the Borda count sums as it sums exact ones.
- **merge** (:func:`borda_merge`): per weight the sum of the clients' ranks (integers: the
  sum is exact, so independent of arrival order); each row is re-ranked by that sum (a
  Borda count), ties broken by the previous global rank (unique per row). The new state is
  again a permutation of each row, so the multiset invariant holds by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from fedmask.core.masking import MaskedTensor, SeededTensor, score_masks, set_scores
from fedmask.methods.base import MaskAggregator, MaskMode, Masks, Restriction, Settings, State, mask_mode
from fedmask.wire.frame import Layout
from fedmask.wire.masks import Prior
from fedmask.wire.ranks import code_lengths, decode_ranks, encode_ranks, is_permutation, row_shape


def ranks_of(values: np.ndarray) -> np.ndarray:
    """Each entry's rank inside its row (0 = smallest; equal values by index), int64."""
    rows = values.reshape(row_shape(values.shape))
    order = np.argsort(rows, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(rows.shape[1])[None, :].repeat(rows.shape[0], 0), axis=1)
    return ranks.reshape(values.shape)


def _torch_ranks(rows: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(rows, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(rows.shape[1], device=rows.device).expand_as(order).contiguous())
    return ranks


def sorted_rows(values: np.ndarray) -> np.ndarray:
    """Each row's values in ascending order: what a rank indexes."""
    return np.sort(values.reshape(row_shape(values.shape)), axis=1)


def arrange(sorted_values: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """The weights ``sorted_row[rank]``, in the ranks' shape."""
    rows = np.take_along_axis(sorted_values, ranks.reshape(sorted_values.shape).astype(np.int64), axis=1)
    return rows.reshape(ranks.shape)


def state_ranks(state: State) -> dict[str, np.ndarray]:
    """The broadcast state (float32 ranks) as int64 ranks, checked to be permutations."""
    out = {}
    for name, value in state.items():
        ranks = np.rint(np.asarray(value, dtype=np.float64)).astype(np.int64)
        if not np.array_equal(ranks, value) or not is_permutation(ranks):
            raise ValueError(f"laperm state '{name}': expected a permutation of 0..m-1 in every row")
        out[name] = ranks
    return out


# ---------------------------------------------------------------------------- the model


class Rewired(MaskedTensor):
    """A LaPerm tensor as a parametrization: the weight is the shadow copy (``scores``,
    trained by the inner optimizer); :meth:`rewire` snaps it to the arrangement of the
    sorted seed values (``sorted``, per row) in the shadow's rank order."""

    def __init__(self, frozen: torch.Tensor):
        super().__init__()
        rows = row_shape(tuple(frozen.shape))
        self.register_buffer("sorted", torch.sort(frozen.detach().reshape(rows), dim=1).values.clone())
        self.scores = nn.Parameter(frozen.detach().clone())

    def forward(self, unused: torch.Tensor) -> torch.Tensor:
        return self.scores

    @torch.no_grad()
    def rewire(self) -> None:
        """Synchronization: reset the shadow to the sorted values in its own rank order."""
        srt = cast(torch.Tensor, self.sorted)
        ranks = _torch_ranks(self.scores.reshape(srt.shape))
        self.scores.copy_(srt.gather(1, ranks).reshape(self.scores.shape))


def rewired_modules(model: nn.Module) -> dict[str, Rewired]:
    return {n: m for n, m in score_masks(model).items() if isinstance(m, Rewired)}


def rewire(model: nn.Module) -> None:
    for module in rewired_modules(model).values():
        module.rewire()


@torch.no_grad()
def arrangement(model: nn.Module) -> dict[str, np.ndarray]:
    """The current rank of every weight in its row (what a client uploads, after a rewire)."""
    return {name: ranks_of(module.scores.detach().cpu().numpy()) for name, module in rewired_modules(model).items()}


def load_ranks(model: nn.Module, state: State) -> None:
    """Put a broadcast arrangement (ranks) into the model: shadow = sorted[rank]."""
    ranks = state_ranks(state)
    values = {}
    for name, module in rewired_modules(model).items():
        if name not in ranks:
            raise ValueError(f"laperm state: expected tensor '{name}'")
        srt = cast(torch.Tensor, module.sorted).cpu().numpy()
        values[name] = arrange(srt, ranks[name]).astype(np.float32)
    set_scores(model, values)


# ---------------------------------------------------------------------------- merge


def borda_merge(state: State, uploads: list[Masks]) -> State:
    """Borda count per row: re-rank by the sum of the clients' ranks (ties: previous rank).

    Integer sums make the result independent of the order of ``uploads``.
    """
    if not uploads:
        raise ValueError("borda_merge: expected at least one upload")
    current = state_ranks(state)
    out = {}
    for name, ranks in current.items():
        shape = row_shape(ranks.shape)
        total = np.zeros(shape, dtype=np.int64)
        for upload in uploads:
            total += np.asarray(upload[name], dtype=np.int64).reshape(shape)
        order = np.lexsort((ranks.reshape(shape), total), axis=1)  # by total, then previous rank
        merged = np.empty(shape, dtype=np.int64)
        np.put_along_axis(merged, order, np.arange(shape[1])[None, :].repeat(shape[0], 0), axis=1)
        out[name] = merged.reshape(ranks.shape).astype(np.float32)
    return out


class LaPermAggregator(MaskAggregator):
    """Federated LaPerm: clients upload arrangements (ranks), the server merges them by a
    Borda count per row (:func:`borda_merge`); the state is the global ranks."""

    mask_mode = "laperm"

    def __init__(self, config: Any = None):
        super().__init__(config)

    @classmethod
    def from_config(cls, config: Settings) -> LaPermAggregator:
        return cls()

    def aggregate(self, server_round: int, state: State, masks: list[Masks], weights: list[float]) -> State:
        return borda_merge(state, masks)


# ---------------------------------------------------------------------------- the mode


@mask_mode
@dataclass(frozen=True)
class LaPerm(MaskMode):
    """LaPerm's arrangement: the state is ranks; a client uploads its ranks."""

    name = "laperm"
    has_mask = False
    sync: int = 20  # rewire every k inner-optimizer steps (the paper's sync period)
    lr: float = 0.001  # the inner Adam's learning rate on the shadow weights
    rank_step: int = 1  # uploads send rank displacements / rank_step, stochastically rounded

    @classmethod
    def from_config(cls, config: Settings) -> LaPerm:
        return cls(config["laperm-sync"], config["laperm-lr"], config["laperm-rank-step"])

    @classmethod
    def restrictions(cls) -> dict[str, Restriction]:
        return super().restrictions() | {
            "attack": Restriction(("none",), "the attacks rewrite binary masks, LaPerm uploads ranks"),
            "robust-aggregation": Restriction(("none",), "LaPerm merges ranks by a Borda count"),
            "downlink-codec": Restriction(("float32", "lossless"), "the broadcast ranks must arrive exactly "
                                          "(lossless sends LaPerm's full float32 state)")}

    @staticmethod
    def seed_state(scores: State) -> State:
        """The seed's own arrangement: the rank of every seeded value in its row."""
        return {name: ranks_of(v).astype(np.float32) for name, v in scores.items()}

    def parametrize(self, tensor: SeededTensor) -> tuple[nn.Module, torch.Tensor]:
        frozen = tensor.frozen()
        return Rewired(frozen), frozen  # the shadow weights start at the seeded values

    def load_scores(self, model: nn.Module, scores: State) -> None:
        """The state's ranks (its own scores): the seeded values put in that order."""
        load_ranks(model, scores)

    def optimizer(self) -> Callable[[list[torch.Tensor]], Any]:
        lr = self.lr
        return lambda params: torch.optim.Adam(params, lr=lr)

    def after_step(self, model: nn.Module) -> Callable[[int], None]:
        def step(count: int) -> None:
            if count % self.sync == 0:
                rewire(model)

        return step

    def after_training(self, model: nn.Module) -> None:
        rewire(model)  # what a client holds and uploads is a pure arrangement of the seed's values

    def upload(self, model: nn.Module, probabilities: bool = False) -> Masks:
        return arrangement(model)

    def encode_upload(self, upload: Masks, layout: Layout, fingerprint: bytes, codec: str, prior: Prior | None,
                      rng: np.random.Generator, bind: tuple[int, int] | None = None) -> np.ndarray:
        return encode_ranks(upload, layout, fingerprint, codec=codec, prior=prior, step=self.rank_step, rng=rng,
                            bind=bind)

    def decode_upload(self, blob: np.ndarray, layout: Layout, fingerprint: bytes, prior: Prior | None,
                      codec: str, lengths: dict[str, float], bind: tuple[int, int] | None = None) -> Masks:
        ranks = decode_ranks(blob, layout, fingerprint, prior, self.rank_step, bind)
        lengths.update(code_lengths(ranks, layout, codec, prior, self.rank_step))
        return ranks

    def prior(self, state: State) -> Prior:
        """The broadcast ranks, as integers: uploads are coded as displacements from them."""
        return {k: np.rint(v).astype(np.int64) for k, v in state.items()}

    def global_mask(self, state: State) -> None:
        return None
