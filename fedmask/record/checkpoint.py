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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmask.record.files import RunFileError, read_rounds
from fedmask.record.results import RoundOutcome

if TYPE_CHECKING:
    from fedmask.config import RunConfig

FILENAME = "checkpoint.npz"
RESIDUAL_PREFIX = "downlink-residual/"  # the ef-qsgd downlink's error feedback, in the ``aggregator`` arrays


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
        try:
            with tmp.open("wb") as handle:
                handle.write(buffer.getvalue())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, Path(run_dir) / FILENAME)
        except OSError:
            tmp.unlink(missing_ok=True)  # the last checkpoint stays whole; no half-written file is left beside it
            raise

    @staticmethod
    def round_of(run_dir: Path) -> int:
        """The last round saved in ``run_dir``; 0 when no checkpoint was written yet."""
        path = Path(run_dir) / FILENAME
        if not path.exists():
            return 0
        with np.load(path) as data:
            return _meta(path, data)["round"]

    @classmethod
    def load(cls, run_dir: Path) -> Checkpoint:
        path = Path(run_dir) / FILENAME
        if not path.exists():
            raise FileNotFoundError(f"no {FILENAME} in {run_dir}: nothing to resume (was it run with this version?)")
        with np.load(path) as data:
            meta = _meta(path, data)
            state = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("state/")}
            aggregator = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("aggregator/")}
        for name, value in state.items():
            if value.dtype.kind not in "biuf" or (value.dtype.kind == "f" and not np.isfinite(value).all()):
                raise CheckpointError(f"{path}: state '{name}': expected finite numbers, got {value.dtype} "
                                      f"{'with NaN or inf' if value.dtype.kind == 'f' else 'values'}")
        return cls(meta["round"], state, aggregator, meta["records"], meta["config_digest"])


def _meta(path: Path, data: Any) -> dict[str, Any]:
    """The checkpoint's meta record, checked: an integer round, a records object, a config digest."""
    try:
        meta = json.loads(bytes(data["meta"]).decode())
    except (KeyError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: its 'meta' record is missing or not JSON ({type(err).__name__})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: 'meta': expected a JSON object, got {type(meta).__name__}")
    done = meta.get("round")
    if isinstance(done, bool) or not isinstance(done, int) or done < 0:
        raise CheckpointError(f"{path}: 'meta' round: expected an integer >= 0, got {done!r}")
    records = meta.get("records", {})
    if not isinstance(records, dict) or not isinstance(records.get("outcomes", {}), dict):
        raise CheckpointError(f"{path}: 'meta' records: expected a JSON object with an 'outcomes' object")
    known = {f.name for f in fields(RoundOutcome)}
    for key, outcome in records.get("outcomes", {}).items():
        if not str(key).isdigit() or not isinstance(outcome, dict) or set(outcome) - known:
            extra = sorted(set(outcome) - known) if isinstance(outcome, dict) else outcome
            raise CheckpointError(f"{path}: outcome of round {key!r}: expected the fields {sorted(known)}, got "
                                  f"{extra!r}")
    initial = records.get("initial", {})
    if not isinstance(initial, dict) or not all(isinstance(v, (int, float)) for v in initial.values()):
        raise CheckpointError(f"{path}: 'meta' records 'initial': expected the initial accuracy and loss")
    if not isinstance(meta.get("config_digest", ""), str):
        raise CheckpointError(f"{path}: 'meta' config_digest: expected a string")
    meta.setdefault("config_digest", "")
    meta["records"] = records
    return meta


def check_resumable(run_dir: Path, config: RunConfig, expected: dict[str, np.ndarray] | None = None) -> int:
    """The round a run directory can resume after (0: start again from round 1), or
    :class:`CheckpointError`: a checkpoint that does not load, belongs to another config
    (or the config.toml was edited since), holds a state that is not ``expected``'s names,
    shapes and dtypes (or not finite), or a rounds.jsonl with fewer, other or bad rounds."""
    run_dir = Path(run_dir)
    if not (run_dir / FILENAME).exists():
        return 0  # stopped before its first checkpoint: nothing to keep, it starts from round 1
    try:
        checkpoint = Checkpoint.load(run_dir)
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{run_dir / FILENAME} is truncated or corrupt ({type(err).__name__}); "
                              "it cannot be resumed") from None
    done = checkpoint.round
    if checkpoint.config_digest != config_digest(config):
        raise CheckpointError(f"{run_dir / FILENAME} belongs to another config (config.toml was edited after "
                              "the start, or the checkpoint is another run's); it cannot be resumed")
    if done > config.num_rounds:
        raise CheckpointError(f"{run_dir / FILENAME} says round {done}, outside 0..{config.num_rounds}")
    if expected is not None:
        _check_state(run_dir / FILENAME, checkpoint.state, expected)
        if config.downlink_codec == "ef-qsgd" and done:
            _check_residual(run_dir / FILENAME, checkpoint.aggregator, expected)
    rounds_path = run_dir / "rounds.jsonl"
    try:
        rounds = [row["round"] for row in read_rounds(rounds_path, done)]
    except RunFileError as err:
        raise CheckpointError(f"{err}; the checkpoint is after round {done}") from None
    if rounds != list(range(1, done + 1)):
        raise CheckpointError(f"{rounds_path} disagrees with the checkpoint: it is after round {done}, but "
                              f"rounds.jsonl holds rounds {rounds[:5]}{'...' if len(rounds) > 5 else ''}")
    return done


def residual_of(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ef-qsgd downlink's residual among a checkpoint's ``aggregator`` arrays, by tensor."""
    return {k[len(RESIDUAL_PREFIX):]: v for k, v in arrays.items() if k.startswith(RESIDUAL_PREFIX)}


def _check_residual(path: Path, arrays: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """The server's residual (what the ef-qsgd downlink owes the nodes): the state's tensors, finite floats."""
    residual = residual_of(arrays)
    if sorted(residual) != sorted(expected) or any(
            residual[k].shape != v.shape or residual[k].dtype.kind != "f" or not np.isfinite(residual[k]).all()
            for k, v in expected.items()):
        raise CheckpointError(f"{path}: the ef-qsgd downlink's residual: expected finite floats of the state's "
                              f"tensors {sorted(expected)[:5]}, got {sorted(residual)[:5]} (or other shapes or values)")


def _check_state(path: Path, state: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """The checkpoint's state has the run's tensors, shapes and dtypes."""
    if sorted(state) != sorted(expected):
        raise CheckpointError(f"{path}: state: expected tensors {sorted(expected)}, got {sorted(state)}")
    for name, value in expected.items():
        if state[name].shape != value.shape or state[name].dtype.kind != value.dtype.kind:
            raise CheckpointError(f"{path}: state '{name}': expected {value.dtype} {value.shape}, got "
                                  f"{state[name].dtype} {state[name].shape}")
