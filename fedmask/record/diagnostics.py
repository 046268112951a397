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

The *global mask* of a state is the mask its broadcast implies, as its mask mode derives it
(:meth:`fedmask.methods.base.MaskMode.global_mask`): FedPM's theta above 0.5 (the
``eval-mask = "threshold"`` mask), the top ``density`` of ``|score|`` per tensor for
edge-popup and biprop, the argmax candidate per connection for Slot Machines. LaPerm's
ranks have no mask: None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Masks = dict[str, np.ndarray]

# The round-line keys (rounds.jsonl); each is null where it does not apply.
DIAGNOSTIC_KEYS = ("global_flip_rate", "client_drift", "client_drift_max", "theta_saturated", "theta_entropy_bits")


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


def round_diagnostics(before: Masks | None, after: Masks | None, tally: DriftTally,
                      state_figures: dict[str, float] | None = None) -> dict[str, Any]:
    """The round line's diagnostics: every key of :data:`DIAGNOSTIC_KEYS`, None where it does
    not apply. ``state_figures``: what the mask mode and the rule say of the new state
    (FedPM: ``theta_entropy_bits``, ``theta_saturated``)."""
    drift, drift_max = tally.result()
    figures = {"global_flip_rate": flip_rate(before, after), "client_drift": drift, "client_drift_max": drift_max}
    return {key: figures.get(key, (state_figures or {}).get(key)) for key in DIAGNOSTIC_KEYS}
