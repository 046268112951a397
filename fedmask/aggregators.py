"""How a server turns the clients' masks into the next global state.

This is the plug-in point. A strategy is a small class: it says which kind of mask its
clients train (``mask_mode``), builds the first global state, and maps decoded masks with
their client weights to the next state. Flower, codecs, the ledger and failures are handled
around it (the Flower strategy in ``server.strategies``), so the same class also runs in a
plain loop. It is pure numpy: state and masks in, next state out.

The meaning of the state follows ``mask_mode`` (clients rely on it):

- ``bernoulli``: per-weight keep probabilities ``theta`` in (0, 1); clients start their
  scores at ``logit(theta)`` and upload one Bernoulli sample.
- ``topk`` (and ``biprop``): per-weight scores; clients keep the ``density`` fraction of
  largest ``|score|`` per tensor, start from these scores and upload their top-k mask.
- ``slots``: (K, *shape) scores per tensor, K candidates per connection; clients start
  from them and upload the index they choose per connection. ``aggregate`` then gets
  integer index arrays of the connection shape instead of bool masks.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fedmask.masking import topk_mask_np as topk_mask

if TYPE_CHECKING:
    from fedmask.config import RunConfig

State = dict[str, np.ndarray]
Masks = dict[str, np.ndarray]


class MaskAggregator(ABC):
    """Base class of every mask strategy; subclass it and name it as ``module:Class``."""

    mask_mode: ClassVar[str] = "bernoulli"

    def __init__(self, config: RunConfig):
        self.config = config

    def initial_state(self, scores: State) -> State:
        """First broadcast, from the model's seeded initial scores."""
        if self.mask_mode == "bernoulli":
            return {k: (1.0 / (1.0 + np.exp(-v))).astype(np.float32) for k, v in scores.items()}
        return {k: v.astype(np.float32) for k, v in scores.items()}

    def state_dict(self) -> State:
        """Memory kept between rounds (saved in checkpoints); none by default."""
        return {}

    def load_state_dict(self, arrays: State) -> None:  # noqa: B027 - an optional hook, empty by default
        """Restore what :meth:`state_dict` returned, when a run resumes."""

    # ------------------------------------------------------------ streaming
    # The server folds each decoded upload in as it arrives (in partition order) and asks
    # for the next state at the end, so it never holds a round's masks. A plug-in that
    # defines only ``aggregate`` gets this default: the masks are kept until ``finish``.

    def fold(self, server_round: int, state: State, mask: Masks, weight: float) -> None:
        """Take one client's decoded mask (same keys and shapes as ``aggregate`` gets)."""
        _pending(self).append((mask, weight))

    def finish(self, server_round: int, state: State) -> State:
        """The next state from everything folded since the last ``finish`` (or ``discard``)."""
        pending = _pending(self)
        masks, weights = [m for m, _ in pending], [w for _, w in pending]
        self.discard()
        return self.aggregate(server_round, state, masks, weights)

    def discard(self) -> None:
        """Forget what was folded (a round skipped for too few uploads)."""
        self.__dict__["_fold_pending"] = []

    @abstractmethod
    def aggregate(
        self, server_round: int, state: State, masks: list[Masks], weights: list[float]
    ) -> State:
        """The next global state from this round's decoded masks (bool arrays).

        ``weights`` are the clients' ``num-examples``; ``masks[i]`` has the same keys and
        shapes as ``state``. Return float32 arrays of those shapes.
        """


def _relative(weights: list[float]) -> list[float]:
    """The weights as they are, or divided by the largest when their sum would overflow
    (the vote is the same; a client's claim cannot turn it into inf/inf = NaN)."""
    if math.isfinite(sum(float(w) for w in weights)):
        return [float(w) for w in weights]
    scale = max(weights)
    return [float(w) / scale for w in weights]


def _pending(aggregator: MaskAggregator) -> list[tuple[Masks, float]]:
    return aggregator.__dict__.setdefault("_fold_pending", [])


class VoteSums:
    """Running per-weight sums of 0/1 votes, one client folded in at a time.

    What :func:`robust_vote` computes from a list, kept as sums: the weighted sum of the
    votes and the total weight for ``none``, the unweighted count of ones for ``trimmed``
    and ``median`` (for 0/1 votes a trimmed mean and a median need only that count). The
    sums are added in the order the clients are folded in, with the same float64
    operations as the list version, so folding in the list's order gives the same bits.
    """

    def __init__(self, config: RunConfig):
        self.config = config
        self.rule = config.robust_aggregation
        self.sums: State = {}
        self.total = 0.0
        self.count = 0

    def add(self, mask: Masks, weight: float) -> None:
        for name, m in mask.items():
            value = m.astype(np.float64)
            if self.rule == "none":
                value *= weight
            if name in self.sums:
                self.sums[name] += value
            else:
                self.sums[name] = value
        self.total += weight
        self.count += 1

    def votes(self) -> State:
        if self.rule == "none":
            return {name: s / self.total for name, s in self.sums.items()}
        return _robust_from_counts(self.sums, self.count, self.config)


class Replayable(MaskAggregator):
    """An aggregator whose update a client can replay: ``aggregate`` is exactly
    ``apply(state, *round_votes(...))``, and with ``replay`` a pure function of the previous
    state, the round's aggregated votes (float64 arrays) and the config.

    The ``lossless`` downlink (:mod:`fedmask.broadcast`) sends the votes instead of the
    state, and the client calls :meth:`replay` with the same float64 operations as the
    server, so both hold the bit-identical state. ``absorbing`` aggregators (FedPM with the
    prior reset every round) ignore the previous state.
    """

    @property
    def absorbing(self) -> bool:
        """Whether :meth:`replay` ignores the previous state (then one round's votes give the state)."""
        return False

    def apply(self, server_round: int, state: State, votes: State, clients: float) -> State:
        """The server's update from the votes; :meth:`replay` unless the aggregator keeps memory."""
        return self.replay(state, votes, clients)

    @abstractmethod
    def round_votes(self, server_round: int, state: State, masks: list[Masks],
                    weights: list[float]) -> tuple[State, float]:
        """This round's aggregated votes (float64, by tensor) and the number of uploads."""

    @abstractmethod
    def replay(self, state: State, votes: State, clients: float) -> State:
        """The next state from the previous one and :meth:`round_votes`' result."""

    def aggregate(self, server_round: int, state: State, masks: list[Masks], weights: list[float]) -> State:
        votes, clients = self.round_votes(server_round, state, masks, weights)
        return self.apply(server_round, state, votes, clients)

    aggregate._streams = True  # type: ignore[attr-defined]  # _StreamingVotes folds it natively


def fedpm_theta(ones: np.ndarray, zeros: np.ndarray, eps: float) -> np.ndarray:
    """FedPM's theta from counts of ones and zeros: the Beta(1, 1) posterior mode, clamped.

    The one formula the server's update and a client's replay of the lossless downlink
    share, so both compute the same float32 bits.
    """
    alpha, beta = 1.0 + ones, 1.0 + zeros
    mode = (alpha - 1.0) / (alpha + beta - 2.0)
    return np.clip(mode, eps, 1.0 - eps).astype(np.float32)


class _StreamingVotes(MaskAggregator):
    """Built-in rules: ``fold`` adds to :class:`VoteSums`; ``finish`` turns the sums into
    the next state (``_from_votes``), equal bit for bit to ``aggregate`` on the list."""

    def _streams(self) -> bool:
        """Fold natively, unless a subclass replaced ``aggregate`` (then that decides, on the list)."""
        return bool(getattr(type(self).aggregate, "_streams", False))

    def fold(self, server_round: int, state: State, mask: Masks, weight: float) -> None:
        if not self._streams():
            MaskAggregator.fold(self, server_round, state, mask, weight)
            return
        sums = self.__dict__.get("_vote_sums")
        if sums is None:
            sums = self.__dict__["_vote_sums"] = VoteSums(self.config)
        sums.add(self._votes_of(mask), weight)

    def finish(self, server_round: int, state: State) -> State:
        self.last_round_votes: tuple[State, float] | None = None
        if not self._streams():
            return MaskAggregator.finish(self, server_round, state)
        sums = self.__dict__.pop("_vote_sums", None)
        if sums is None:
            raise ValueError(f"{type(self).__name__}.finish: nothing was folded in this round")
        return self._from_votes(server_round, state, sums.votes(), sums.count)

    def discard(self) -> None:
        self.__dict__.pop("_vote_sums", None)
        MaskAggregator.discard(self)

    def _votes_of(self, mask: Masks) -> Masks:
        return mask

    def _from_votes(self, server_round: int, state: State, votes: State, clients: int) -> State:
        """The next state from the folded vote shares; keeps the round's replayable votes
        (``last_round_votes``) for the lossless downlink."""
        assert isinstance(self, Replayable)
        round_votes = self._round_votes_from_shares(votes, clients)
        self.last_round_votes = (round_votes, clients)
        return self.apply(server_round, state, round_votes, clients)

    def _round_votes_from_shares(self, shares: State, clients: int) -> State:
        return shares


def weighted_vote(masks: list[Masks], weights: list[float]) -> State:
    """Per weight, the weighted fraction of clients that kept it."""
    weights = _relative(weights)
    total = float(sum(weights))
    return {
        name: np.asarray(sum(w * m[name].astype(np.float64) for w, m in zip(weights, masks))) / total
        for name in masks[0]
    }


def robust_vote(masks: list[Masks], weights: list[float], config: RunConfig) -> State:
    """Per weight, the share of clients keeping it, combined as ``robust-aggregation`` says.

    ``none`` is the weighted mean. ``trimmed`` drops the ``trim-fraction`` lowest and
    highest votes of each weight before averaging (for 0/1 votes: ``(ones - t)`` clipped to
    ``[0, n - 2t]``, over ``n - 2t``), so ``t`` liars per weight cannot move it past the honest
    votes. ``median`` is the per-weight majority (0.5 on a tie).
    """
    rule = config.robust_aggregation
    if rule == "none":
        return weighted_vote(masks, weights)
    n = len(masks)
    counts = {name: np.asarray(sum(m[name].astype(np.float64) for m in masks)) for name in masks[0]}
    return _robust_from_counts(counts, n, config)


def _robust_from_counts(counts: State, n: int, config: RunConfig) -> State:
    """``trimmed`` or ``median`` votes from per-weight counts of ones among ``n`` clients."""
    out = {}
    for name, ones in counts.items():
        if config.robust_aggregation == "median":
            out[name] = np.where(ones * 2 > n, 1.0, np.where(ones * 2 == n, 0.5, 0.0))
        else:
            cut = int(config.trim_fraction * n)
            out[name] = np.clip(ones - cut, 0, n - 2 * cut) / (n - 2 * cut)
    return out


def dense_aggregate(states: list[State], weights: list[float], config: RunConfig) -> State:
    """The dense baseline's next weights, as ``robust-aggregation`` says.

    ``none`` is Flower's FedAvg mean (``weight / total`` per client, accumulated in the
    tensors' dtype, clients in the order given). ``trimmed`` is Flower's FedTrimmedAvg rule,
    the unweighted coordinate-wise mean after cutting ``trim-fraction`` of the values at
    each end; ``median`` is FedMedian's coordinate-wise median.
    """
    rule = config.robust_aggregation
    out: State = {}
    if rule == "none":
        weights = _relative(weights)
        total = sum(weights)
        for state, factor in zip(states, [w / total for w in weights]):
            for name, value in state.items():
                if name in out:
                    out[name] += value * factor
                else:
                    out[name] = value * factor
        return {name: np.asarray(v) for name, v in out.items()}
    n = len(states)
    for name, first in states[0].items():
        stacked = np.stack([state[name] for state in states])
        if rule == "median":
            merged = np.median(stacked, axis=0)
        else:
            cut = int(config.trim_fraction * n)
            merged = np.sort(stacked, axis=0)[cut:n - cut].mean(axis=0)
        out[name] = merged.astype(first.dtype)
    return out


class FedPMAggregator(_StreamingVotes, Replayable):
    """FedPM's Bayesian aggregation (Isik et al., ICLR 2023).

    A Beta(1, 1) prior per weight counts the ones and zeros of the uploaded samples;
    the new theta is the posterior mode ``(alpha-1)/(alpha+beta-2)``, clamped to
    ``[eps, 1-eps]`` so that no weight is decided for good. Counts are unweighted, as in
    the reference; the prior is reset every ``fedpm-prior-reset`` rounds (1 = every round,
    which makes theta the plain mean of this round's samples; 0 = never), on the rounds
    :func:`prior_resets` names for ``fedpm-prior-reset-rule``.
    """

    mask_mode = "bernoulli"

    def __init__(self, config: RunConfig):
        super().__init__(config)
        self.ones: State = {}
        self.zeros: State = {}

    def state_dict(self) -> State:
        return {f"ones/{k}": v for k, v in self.ones.items()} | {f"zeros/{k}": v for k, v in self.zeros.items()}

    def load_state_dict(self, arrays: State) -> None:
        self.ones = {k[5:]: v for k, v in arrays.items() if k.startswith("ones/")}
        self.zeros = {k[6:]: v for k, v in arrays.items() if k.startswith("zeros/")}

    @property
    def absorbing(self) -> bool:
        """With the prior reset every round, theta depends on this round's counts alone."""
        return self.config.fedpm_prior_reset == 1

    def round_votes(self, server_round: int, state: State, masks: list[Masks],
                    weights: list[float]) -> tuple[State, float]:
        votes = robust_vote(masks, [1.0] * len(masks), self.config)  # counts are unweighted
        return {k: v * len(masks) for k, v in votes.items()}, len(masks)

    def fold(self, server_round: int, state: State, mask: Masks, weight: float) -> None:
        super().fold(server_round, state, mask, 1.0)  # counts are unweighted

    def _round_votes_from_shares(self, shares: State, clients: int) -> State:
        return {k: v * clients for k, v in shares.items()}

    def apply(self, server_round: int, state: State, votes: State, clients: float) -> State:
        return self.aggregate_counts(server_round, state, votes, int(clients))

    def replay(self, state: State, votes: State, clients: float) -> State:
        """theta from one round's counts of ones (prior reset every round), as the server's."""
        if not self.absorbing:
            raise ValueError("fedpm-prior-reset: a client can replay FedPM's update only when the prior "
                             f"is reset every round (1), got {self.config.fedpm_prior_reset}")
        eps = self.config.fedpm_eps
        return {name: fedpm_theta(np.zeros(state[name].shape) + votes[name],
                                  np.zeros(state[name].shape) + (clients - votes[name]), eps) for name in state}

    def aggregate_counts(self, server_round: int, state: State, ones: State, clients: int) -> State:
        """The update from per-weight counts of ones alone (what secure aggregation reveals)."""
        if not self.ones or prior_resets(server_round, self.config.fedpm_prior_reset,
                                         self.config.fedpm_prior_reset_rule):
            self.ones = {k: np.zeros(v.shape) for k, v in state.items()}
            self.zeros = {k: np.zeros(v.shape) for k, v in state.items()}
        eps = self.config.fedpm_eps
        new_state = {}
        for name in state:
            self.ones[name] += ones[name]
            self.zeros[name] += clients - ones[name]
            new_state[name] = fedpm_theta(self.ones[name], self.zeros[name], eps)
        return new_state


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


class EdgePopupAggregator(_StreamingVotes, Replayable):
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
    (:func:`fedmask.task.scores_of_state`), so a local learning rate means what it means
    under the other rules (raw levels 0..L-1 sit far apart for one epoch of local steps:
    the clients then flip almost nothing and the mask stalls, measured: 4x fewer flips
    and 4-5 points lower on Fashion-MNIST with a fixed scale of unit spread for uniform
    levels). ``edge-popup-server-lr`` does not enter this rule.
    """

    mask_mode = "topk"

    def initial_state(self, scores: State) -> State:
        if self.config.edge_popup_server_rule == "vote-levels":
            levels = self.config.edge_popup_levels
            out = {}
            for name, v in scores.items():
                magnitude = np.abs(v.astype(np.float64))
                top = magnitude.max()
                scaled = magnitude / top * levels if top > 0 else magnitude
                out[name] = _from_levels(np.minimum(np.floor(scaled), levels - 1), levels)
            return out
        return {name: standardised(np.abs(v.astype(np.float64))) for name, v in scores.items()}

    def round_votes(self, server_round: int, state: State, masks: list[Masks],
                    weights: list[float]) -> tuple[State, float]:
        return robust_vote(masks, weights, self.config), len(masks)

    def replay(self, state: State, votes: State, clients: float) -> State:
        server_lr, density = self.config.edge_popup_server_lr, self.config.density
        rule, weight = self.config.edge_popup_server_rule, self.config.edge_popup_vote_weight
        average = rule == "vote-average"
        new_state = {}
        for name, scores in state.items():
            if rule == "vote-levels":
                levels = self.config.edge_popup_levels
                pulled = (1.0 - weight) * _to_levels(scores, levels) + weight * (levels - 1) * votes[name]
                new_state[name] = _from_levels(np.clip(np.rint(pulled), 0, levels - 1), levels)
                continue
            magnitude = standardised(np.abs(scores.astype(np.float64)))
            if average:
                moved = (1.0 - weight) * magnitude + weight * server_lr * votes[name]
            else:
                moved = magnitude + server_lr * (votes[name] - topk_mask(magnitude, density))
            new_state[name] = standardised(moved)
        return new_state


def _from_levels(level: np.ndarray, levels: int) -> np.ndarray:
    """Integer levels 0..levels-1 as the state: the levels themselves, as float32."""
    return np.clip(level, 0, levels - 1).astype(np.float32)


def _to_levels(scores: np.ndarray, levels: int) -> np.ndarray:
    return np.clip(np.rint(scores.astype(np.float64)), 0, levels - 1)


def standardised(magnitude: np.ndarray) -> np.ndarray:
    """Non-negative scores with unit spread; the ranking, all top-k needs, is unchanged
    (also what clients train from under ``vote-levels``: :func:`fedmask.task.scores_of_state`)."""
    spread = magnitude.std()
    return (np.maximum(magnitude, 0.0) / (spread if spread > 0 else 1.0)).astype(np.float32)


class SlotMachineAggregator(_StreamingVotes, Replayable):
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

    def initial_state(self, scores: State) -> State:
        return {name: _centred(v.astype(np.float64)) for name, v in scores.items()}

    def round_votes(self, server_round: int, state: State, masks: list[Masks],
                    weights: list[float]) -> tuple[State, float]:
        onehots = [self._votes_of(m, state) for m in masks]
        return robust_vote(onehots, weights, self.config), len(masks)  # per candidate: share choosing it

    def fold(self, server_round: int, state: State, mask: Masks, weight: float) -> None:
        self.__dict__["_slots"] = next(iter(state.values())).shape[0]
        super().fold(server_round, state, mask, weight)

    def _votes_of(self, mask: Masks, state: State | None = None) -> Masks:
        """Per candidate, whether the client chose it (K, *shape) bools."""
        slots = self.__dict__["_slots"] if state is None else next(iter(state.values())).shape[0]
        candidate = np.arange(slots)
        return {name: candidate.reshape(-1, *[1] * idx.ndim) == idx[None] for name, idx in mask.items()}

    def replay(self, state: State, votes: State, clients: float) -> State:
        candidate = np.arange(next(iter(state.values())).shape[0])
        new_state = {}
        for name, scores in state.items():
            centred = _centred(scores.astype(np.float64)).astype(np.float64)
            if self.config.slot_selection == "greedy":
                current = candidate.reshape(-1, *[1] * (scores.ndim - 1)) == centred.argmax(axis=0)[None]
            else:
                shifted = np.exp(centred - centred.max(axis=0, keepdims=True))
                current = shifted / shifted.sum(axis=0, keepdims=True)
            new_state[name] = _centred(centred + self.config.slot_server_lr * (votes[name] - current))
        return new_state


def _centred(scores: np.ndarray) -> np.ndarray:
    """Scores minus their mean over the K candidates, with unit spread over the tensor."""
    centred = scores - scores.mean(axis=0, keepdims=True)
    spread = centred.std()
    return (centred / (spread if spread > 0 else 1.0)).astype(np.float32)


class BipropAggregator(EdgePopupAggregator):
    """Biprop (Diffenderfer & Kailkhura, ICLR 2021) federated: the same top-k votes as
    edge-popup; clients use ``sign(w) * alpha * mask``, so only the layer maths differ."""

    mask_mode = "biprop"
