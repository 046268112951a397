"""The Python API: run an experiment from a notebook or a script, and read runs back.

```python
import fedmask
result = fedmask.simulate("configs/quickstart.toml", num_rounds=3, engine="inprocess")
result.summary["final_accuracy"], result.rounds[-1]["uplink_payload_bytes"]
again = fedmask.load_run(result.run_dir)
```

:func:`simulate` does what ``fedmask run`` does (the command line calls the same
:func:`execute`): check the config before anything starts, run the rounds on Flower's Ray
simulation engine or in-process, and write the run directory; it returns a
:class:`Result` read back from that directory, so a result in memory and one loaded later
are the same thing. Like the command line, this module wires the library to the Flower
apps; nothing else in ``fedmask/`` imports them.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmask.config import ConfigError, RunConfig, load, read_toml, resolve
from fedmask.record.files import RunFileError, read_json, read_rounds

ENGINES = ("ray", "inprocess", "batched")


@dataclass
class Result:
    """One run as its directory holds it."""

    run_dir: Path
    config: RunConfig
    rounds: list[dict[str, Any]]  # rounds.jsonl, one dict per finished round
    summary: dict[str, Any]  # summary.json ({} while the run has not finished)
    final_state: dict[str, np.ndarray] = field(repr=False)  # the last global state saved

    @property
    def finished(self) -> bool:
        return bool(self.summary) and len(self.rounds) == self.config.num_rounds

    @property
    def accuracy(self) -> list[float]:
        """Test accuracy after each round."""
        return [row["accuracy"] for row in self.rounds]

    @property
    def cumulative_uplink_bytes(self) -> list[int]:
        """Uplink payload bytes of all clients, summed up to each round."""
        return np.cumsum([row["uplink_payload_bytes"] for row in self.rounds]).tolist()


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record is emitted (a notebook
    or a test harness may replace it after the first run)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # not setStream: it flushes the old stream, which may be closed
        super().emit(record)


def _quiet_logs() -> None:
    """Flower logs every step at INFO; the live table says it better. Warnings stay."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    logger = logging.getLogger("fedmask")
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def execute(config: RunConfig, run_dir: Path, engine: str = "ray", resume: bool = False,
            ray_address: str | None = None, quiet: bool = False) -> None:
    """Run the rounds of a checked config on ``engine``, writing ``run_dir``.

    ``ray_address`` joins a running Ray cluster ('auto', or the head's HOST:PORT) instead of
    starting a private Ray; without it Ray itself honours the ``RAY_ADDRESS`` variable.
    ``quiet``: print nothing (no table, no live line); the run directory is written as always.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    from fedmask.console import RunDisplay

    with RunDisplay(quiet=quiet):
        _execute(config, run_dir, engine, resume, ray_address)


def _execute(config: RunConfig, run_dir: Path, engine: str, resume: bool, ray_address: str | None) -> None:
    if config.secure_aggregation:
        from clients.secure_client_app import app as client_app
    else:
        from clients.client_app import app as client_app
    from server.server_app import make_server_app, run_server

    _quiet_logs()
    if engine == "inprocess":
        from engines.inprocess import InProcessGrid

        run_server(InProcessGrid(client_app, config.num_clients), config, run_dir, resume=resume)
    elif engine == "batched":
        check_engine(config, engine)
        from engines.batched import BatchedGrid

        run_server(BatchedGrid(client_app, config.num_clients), config, run_dir, resume=resume)
    else:
        from engines import ray

        _export_plugin_paths(config)
        ray.run(make_server_app(config, run_dir, resume=resume), client_app, config.num_clients, config.num_cpus,
                config.num_gpus, ray_address)


def _export_plugin_paths(config: RunConfig) -> None:
    """Ray's workers (started from this process's environment) import the run's model and
    dataset plug-ins as this process did: their folders, and the working directory, go on
    ``PYTHONPATH``."""
    import os

    from fedmask.plugins import search_paths

    paths = [*search_paths([config.method, config.model, config.dataset]), os.getcwd()]
    current = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*paths, *current]))


def check_engine(config: RunConfig, engine: str) -> None:
    """ConfigError naming ``engine`` when the config cannot run on it."""
    if engine == "batched":
        from fedmask.batched import unsupported

        why = unsupported(config, config.method_entry.mask_mode)
        if why:
            raise ConfigError(f"engine: 'batched' cannot run this config: {why}; use --engine inprocess or ray")


def config_from(source: str | Path | RunConfig | Mapping[str, Any], **overrides: Any) -> RunConfig:
    """A checked config from a TOML path, a mapping of keys or a RunConfig, with overrides.

    Overrides take kebab- or snake-case names: ``num_rounds=3`` or ``**{"num-rounds": 3}``.
    """
    values = {key.replace("_", "-"): value for key, value in overrides.items()}
    if isinstance(source, RunConfig):
        return source.replace(**values)
    if isinstance(source, Mapping):
        return resolve({**source, **values})
    return resolve({**read_toml(source), **values})


def simulate(source: str | Path | RunConfig | Mapping[str, Any], *, engine: str = "ray",
             out: str | Path | None = None, quiet: bool = False, **overrides: Any) -> Result:
    """Check, run and read back one experiment; raises ConfigError (or DataError) before any round.

    ``out`` is the run directory (default ``runs/<method>-<time>``); it must not hold a run.
    ``quiet=True`` prints nothing: no table, no progress line (warnings about the config
    still go to the ``fedmask`` logger).
    """
    from fedmask.preflight import check_before_start

    config = config_from(source, **overrides)
    check_before_start(config)
    check_engine(config, engine)
    run_dir = Path(out) if out is not None else Path("runs") / f"{config.method.replace(':', '-')}-{_stamp()}"
    if (run_dir / "rounds.jsonl").exists():
        raise ConfigError(f"out: {run_dir} already holds a run; choose another folder")
    execute(config, run_dir, engine, quiet=quiet)
    return load_run(run_dir)


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000:06d}"


def load_run(run_dir: str | Path) -> Result:
    """A run directory read back: config, rounds, summary and the last saved global state.

    A plug-in the run used (``method = "module:Class"``) is not imported: results can be read
    from any folder, where the plug-in's module may not be importable."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").exists():
        raise FileNotFoundError(f"{run_dir} is not a fedmask run directory (no config.toml)")
    config = load(run_dir / "config.toml", check_plugin=False)
    rounds_path, summary_path = run_dir / "rounds.jsonl", run_dir / "summary.json"
    rounds = read_rounds(rounds_path) if rounds_path.exists() else []
    summary = read_json(summary_path) if summary_path.exists() else {}
    if not isinstance(summary, dict):
        raise RunFileError(f"{summary_path}: expected a JSON object (the run's summary), got {type(summary).__name__}")
    return Result(run_dir, config, rounds, summary, _final_state(run_dir))


def _final_state(run_dir: Path) -> dict[str, np.ndarray]:
    """The global state of the last checkpoint (or SecAgg+'s final_state.npz); {} if none."""
    from fedmask.record.checkpoint import FILENAME

    if (run_dir / FILENAME).exists():
        with np.load(run_dir / FILENAME) as data:
            return {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("state/")}
    if (run_dir / "final_state.npz").exists():
        with np.load(run_dir / "final_state.npz") as data:
            return {k: data[k] for k in data.files}
    return {}
