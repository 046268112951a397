"""Votes: what the built-in rules make of the clients' masks, and the rule they share.

Every built-in mask rule (FedPM, edge-popup, Biprop, Slot Machines) first turns the round's
uploads into one vote per weight, the share of clients keeping it, combined as
``robust-aggregation`` says (:class:`VoteRule`), and then moves the global state by that
vote (:meth:`Voting.replay`). The vote is summed one upload at a time (:class:`VoteSums`),
so the server never holds a round's masks; the sums are float64 and added in partition
order, so the result does not depend on when replies arrive. :func:`weighted_vote` and
:func:`robust_vote` are the same votes from a list, for plug-ins.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass

import numpy as np

from fedmask.methods.base import MaskAggregator, Masks, RoundResult, Settings, State
from fedmask.names import ROBUST_RULES


@dataclass(frozen=True)
class VoteRule:
    """How one weight's votes combine: ``none`` (the weighted mean), ``trimmed`` (cut
    ``trim_fraction`` of the votes at each end) or ``median`` (the majority; 0.5 on a tie)."""

    rule: str = "none"
    trim_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.rule not in ROBUST_RULES:
            raise ValueError(f"robust-aggregation: expected one of {', '.join(ROBUST_RULES)}, got {self.rule!r}")

    @classmethod
    def from_config(cls, config: Settings) -> VoteRule:
        return cls(config["robust-aggregation"], config["trim-fraction"])

    def from_counts(self, counts: State, n: int) -> State:
        """``trimmed`` or ``median`` votes from per-weight counts of ones among ``n`` clients
        (for 0/1 votes both need only that count: ``(ones - t)`` clipped to ``[0, n - 2t]``,
        over ``n - 2t``, so ``t`` liars per weight cannot move it past the honest votes)."""
        out = {}
        for name, ones in counts.items():
            if self.rule == "median":
                out[name] = np.where(ones * 2 > n, 1.0, np.where(ones * 2 == n, 0.5, 0.0))
            else:
                cut = int(self.trim_fraction * n)
                out[name] = np.clip(ones - cut, 0, n - 2 * cut) / (n - 2 * cut)
        return out


def relative(weights: list[float]) -> list[float]:
    """The weights as they are, or divided by the largest when their sum would overflow
    (the vote is the same; a client's claim cannot turn it into inf/inf = NaN)."""
    if math.isfinite(sum(float(w) for w in weights)):
        return [float(w) for w in weights]
    scale = max(weights)
    return [float(w) / scale for w in weights]


class VoteSums:
    """Running per-weight sums of 0/1 votes, one client folded in at a time: the weighted
    sum and the total weight for ``none``, the unweighted count of ones for ``trimmed`` and
    ``median``. Folding in a list's order gives :func:`robust_vote`'s bits."""

    def __init__(self, rule: VoteRule):
        self.rule = rule
        self.sums: State = {}
        self.total = 0.0
        self.count = 0

    def add(self, mask: Masks, weight: float) -> None:
        for name, m in mask.items():
            value = m.astype(np.float64)
            if self.rule.rule == "none":
                value *= weight
            if name in self.sums:
                self.sums[name] += value
            else:
                self.sums[name] = value
        self.total += weight
        self.count += 1

    def votes(self) -> State:
        if self.rule.rule == "none":
            return {name: s / self.total for name, s in self.sums.items()}
        return self.rule.from_counts(self.sums, self.count)


def weighted_vote(masks: list[Masks], weights: list[float]) -> State:
    """Per weight, the weighted fraction of clients that kept it."""
    weights = relative(weights)
    total = float(sum(weights))
    return {
        name: np.asarray(sum(w * m[name].astype(np.float64) for w, m in zip(weights, masks))) / total
        for name in masks[0]
    }


def robust_vote(masks: list[Masks], weights: list[float], rule: VoteRule | Settings) -> State:
    """Per weight, the share of clients keeping it, combined as ``rule`` says (a
    :class:`VoteRule`, or the run config's ``robust-aggregation`` and ``trim-fraction``)."""
    rule = rule if isinstance(rule, VoteRule) else VoteRule.from_config(rule)
    if rule.rule == "none":
        return weighted_vote(masks, weights)
    counts = {name: np.asarray(sum(m[name].astype(np.float64) for m in masks)) for name in masks[0]}
    return rule.from_counts(counts, len(masks))


class Voting(MaskAggregator):
    """A built-in rule: each upload is folded into :class:`VoteSums` as it arrives; at the
    end of the round the votes move the state by :meth:`replay`, a pure function of the
    previous state and the votes, with float64 operations a node repeats bit for bit (so the
    lossless downlink can send the votes instead of the state)."""

    replayable = True

    def __init__(self, votes: VoteRule):
        super().__init__()
        self.vote_rule = votes
        self.sums: VoteSums | None = None

    # what the round's uploads are as votes, and as the replayed quantity

    def votes_of(self, mask: Masks, state: State) -> Masks:
        """A decoded upload as 0/1 votes (Slot Machines: one per candidate)."""
        return mask

    def weight_of(self, weight: float) -> float:
        """A client's weight in the vote (FedPM counts every client once)."""
        return weight

    def round_votes(self, shares: State, clients: int) -> State:
        """The round's votes as :meth:`replay` takes them, from the folded shares (FedPM: counts)."""
        return shares

    @property
    def absorbing(self) -> bool:
        """Whether :meth:`replay` ignores the previous state (then one round's votes give the state)."""
        return False

    def fold(self, server_round: int, state: State, mask: Masks, weight: float) -> None:
        if self.sums is None:
            self.sums = VoteSums(self.vote_rule)
        self.sums.add(self.votes_of(mask, state), self.weight_of(weight))

    def finish(self, server_round: int, state: State) -> RoundResult:
        sums, self.sums = self.sums, None
        if sums is None:
            raise ValueError(f"{type(self).__name__}.finish: nothing was folded in this round")
        votes = self.round_votes(sums.votes(), sums.count)
        return RoundResult(self.apply(server_round, state, votes, sums.count), votes, sums.count)

    def discard(self) -> None:
        self.sums = None

    def aggregate(self, server_round: int, state: State, masks: list[Masks], weights: list[float]) -> State:
        """The same votes from a list (what a plain loop calls); weights whose sum would
        overflow are scaled first (the server refuses such weights before they are folded)."""
        self.discard()
        for mask, weight in zip(masks, relative(weights)):
            self.fold(server_round, state, mask, weight)
        return self.finish(server_round, state).state

    def apply(self, server_round: int, state: State, votes: State, clients: float) -> State:
        """The server's update from the votes; :meth:`replay` unless the rule keeps memory."""
        return self.replay(state, votes, clients)

    @abstractmethod
    def replay(self, state: State, votes: State, clients: float) -> State:
        """The next state from the previous one and the round's votes."""
