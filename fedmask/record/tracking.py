"""Optional experiment tracking: every round's numbers mirrored to a tracker.

``tracker = "tensorboard"`` writes TensorBoard event files to ``RUN_DIR/tensorboard``
(``tensorboard --logdir runs``); ``tracker = "mlflow"`` logs to an MLflow SQLite store at
``RUN_DIR/mlflow.db`` (``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db``), or
to ``MLFLOW_TRACKING_URI`` when that is set (MLflow 3 refuses its old file store). Both are optional dependencies
(``pip install -e ".[track]"``); ``rounds.jsonl`` stays the record either way, and the
tracker gets the same numeric fields under the same names.

Beside them, at each round, the bytes sent so far (payload, all clients, both directions
summed: what ``fedmask compare`` plots) as ``cumulative/uplink_payload_bytes``,
``cumulative/downlink_payload_bytes`` and ``cumulative/total_payload_bytes``, and accuracy
and loss once more under ``vs_total_bytes/`` with that cumulative total as the step, so
TensorBoard's scalar view (or MLflow's metric view, step on the x axis) draws accuracy
against the bytes it cost. MLflow names take ``.`` for ``/``. At the end of the run,
MLflow gets the summary's numbers as ``summary.<name>`` metrics and ``summary.json``,
``config.toml`` and ``curves.png`` as artifacts; TensorBoard gets the summary as text.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
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


CUMULATIVE = {"uplink": "uplink_payload_bytes", "downlink": "downlink_payload_bytes"}  # direction -> row field
VS_BYTES = ("accuracy", "loss")  # the fields also logged against the cumulative total bytes
ARTIFACTS = ("summary.json", "config.toml", "curves.png")  # what MLflow keeps of a finished run


class Tracker:
    """Sends each round's numbers, the bytes sent so far and, at the end, the summary somewhere:
    subclasses write scalars (:meth:`scalars`) and the end of the run (:meth:`finish`); this
    one, ``tracker = 'none'``, writes nothing."""

    def __init__(self) -> None:
        self.sent = dict.fromkeys(CUMULATIVE, 0)  # payload bytes sent so far, per direction

    def resume(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """A resumed run's earlier rounds (already logged): only their bytes are counted."""
        for row in rows:
            self._count(row)

    def _count(self, row: Mapping[str, Any]) -> int:
        for direction, key in CUMULATIVE.items():
            self.sent[direction] += int(row.get(key) or 0)
        return sum(self.sent.values())

    def log_round(self, server_round: int, row: Mapping[str, Any]) -> None:
        total = self._count(row)
        values = {name: value for name, value in numeric_fields(row) if name != "round"}
        values |= {f"cumulative/{direction}_payload_bytes": float(sent) for direction, sent in self.sent.items()}
        values["cumulative/total_payload_bytes"] = float(total)
        self.scalars(values, server_round)
        self.scalars({f"vs_total_bytes/{key}": float(row[key]) for key in VS_BYTES if key in row}, total)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        pass

    def finish(self, summary: Mapping[str, Any], run_dir: Path) -> None:
        """The end of a run: its summary (summary.json's content) and its files in ``run_dir``."""

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path, config: Mapping[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise TrackerMissing("tracker = 'tensorboard' needs the tensorboard package: "
                                 "pip install -e \".[track]\"") from err
        super().__init__()
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in config.items()))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def finish(self, summary: Mapping[str, Any], run_dir: Path) -> None:
        text = json.dumps(summary, indent=2)
        self.writer.add_text("summary", "\n".join("    " + line for line in text.splitlines()))
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
        super().__init__()
        self.mlflow = mlflow
        # "Creating initial MLflow database tables..." at INFO, for the store fedmask makes in every run directory
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        shared = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(shared or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        if not shared and mlflow.get_experiment_by_name("fedmask") is None:
            # artifacts beside the run's database, not in ./mlruns of whatever folder the run started in
            mlflow.create_experiment("fedmask", artifact_location=(run_dir / "mlartifacts").resolve().as_uri())
        mlflow.set_experiment("fedmask")
        self.run = mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({k: v for k, v in config.items()})

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.mlflow.log_metrics({name.replace("/", "."): value for name, value in values.items()}, step=step)

    def finish(self, summary: Mapping[str, Any], run_dir: Path) -> None:
        self.mlflow.log_metrics({"summary." + name.replace("/", "."): value
                                 for name, value in numeric_fields(summary)})
        for name in ARTIFACTS:
            if (run_dir / name).exists():
                self.mlflow.log_artifact(str(run_dir / name))

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
