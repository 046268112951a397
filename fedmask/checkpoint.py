"""The server's state after each round, saved so that a killed run can go on.

Everything random in a run is drawn from ``(seed, round, partition)``, so the state to
keep is small: the round, the global state, the aggregator's own memory (FedPM's Beta
counts) and the strategy's records. It is written to a temporary file and renamed over
the old one, so a kill at any moment leaves either the previous round's checkpoint or this
one, never half of one.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FILENAME = "checkpoint.npz"


@dataclass
class Checkpoint:
    round: int
    state: dict[str, np.ndarray]
    aggregator: dict[str, np.ndarray] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)  # JSON: failures, history, initial accuracy

    def save(self, run_dir: Path) -> None:
        arrays = {f"state/{k}": v for k, v in self.state.items()}
        arrays |= {f"aggregator/{k}": v for k, v in self.aggregator.items()}
        meta = json.dumps({"round": self.round, "records": self.records})
        arrays["meta"] = np.frombuffer(meta.encode(), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        tmp = Path(run_dir) / (FILENAME + ".tmp")
        with tmp.open("wb") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, Path(run_dir) / FILENAME)

    @staticmethod
    def round_of(run_dir: Path) -> int:
        """The last round saved in ``run_dir``; 0 when no checkpoint was written yet."""
        path = Path(run_dir) / FILENAME
        if not path.exists():
            return 0
        with np.load(path) as data:
            return int(json.loads(bytes(data["meta"]).decode())["round"])

    @classmethod
    def load(cls, run_dir: Path) -> Checkpoint:
        path = Path(run_dir) / FILENAME
        if not path.exists():
            raise FileNotFoundError(f"no {FILENAME} in {run_dir}: nothing to resume (was it run with this version?)")
        with np.load(path) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            state = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("state/")}
            aggregator = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("aggregator/")}
        return cls(meta["round"], state, aggregator, meta["records"])
