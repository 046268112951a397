"""What went wrong with one client in one round, as a record with a kind.

Counts come from kinds, never from the wording of a reason; the reason is for people.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

FAILURE_KINDS = (
    "dropped",       # the simulator dropped the client (fault-drop-rate): no reply will come
    "no-reply",      # no reply before round-timeout
    "client-error",  # the ClientApp raised: Flower returned an error reply
    "rejected",      # a reply arrived and the server refused it (bad upload, weight or metrics)
)
NOT_HEARD = ("dropped", "no-reply")  # kinds of failure that sent no reply


@dataclass(frozen=True)
class Failure:
    """One client's failure in one round (rounds.jsonl's ``failure_details`` rows)."""

    kind: str
    partition_id: int
    node_id: int
    reason: str

    def __post_init__(self) -> None:
        if self.kind not in FAILURE_KINDS:
            raise ValueError(f"failure kind: expected one of {', '.join(FAILURE_KINDS)}, got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
