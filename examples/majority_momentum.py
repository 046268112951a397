"""A majority vote with server momentum, as a fedmask plug-in strategy.

Clients train Bernoulli masks (FedPM's client). The server does not average the votes: per
weight it takes the clients' weighted majority (keep or drop), treats ``majority - theta``
as a pseudo-gradient, and moves theta along a momentum buffer, so one noisy round moves a
keep-probability less than a run of rounds that agree. See docs/strategies.md.

Run it: ``fedmask run configs/quickstart.toml --set method='"examples.majority_momentum:MajorityMomentum"'``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmask import MaskAggregator, weighted_vote
from fedmask.methods.base import Masks, State


@dataclass(frozen=True)
class MomentumParams:
    """The rule's parameters: each field is a config key, ``plugin.server-lr = 0.05``."""

    server_lr: float = 0.1  # how far one round's pseudo-gradient moves theta
    momentum: float = 0.9  # share of the previous step kept in the buffer
    eps: float = 0.02  # theta stays in [eps, 1 - eps], so no weight is decided for good


class MajorityMomentum(MaskAggregator):
    """theta += lr * buffer, buffer = momentum * buffer + (majority - theta)."""

    mask_mode = "bernoulli"
    Params = MomentumParams  # self.params: the config's plugin.<field> values, defaults for the rest

    def __init__(self, config):  # the run's RunConfig
        super().__init__(config)
        self.buffer: State = {}

    def state_dict(self) -> State:
        return {f"buffer/{k}": v for k, v in self.buffer.items()}  # kept in checkpoints: --resume works

    def load_state_dict(self, arrays: State) -> None:
        self.buffer = {k.removeprefix("buffer/"): v for k, v in arrays.items()}

    def aggregate(self, server_round: int, state: State, masks: list[Masks], weights: list[float]) -> State:
        p = self.params
        votes = weighted_vote(masks, weights)  # weighted share of clients keeping each weight
        new_state = {}
        for name, theta in state.items():
            majority = (votes[name] > 0.5).astype(np.float64)
            step = majority - theta.astype(np.float64)
            self.buffer[name] = p.momentum * self.buffer.get(name, np.zeros_like(step)) + step
            new_state[name] = np.clip(theta + p.server_lr * self.buffer[name], p.eps, 1 - p.eps).astype(np.float32)
        return new_state
