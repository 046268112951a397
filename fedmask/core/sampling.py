"""Which clients train in a round: seeded, so every engine and every run agree.

Flower's own sampler draws from unseeded ``random`` over random node ids; fedmask picks
partition ids from ``(seed, round)`` instead and maps them onto whatever nodes exist.
"""

from __future__ import annotations

import numpy as np

from fedmask.core.weights import derive_seed


def sample_partitions(seed: int, num_clients: int, clients_per_round: int, server_round: int) -> list[int]:
    """The partitions that train in ``server_round``, sorted."""
    rng = np.random.default_rng(derive_seed(seed, "sample", server_round))
    chosen = rng.choice(num_clients, size=clients_per_round, replace=False)
    return sorted(int(p) for p in chosen)
