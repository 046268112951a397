"""The fedmask ServerApp: broadcast the global state, aggregate masks, evaluate, record.

A run is three steps, each a function: :func:`build` (model, strategy and recorder from a
checked config, and from the checkpoint when resuming), the rounds (Flower's
``strategy.start``, or SecAgg+'s workflow), and :func:`end_round` (evaluate the global
model, write the round's line and a checkpoint), which both paths share.

``fedmask run`` builds the ServerApp with :func:`make_server_app` from a checked config;
``flwr run .`` uses ``app`` below, which reads the same keys from the run config.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch import nn

from fedmask import task
from fedmask.config import ConfigError, RunConfig, ignored_keys_warning, resolve
from fedmask.console import current
from fedmask.core.data import DataError, Splits, partition_sizes
from fedmask.core.masking import check_batchnorm, get_scores
from fedmask.core.weights import derive_seed
from fedmask.downlink import LosslessDownlink
from fedmask.faults import robustness_warning
from fedmask.methods import Method
from fedmask.methods.base import MaskAggregator
from fedmask.methods.dense import SqueezedDownlink, dense_fingerprint, downlink_levels, update_contexts
from fedmask.methods.fedpm import FedPMAggregator
from fedmask.methods.votes import VoteRule, Voting
from fedmask.preflight import check_before_start
from fedmask.record.checkpoint import Checkpoint, check_resumable, config_digest, residual_of
from fedmask.record.ledger import Ledger, MeasuringGrid
from fedmask.record.results import RoundOutcome, RunRecorder, RunStopped
from fedmask.record.totals import fedavg_round_bytes
from fedmask.recycling import RecycleLog, sync_frozen
from fedmask.wire.frame import Layout
from server.nodes import node_placement, warm_up
from server.secure import SecureFedPM, legacy_context, save_final_state, secagg_workflow
from server.strategies import CompressedFedAvg, DenseFedAvg, MaskStrategy, SeededFedAvg, Start, state_record

log = logging.getLogger("fedmask")
_RECYCLE_PREFIX = "recycle/"  # the recycling log's arrays in a checkpoint's aggregator memory


@dataclass
class ServerRun:
    """One experiment's server side: what it evaluates, how it aggregates, where it writes."""

    config: RunConfig
    splits: Splits
    model: nn.Module  # the global model, evaluated after every round
    strategy: SeededFedAvg
    aggregator: MaskAggregator | None  # None for the dense baselines
    ledger: Ledger
    recorder: RunRecorder
    load_global: Callable[[], None]  # puts the strategy's global state into ``model``

    @property
    def rounds_done(self) -> int:
        """Rounds finished before a resume."""
        return self.strategy.rounds_done

    def aggregator_memory(self) -> dict[str, np.ndarray]:
        """What a checkpoint keeps besides the state: the aggregator's memory, the recycling log."""
        if self.aggregator is None:
            return self.strategy.memory()  # the dense baselines: the ef-qsgd downlink's residual, or nothing
        memory = self.aggregator.state_dict()
        if self.config.recycle_every and isinstance(self.strategy, MaskStrategy):
            memory |= {_RECYCLE_PREFIX + k: v for k, v in self.strategy.recycle_log.to_arrays().items()}
        return memory


@dataclass(frozen=True)
class Resumed:
    """What a checkpoint gives back: the strategy's start, the aggregator's memory, the
    recycling log, and the initial state's accuracy."""

    start: Start
    memory: dict[str, np.ndarray]
    recycle_log: RecycleLog | None
    initial: dict[str, float]


def _resumed(run_dir: Path) -> Resumed | None:
    """The checkpoint of a run directory (None: a run stopped before its first one starts from round 1)."""
    if Checkpoint.round_of(run_dir) == 0:
        return None
    checkpoint = Checkpoint.load(run_dir)
    outcomes = {int(r): RoundOutcome(**o) for r, o in checkpoint.records.get("outcomes", {}).items()}
    memory = dict(checkpoint.aggregator)
    recycle = {k[len(_RECYCLE_PREFIX):]: memory.pop(k) for k in list(memory) if k.startswith(_RECYCLE_PREFIX)}
    return Resumed(Start(checkpoint.state, checkpoint.round, outcomes), memory,
                   RecycleLog.from_arrays(recycle) if recycle else None, checkpoint.records.get("initial", {}))


def build(config: RunConfig, run_dir: Path, resume: bool = False, deployment: bool = False) -> ServerRun:
    """The model, strategy and recorder of a run (plain, not secure aggregation); with
    ``resume``, from the run directory's checkpoint."""
    method = config.method_entry
    check_batchnorm(config.batchnorm, config.model)  # running statistics cannot be federated
    splits = task.splits_of(config)
    ledger = Ledger()
    mode = task.mode_of(config, method.mask_mode)
    model = task.make_model(config, splits, mode)
    resumed = _resumed(run_dir) if resume else None
    options: dict[str, Any] = {"deployment": deployment, "partition_sizes": partition_sizes(
        splits, config.num_clients, config.partitioner, config.seed, config.dirichlet_alpha,
        config.classes_per_client)}
    aggregator: MaskAggregator | None = None
    if mode is None:
        strategy: SeededFedAvg = _dense_strategy(config, method, ledger, task.dense_state(model), resumed, options)
        num_params = sum(v.size for v in strategy.state.values())

        def load_global() -> None:
            task.load_dense_state(model, strategy.state)
    else:
        aggregator = method.make_aggregator(config)
        spec = task.ModelSpec.of(config, model, mode)
        num_params = spec.num_connections  # Slot Machines' state has K scores per connection
        seed_state = aggregator.initial_state(get_scores(model))
        start = resumed.start if resumed else Start(seed_state)
        lossless = None
        if config.downlink_codec == "lossless":  # a resumed run's nodes hold nothing but the seed's state
            lossless = LosslessDownlink.create(spec.layout, spec.fingerprint, mode.vote_contexts,
                                               method.builtin and aggregator.replayable,
                                               isinstance(aggregator, Voting) and aggregator.absorbing, start.state,
                                               start.rounds_done, seed_state)
        mask_strategy = MaskStrategy(config, ledger, start, aggregator, mode, spec, lossless,
                                     resumed.recycle_log if resumed else None, **options)
        strategy = mask_strategy
        if resumed:
            aggregator.load_state_dict(resumed.memory)

        def load_global() -> None:
            # The state as clients decode it (the downlink codec may be lossy), and the
            # frozen weights after the recycling log, exactly as a client replays it.
            mode.load_state(model, mask_strategy.deployed())
            if config.recycle_every:
                sync_frozen(model, mask_strategy.recycle_log, spec.layout, spec.fingerprint, config.seed, config.init)
    recorder = RunRecorder(run_dir, config, num_params, resume_after=Checkpoint.round_of(run_dir) if resume else None,
                           fedavg=fedavg_equivalent(config, splits),
                           uplink_codec=mode.uplink_codec(config.uplink_codec) if mode is not None else None)
    if resumed:
        recorder.initial = resumed.initial
    return ServerRun(config, splits, model, strategy, aggregator, ledger, recorder, load_global)


def _dense_strategy(config: RunConfig, method: Method, ledger: Ledger, initial: dict[str, np.ndarray],
                    resumed: Resumed | None, options: dict[str, Any]) -> SeededFedAvg:
    start = resumed.start if resumed else Start(initial)
    if config.downlink_codec == "ef-qsgd":
        options = {**options, **_squeezed_downlink(config, initial, start, resumed.memory if resumed else {})}
    coding = method.compression(config)
    if coding is None:
        return DenseFedAvg(config, ledger, start, VoteRule.from_config(config), **options)
    return CompressedFedAvg(config, ledger, start, VoteRule.from_config(config), coding, **options)


def _squeezed_downlink(config: RunConfig, initial: dict[str, np.ndarray], start: Start,
                       memory: dict[str, np.ndarray]) -> dict[str, Any]:
    """The ef-qsgd downlink of a dense run: the server's squeezer (its residual from the
    checkpoint when resuming) and the per-node history of the updates it sends, from the
    seed's weights (version 0), which every node regenerates."""
    layout = Layout.from_arrays(initial)
    residual = residual_of(memory)  # checked by check_resumable
    lossless = LosslessDownlink.create(layout, dense_fingerprint(layout, config.seed, config.model), update_contexts,
                                       True, False, start.state, start.rounds_done, initial)
    squeeze = SqueezedDownlink(downlink_levels(config.downlink_bits), config.seed, residual or None)
    return {"lossless": lossless, "squeeze": squeeze}


def fedavg_equivalent(config: RunConfig, splits: Splits) -> dict[str, int]:
    """One FedAvg round trip of this architecture (dense float32 weights), weighed as sent."""
    return fedavg_round_bytes(config, task.dense_state(task.make_model(config, splits, None)))


def evaluate_global(config: RunConfig, model: nn.Module, splits: Splits, server_round: int) -> tuple[float, float]:
    """(loss, accuracy) of the global model on the validation split when the run holds one out,
    else on the test split; sampled masks seeded by the round."""
    x, y = splits.x_test, splits.y_test
    if splits.x_val is not None and splits.y_val is not None:
        x, y = splits.x_val, splits.y_val
    return task.evaluate(model, x, y, config.eval_batch_size, task.pick_device(config),
                         seed=derive_seed(config.seed, "eval", server_round))


def test_once(config: RunConfig, model: nn.Module, splits: Splits, server_round: int) -> dict[str, float] | None:
    """With a validation split, the test split is read once: after the last round."""
    if splits.x_val is None or server_round != config.num_rounds:
        return None
    loss, accuracy = task.evaluate(model, splits.x_test, splits.y_test, config.eval_batch_size,
                                   task.pick_device(config), seed=derive_seed(config.seed, "test", server_round))
    return {"test_accuracy": accuracy, "test_loss": loss}


def end_round(run: ServerRun, server_round: int) -> MetricRecord:
    """Evaluate the global state after ``server_round`` (0: the initial state), record, checkpoint.

    A file that cannot be written (a full disk, a folder made read-only) stops the run with
    :class:`RunStopped`: the rounds already checkpointed are kept, and the next ``--resume``
    repeats this one."""
    run.load_global()
    loss, accuracy = evaluate_global(run.config, run.model, run.splits, server_round)
    if server_round == 0:
        run.recorder.initial = {"accuracy": accuracy, "loss": loss}
        return MetricRecord({"accuracy": accuracy, "loss": loss})
    try:
        run.recorder.end_round(server_round, accuracy, loss, run.ledger, run.strategy.outcome(server_round),
                               test_once(run.config, run.model, run.splits, server_round))
        Checkpoint(server_round, run.strategy.state, run.aggregator_memory(),
                   {**run.strategy.records(), "initial": run.recorder.initial},
                   config_digest(run.config)).save(run.recorder.run_dir)
    except OSError as err:
        raise RunStopped(f"round {server_round}: cannot write {err.filename or run.recorder.run_dir} "
                         f"({err.strerror or err})") from None
    return MetricRecord({"accuracy": accuracy, "loss": loss})


def run_server(grid: Grid, config: RunConfig, run_dir: Path, resume: bool = False,
               context: Context | None = None, deployment: bool = False, warm: bool = False) -> dict[str, Any]:
    """Run every round of one experiment on ``grid``; returns the summary.

    With ``resume``, the run directory's checkpoint restores the state after its last
    finished round and the remaining rounds run as they would have without the stop.
    With ``deployment`` (``flwr run``), nodes that hold their own partition (node config)
    train on it; in simulation each node trains the partition its message names. With
    ``warm`` (Ray's engine), the workers are started before round 1's clock runs
    (:func:`server.nodes.warm_up`).
    """
    if config.secure_aggregation:
        return run_secure_server(grid, config, run_dir, context, deployment)
    for warning in (ignored_keys_warning(config), robustness_warning(config)):
        if warning:
            logging.getLogger("fedmask").warning("%s", warning)
    if resume:
        check_resumable(run_dir, config)
    display = current()
    display.stage("loading the data, building the model")
    run = build(config, run_dir, resume, deployment)
    run.recorder.header()
    if config.num_rounds <= run.rounds_done:
        return run.recorder.finish()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = run.strategy.round_of(server_round)
        if server_round == run.rounds_done and run.rounds_done:
            return None  # evaluated before the stop
        return end_round(run, server_round)

    measuring = MeasuringGrid(grid, run.ledger)
    if warm and not deployment:  # a deployment's nodes answer a query before round 1 anyway
        display.stage("starting the workers (round 1 waits for them)")
        warm_up(measuring, config)
    display.rounds(run.rounds_done, config.num_rounds)
    run.strategy.start(
        grid=measuring,
        initial_arrays=state_record(run.strategy.state),
        num_rounds=config.num_rounds - run.rounds_done,
        timeout=config.round_timeout,
        evaluate_fn=evaluate,
    )
    try:
        return run.recorder.finish()
    except OSError as err:
        raise RunStopped(f"the end of the run: cannot write {err.filename or run_dir} "
                         f"({err.strerror or err})") from None


def run_secure_server(grid: Grid, config: RunConfig, run_dir: Path, context: Context | None,
                      deployment: bool = False) -> dict[str, Any]:
    """FedPM under SecAgg+ (Flower's workflow): the same model, evaluation and run directory."""
    method = config.method_entry
    splits = task.splits_of(config)
    mode = method.make_mode(config)
    model = task.make_model(config, splits, mode)
    aggregator = method.make_aggregator(config)
    if not isinstance(aggregator, FedPMAggregator):  # the config allows secure aggregation with FedPM only
        raise ConfigError(f"config key 'secure-aggregation': expected method = 'fedpm', got {config.method!r}")
    initial = aggregator.initial_state(get_scores(model))
    ledger = Ledger()
    recorder = RunRecorder(run_dir, config, sum(v.size for v in initial.values()),
                           fedavg=fedavg_equivalent(config, splits), uplink_codec="secagg+")  # masked sums
    recorder.header()

    def evaluate(server_round: int, state: dict[str, np.ndarray], outcome: RoundOutcome) -> tuple[float, float]:
        mode.load_state(model, state)
        loss, accuracy = evaluate_global(config, model, splits, server_round)
        if server_round == 0:
            recorder.initial = {"accuracy": accuracy, "loss": loss}
        else:
            recorder.end_round(server_round, accuracy, loss, ledger, outcome,
                               test_once(config, model, splits, server_round))
        return loss, accuracy

    measuring = MeasuringGrid(grid, ledger)
    placement = node_placement(measuring, config, deployment)
    strategy = SecureFedPM(config, initial, aggregator, evaluate, placement, deployment)
    current().rounds(0, config.num_rounds)
    context = context or Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    secagg_workflow(config)(measuring, legacy_context(context, config, strategy))
    save_final_state(run_dir, strategy.state)
    return recorder.finish()


def make_server_app(config: RunConfig, run_dir: Path, resume: bool = False, warm: bool = True) -> ServerApp:
    """A ServerApp bound to one checked config and output folder (``warm``: start the
    simulation's workers before round 1)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, config, run_dir, resume, context, warm=warm)

    return server_app


app = ServerApp()


def flwr_run_dir(config: RunConfig, stamp: str | None = None) -> Path:
    """Where a ``flwr run`` writes its run directory: ``runs/<method>-<time>`` under the
    ServerApp's working directory, or under ``$FEDMASK_RUNS_DIR`` when set."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    return Path(os.environ.get("FEDMASK_RUNS_DIR") or "runs") / f"{config.method.replace(':', '-')}-{stamp}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the run config (pyproject.toml's table and ``--run-config``)
    is checked as ``fedmask run`` checks a config file, before any message is sent."""
    try:
        config = resolve(dict(context.run_config))
        check_before_start(config)
    except (ConfigError, DataError) as err:
        log.error("fedmask: error: %s", err)
        raise
    run_dir = flwr_run_dir(config)
    log.warning("fedmask: run directory %s", run_dir.resolve())
    run_server(grid, config, run_dir, context=context, deployment=True)
