"""FedPM under Flower's SecAgg+ workflow: the server sees the sum of the masks, nothing else.

SecAgg+ in Flower 1.41 drives the legacy strategy API, so this is a small legacy
``Strategy`` around the same FedPM aggregator, evaluation and run directory. Clients send
their mask as 0/1 values with weight 1; SecAgg+ returns the mean over the active clients,
which times their number is the per-weight count of ones (rounded: the protocol's
fixed-point arithmetic is exact for 0/1 inputs, the rounding only removes float noise).
FedPM's update needs nothing more, so the global state equals plain aggregation's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.compat import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from fedmask.config import RunConfig
from fedmask.core.sampling import sample_partitions
from fedmask.methods.base import State
from fedmask.methods.fedpm import FedPMAggregator
from fedmask.protocol.instruction import TrainInstruction
from fedmask.record.failures import Failure
from fedmask.record.results import RoundOutcome

_JOIN_TIMEOUT_S = 60  # how long the first round waits for every client node to connect


class SecureFedPM(Strategy):
    """Legacy-API strategy: seeded sampling, FedPM from secure sums, server evaluation."""

    def __init__(self, config: RunConfig, state: State, aggregator: FedPMAggregator,
                 evaluate: Callable[[int, State, RoundOutcome], tuple[float, float]],
                 placement: dict[int, int] | None = None, deployment: bool = False):
        self.config, self.state, self.evaluate_state = config, state, evaluate
        self.placement = placement  # partition -> node id (server.nodes.node_placement); None: by index
        self.deployment = deployment  # nodes train the partition they hold, if any
        self.names = list(state)
        self.aggregator = aggregator
        self.outcomes: dict[int, RoundOutcome] = {}

    def _parameters(self) -> Parameters:
        return ndarrays_to_parameters([self.state[n] for n in self.names])

    def initialize_parameters(self, client_manager) -> Parameters:
        return self._parameters()

    def configure_fit(self, server_round, parameters, client_manager):
        # Every simulated client must have joined: partitions map to nodes by index, so
        # starting with fewer nodes would send two partitions to one node.
        needed = self.config.num_clients
        if not client_manager.wait_for(needed, timeout=_JOIN_TIMEOUT_S):
            raise RuntimeError(f"SecAgg+: {client_manager.num_available()} of num-clients={needed} "
                               f"client nodes connected within {_JOIN_TIMEOUT_S} s")
        proxies = sorted(client_manager.all().values(), key=lambda proxy: proxy.node_id)
        by_node = {proxy.node_id: proxy for proxy in proxies}
        instructions = []
        cfg = self.config
        for pid in sample_partitions(cfg.seed, cfg.num_clients, cfg.clients_per_round, server_round):
            instruction = TrainInstruction(cfg, server_round, pid, self.aggregator.mask_mode, node_data=self.deployment)
            settings = {**instruction.to_flat(),
                        "tensor-names": ",".join(self.names)}
            proxy = by_node[self.placement[pid]] if self.placement else proxies[pid % len(proxies)]
            instructions.append((proxy, FitIns(parameters, settings)))
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        outcome = self.outcomes.setdefault(server_round, RoundOutcome())
        for failure in failures:
            # the workflow reports an exception (no answer in time) or a client's failed result
            kind = "no-reply" if isinstance(failure, BaseException) else "client-error"
            outcome.add_failure(Failure(kind, -1, -1, f"secure aggregation: {type(failure).__name__}"))
        if not results:
            return None, {}
        clients = outcome.aggregated = len(results)
        mean = parameters_to_ndarrays(results[0][1].parameters)  # every result carries the sum
        ones = {name: np.rint(m.astype(np.float64) * clients) for name, m in zip(self.names, mean, strict=True)}
        self.state = self.aggregator.aggregate_counts(server_round, self.state, ones, clients)
        return self._parameters(), {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        loss, accuracy = self.evaluate_state(server_round, self.state,
                                             self.outcomes.setdefault(server_round, RoundOutcome()))
        return loss, {"accuracy": accuracy}


def secagg_workflow(config: RunConfig) -> DefaultWorkflow:
    """SecAgg+ with every sampled client sharing keys; 0/1 values land exactly on its grid."""
    clients = config.clients_per_round
    return DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=clients,
        reconstruction_threshold=max(2, math.ceil(2 * clients / 3)),
        max_weight=1.0,
        clipping_range=1.0,            # x in [-1, 1] maps to (x + 1) * Q / 2: 0 -> Q/2, 1 -> Q
        quantization_range=2**22,      # even, so both land on integers
        modulus_range=2**32,
        timeout=config.round_timeout,
    ))


def legacy_context(context: Context, config: RunConfig, strategy: SecureFedPM) -> LegacyContext:
    return LegacyContext(context=context, config=ServerConfig(num_rounds=config.num_rounds,
                                                              round_timeout=config.round_timeout),
                         strategy=strategy)


def save_final_state(run_dir: Path, state: State) -> None:
    np.savez(Path(run_dir) / "final_state.npz", **state)  # type: ignore[arg-type]  # numpy's **kwds stub
