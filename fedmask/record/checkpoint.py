"""The server's state after each round, saved so that a killed run can go on.

Everything random in a run is drawn from ``(seed, round, partition)``, so the state to
keep is small: the round, the global state, the aggregator's own memory (FedPM's Beta
counts) and the strategy's records. It is written to a temporary file and renamed over
the old one, so a kill at any moment leaves either the previous round's checkpoint or this
one, never half of one.

A checkpoint names the config it belongs to (:func:`config_digest`, a SHA-256 of the
resolved config as config.toml holds it); :func:`check_resumable` refuses to continue a run
from a checkpoint of another config, a config.toml edited after the start, a truncated or
garbage checkpoint, or a rounds.jsonl that disagrees with it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedmask.config import RunConfig

FILENAME = "checkpoint.npz"


class CheckpointError(ValueError):
    """A run directory that cannot be resumed as it is; the message says why."""


def config_digest(config: RunConfig) -> str:
    """SHA-256 of the resolved config in canonical TOML (what config.toml holds)."""
    import tomli_w

    return hashlib.sha256(tomli_w.dumps(config.to_dict()).encode()).hexdigest()


@dataclass
class Checkpoint:
    round: int
    state: dict[str, np.ndarray]
    aggregator: dict[str, np.ndarray] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)  # JSON: failures, history, initial accuracy
    config_digest: str = ""  # the config it belongs to (see :func:`config_digest`)

    def save(self, run_dir: Path) -> None:
        arrays = {f"state/{k}": v for k, v in self.state.items()}
        arrays |= {f"aggregator/{k}": v for k, v in self.aggregator.items()}
        meta = json.dumps({"round": self.round, "records": self.records, "config_digest": self.config_digest})
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
        return cls(meta["round"], state, aggregator, meta["records"], meta.get("config_digest", ""))


def check_resumable(run_dir: Path, config: RunConfig) -> int:
    """The round a run directory can resume after (0: start again from round 1), or
    :class:`CheckpointError`: a checkpoint that does not load, belongs to another config
    (or the config.toml was edited since), or a rounds.jsonl with fewer or other rounds."""
    run_dir = Path(run_dir)
    if not (run_dir / FILENAME).exists():
        return 0  # stopped before its first checkpoint: nothing to keep, it starts from round 1
    try:
        checkpoint = Checkpoint.load(run_dir)
        done = int(checkpoint.round)
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{run_dir / FILENAME} is truncated or corrupt ({type(err).__name__}); "
                              "it cannot be resumed") from None
    if checkpoint.config_digest != config_digest(config):
        raise CheckpointError(f"{run_dir / FILENAME} belongs to another config (config.toml was edited after "
                              "the start, or the checkpoint is another run's); it cannot be resumed")
    if done < 0 or done > config.num_rounds:
        raise CheckpointError(f"{run_dir / FILENAME} says round {done}, outside 0..{config.num_rounds}")
    rounds_path = run_dir / "rounds.jsonl"
    try:
        lines = [line for line in rounds_path.read_text().splitlines() if line.strip()]
        rounds = [json.loads(line)["round"] for line in lines[:done]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{rounds_path} is missing or corrupt ({type(err).__name__}); the checkpoint "
                              f"is after round {done}") from None
    if rounds != list(range(1, done + 1)):
        raise CheckpointError(f"{rounds_path} disagrees with the checkpoint: it is after round {done}, but "
                              f"rounds.jsonl holds rounds {rounds[:5]}{'...' if len(rounds) > 5 else ''}")
    return done
