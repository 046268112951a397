"""A plug-in strategy in a few lines: theta is the example-weighted mean of the votes.

Run it with ``fedmask run configs/quickstart.toml --set method="examples.mean_vote:MeanVote"``.
"""

import numpy as np

from fedmask import MaskAggregator, weighted_vote


class MeanVote(MaskAggregator):
    mask_mode = "bernoulli"  # clients train Bernoulli masks; the state is theta

    def aggregate(self, server_round, state, masks, weights):
        votes = weighted_vote(masks, weights)  # per weight, weighted share of clients keeping it
        return {name: np.clip(v, 0.02, 0.98).astype(np.float32) for name, v in votes.items()}
