"""Optional experiment tracking: every round's numbers mirrored to a tracker.

``tracker = "tensorboard"`` writes TensorBoard event files to ``RUN_DIR/tensorboard``
(``tensorboard --logdir runs``); ``tracker = "mlflow"`` logs to an MLflow SQLite store at
``RUN_DIR/mlflow.db`` (``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db``), or
to ``MLFLOW_TRACKING_URI`` when that is set (MLflow 3 refuses its old file store). Both are optional dependencies
(``pip install -e ".[track]"``); ``rounds.jsonl`` stays the record either way, and the
tracker gets the same numeric fields under the same names.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedmask.names import TRACKERS


class TrackerMissing(ImportError):
    """The chosen tracker's package is not installed; the message says how to install it."""


def numeric_fields(row: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The numbers of a round line, nested dicts flattened as ``train/train-loss``."""
    for key, value in row.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            yield prefix + key, float(value)
        elif isinstance(value, Mapping):
            yield from numeric_fields(value, f"{prefix}{key}/")


class Tracker:
    """The no-op tracker; subclasses send each round's numbers somewhere."""

    def log_round(self, server_round: int, row: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path, config: Mapping[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise TrackerMissing("tracker = 'tensorboard' needs the tensorboard package: "
                                 "pip install -e \".[track]\"") from err
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in config.items()))

    def log_round(self, server_round: int, row: Mapping[str, Any]) -> None:
        for name, value in numeric_fields(row):
            if name != "round":
                self.writer.add_scalar(name, value, server_round)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    def __init__(self, run_dir: Path, config: Mapping[str, Any]):
        try:
            import mlflow
        except ImportError as err:
            raise TrackerMissing("tracker = 'mlflow' needs the mlflow-skinny package: "
                                 "pip install -e \".[track]\"") from err
        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("fedmask")
        self.run = mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({k: v for k, v in config.items()})

    def log_round(self, server_round: int, row: Mapping[str, Any]) -> None:
        metrics = {name.replace("/", "."): value for name, value in numeric_fields(row) if name != "round"}
        self.mlflow.log_metrics(metrics, step=server_round)

    def close(self) -> None:
        self.mlflow.end_run()


def make_tracker(name: str, run_dir: Path, config: Mapping[str, Any]) -> Tracker:
    """The tracker ``name`` (one of :data:`TRACKERS`) for a run directory."""
    if name == "tensorboard":
        return TensorBoardTracker(run_dir, config)
    if name == "mlflow":
        return MLflowTracker(run_dir, config)
    if name != "none":
        raise ValueError(f"tracker: expected one of {', '.join(TRACKERS)}, got {name!r}")
    return Tracker()
