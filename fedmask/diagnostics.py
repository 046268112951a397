"""Per-round diagnostics of the mask methods (issue 14): how the global mask moves, how far
clients stray from it, how much of FedPM's theta is still undecided.

Everything here is computed by the server from what it already holds: the state before and
after aggregation, the prior of the broadcast the round's clients trained from (the one the
uplink codec decodes against) and each upload as it is decoded. Nothing is sent for it, and
no round's uploads are held together: :class:`DriftTally` folds each client in as two
integers (entries that differ, the largest such count), so the cost is one comparison pass
over a client's mask, O(params), and O(params) per round for the new state's global mask.
Counts are integers and the fractions are taken at the end, so the figures do not depend
on the order clients are folded in.

The *global mask* of a state is the mask its broadcast implies, as :func:`fedmask.codec.mask_prior`
derives it for the uplink coder: FedPM's theta above 0.5 (the ``eval-mask = "threshold"``
mask), the top ``density`` of ``|score|`` per tensor for edge-popup and biprop, the argmax
candidate per connection for Slot Machines. LaPerm's ranks have no mask: None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmask.codec import MaskLayout, Prior, mask_prior, planes_to_choices

Masks = dict[str, np.ndarray]

# The round-line keys (rounds.jsonl); each is null where it does not apply.
DIAGNOSTIC_KEYS = ("global_flip_rate", "client_drift", "client_drift_max", "theta_saturated", "theta_entropy_bits")


def mask_of_prior(prior: Prior, mask_mode: str, layout: MaskLayout) -> Masks | None:
    """The global mask a broadcast's prior (:func:`fedmask.codec.mask_prior`) stands for:
    bools for ``bernoulli`` (theta > 0.5) and top-k modes, slot indices for ``slots``
    (``layout`` is the state's), None for ``laperm`` or a mode it does not know."""
    if mask_mode == "bernoulli":
        return {name: value > 0.5 for name, value in prior.items()}
    if mask_mode in ("topk", "biprop"):
        return {name: value == 1.0 for name, value in prior.items()}
    if mask_mode == "slots":
        return planes_to_choices(prior, layout)
    return None


def global_mask(state: dict[str, np.ndarray], mask_mode: str, density: float, layout: MaskLayout) -> Masks | None:
    """The global mask ``state`` implies (see the module docstring)."""
    if mask_mode not in ("bernoulli", "topk", "biprop", "slots"):
        return None
    return mask_of_prior(mask_prior(state, mask_mode, density), mask_mode, layout)


def differing(mask: Masks, reference: Masks) -> int:
    """Entries (weights, or connections for slot indices) where ``mask`` and ``reference`` differ."""
    return sum(int(np.count_nonzero(np.asarray(mask[name]) != value)) for name, value in reference.items())


def entries(masks: Masks) -> int:
    return sum(int(value.size) for value in masks.values())


def flip_rate(before: Masks | None, after: Masks | None) -> float | None:
    """Fraction of global-mask entries that changed from ``before`` to ``after``."""
    if before is None or after is None:
        return None
    return differing(after, before) / max(entries(before), 1)


@dataclass
class DriftTally:
    """Client drift, one upload at a time: each client's count of entries that differ from
    ``reference`` (the global mask of the broadcast it trained from), summed and maxed."""

    reference: Masks | None
    clients: int = 0
    total: int = 0
    most: int = 0

    def add(self, mask: Masks) -> None:
        if self.reference is None:
            return
        count = differing(mask, self.reference)
        self.clients += 1
        self.total += count
        self.most = max(self.most, count)

    def result(self) -> tuple[float | None, float | None]:
        """(mean, max) over the clients added of their fraction of differing entries."""
        if self.reference is None or not self.clients:
            return None, None
        size = max(entries(self.reference), 1)
        return self.total / (self.clients * size), self.most / size


def theta_entropy_bits(theta: dict[str, np.ndarray]) -> float:
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


def theta_saturated(theta: dict[str, np.ndarray], eps: float) -> float:
    """Fraction of theta at FedPM's clamp: <= eps or >= 1 - eps, compared in theta's own
    dtype (the clamp is applied in float64, then theta is rounded to float32)."""
    at_clamp, count = 0, 0
    for value in theta.values():
        low, high = np.asarray(eps).astype(value.dtype), np.asarray(1.0 - eps).astype(value.dtype)
        at_clamp += int(np.count_nonzero((value <= low) | (value >= high)))
        count += value.size
    return at_clamp / max(count, 1)


def round_diagnostics(before: Masks | None, after: Masks | None, tally: DriftTally,
                      theta: dict[str, np.ndarray] | None = None, eps: float | None = None) -> dict[str, Any]:
    """The round line's diagnostics (every key of :data:`DIAGNOSTIC_KEYS`, None where it does not apply).

    ``theta``: the new state, for a ``bernoulli`` state (entropy); ``eps``: FedPM's clamp
    (saturation), when the aggregator is FedPM's.
    """
    drift, drift_max = tally.result()
    return {
        "global_flip_rate": flip_rate(before, after),
        "client_drift": drift,
        "client_drift_max": drift_max,
        "theta_saturated": None if theta is None or eps is None else theta_saturated(theta, eps),
        "theta_entropy_bits": None if theta is None else theta_entropy_bits(theta),
    }
