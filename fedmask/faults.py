"""Seeded faults and attacks, decided the same way on every party.

Which client drops, crashes, corrupts its upload or answers late in a round is a
function of ``(seed, round, partition)``, and which partitions are attackers a function of
``seed``: a run with faults is as reproducible as one without, and the server can tell a
simulated drop from a real one without being told.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedmask.core.weights import derive_seed
from fedmask.names import CORRUPTIONS, FAULTS
from fedmask.wire import masks, ranks, updates
from fedmask.wire.frame import Frame

if TYPE_CHECKING:
    from fedmask.config import RunConfig

UPLOAD_FRAMES = (masks.FRAME, ranks.FRAME, updates.FRAME)  # what a client uploads, by magic
# A slow client answers at once with this ConfigRecord ({"delay": seconds}) in its reply;
# the server's MeasuringGrid strips it and delivers the reply that many seconds after it
# pulled it (lost if that is past round-timeout). Slowness is late delivery, not a client
# blocking a worker with a sleep.
SLOW_RECORD = "fault-slow"


def client_fault(config: RunConfig, server_round: int, partition_id: int) -> str | None:
    """The fault this client suffers this round, if any (at most one)."""
    rates = [config[f"fault-{fault}-rate"] for fault in FAULTS]
    if not any(rates):  # no draw to make (and a generator costs a tenth of a millisecond)
        return None
    draw = np.random.default_rng(derive_seed(config.seed, "fault", server_round, partition_id)).random()
    edge = 0.0
    for fault, rate in zip(FAULTS, rates):
        edge += rate
        if draw < edge:
            return fault
    return None


def upload_frame(blob: np.ndarray) -> Frame:
    """The frame of an upload, by its magic (masks, LaPerm's ranks, compressed updates)."""
    magic = bytes(blob[:4])
    for frame in UPLOAD_FRAMES:
        if frame.magic == magic:
            return frame
    raise ValueError(f"upload: expected one of the magics {[f.magic for f in UPLOAD_FRAMES]}, got {magic!r}")


def corrupt_upload(blob: np.ndarray, config: RunConfig, server_round: int, partition_id: int) -> tuple[np.ndarray, str]:
    """A broken copy of an upload and how it was broken (one of :data:`CORRUPTIONS`), at the
    offsets of the upload's own format."""
    rng = np.random.default_rng(derive_seed(config.seed, "corrupt", server_round, partition_id))
    kind = CORRUPTIONS[int(rng.integers(len(CORRUPTIONS)))]
    frame = upload_frame(blob)
    broken = blob.copy()
    if kind == "truncate":
        broken = broken[: int(rng.integers(0, blob.size))]
    elif kind == "bit-flip":  # a payload byte, past the header (byte 0 if there is no payload)
        position = int(rng.integers(frame.size, blob.size)) if blob.size > frame.size else 0
        broken[position] ^= np.uint8(1 << int(rng.integers(8)))
    else:  # an upload made for another model: the header's fingerprint differs
        field = frame.slice("fingerprint")
        broken[field] = rng.integers(0, 256, field.stop - field.start, dtype=np.uint8)
    return broken, kind


def attackers(config: RunConfig) -> frozenset[int]:
    """The partitions that lie in every round they are sampled: a seeded fixed subset."""
    if config.attack == "none" or config.attack_fraction <= 0:
        return frozenset()
    count = round(config.attack_fraction * config.num_clients)
    order = np.random.default_rng(derive_seed(config.seed, "attackers")).permutation(config.num_clients)
    return frozenset(int(p) for p in order[:count])


def robustness_warning(config: RunConfig) -> str | None:
    """Why the configured robust aggregation cannot hold off the configured attackers, if so."""
    if config.attack == "none" or config.attack_fraction <= 0:
        return None
    share = f"attack-fraction = {config.attack_fraction:g}"
    if config.robust_aggregation == "none":
        return f"{share} with robust-aggregation = 'none': every attacker's vote counts in full"
    if config.robust_aggregation == "trimmed" and config.attack_fraction > config.trim_fraction:
        return (f"{share} exceeds trim-fraction = {config.trim_fraction:g}: the trimmed vote cannot cut "
                "all attackers' votes (raise trim-fraction to at least the attackers' share)")
    if config.robust_aggregation == "median" and config.attack_fraction >= 0.5:
        return f"{share}: the median (majority) cannot hold off half or more of the clients"
    return None


POISON = 3e38  # near float32's largest: a valid upload whose mean still overflows nothing


def poisoned(update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a Byzantine client of a dense baseline sends instead of its update (``attack =
    "poison"``): zero everywhere but the largest-magnitude coordinate of each tensor, set to
    +-3e38 with that coordinate's sign. Finite and well-formed (a QSGD norm, a top-k value),
    so only the server's rule or its check of the new state can stop it."""
    out = {}
    for name, value in update.items():
        crafted = np.zeros_like(value, dtype=np.float32)
        if value.size:
            flat = np.asarray(value, dtype=np.float32).ravel()
            where = int(np.argmax(np.abs(flat)))
            crafted.ravel()[where] = POISON if flat[where] >= 0 else -POISON
        out[name] = crafted
    return out


def attack_masks(masks: dict[str, np.ndarray], config: RunConfig, server_round: int,
                 partition_id: int, crafted: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """What a Byzantine client uploads instead of its honest mask (``crafted``: the
    colluders' common mask, the mask mode's :meth:`~fedmask.methods.base.MaskMode.colluding_upload`)."""
    kind = config.attack
    if kind == "colluding":
        if crafted is None:
            raise ValueError("attack 'colluding' needs the colluders' crafted mask")
        return crafted
    if kind == "invert":
        return {k: ~m.astype(bool) for k, m in masks.items()}
    if kind == "all-ones":
        return {k: np.ones_like(m, dtype=bool) for k, m in masks.items()}
    rng = np.random.default_rng(derive_seed(config.seed, "attack", server_round, partition_id))
    return {k: rng.random(m.shape) < 0.5 for k, m in masks.items()}
