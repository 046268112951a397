"""``fedmask sweep``: the product of settings over seeds, each a normal run directory.

A sweep is a plan written to ``OUT/sweep.json``: one run per (grid setting, seed), in
``OUT/<setting>/seed-<n>/``. Every run is an ordinary ``fedmask run`` in its own process
(Ray starts and stops cleanly per run). Running the same command again continues a killed
sweep: finished runs are kept as they are, a run stopped mid-way resumes from its last
checkpoint, the rest start. At the end (and after every run) the sweep writes
``summary.md``, ``summary.csv`` and ``summary.json``: mean ± std over seeds per setting,
and ``summary.png`` (see :mod:`fedmask.report`).
"""

from __future__ import annotations

import difflib
import itertools
import json
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmask.config import SCHEMA, ConfigError, is_key, load, parse_override
from fedmask.record.files import read_json

PLAN = "sweep.json"


@dataclass(frozen=True)
class PlannedRun:
    setting: str  # "density=0.3,lr=0.05", or "base" without a grid
    seed: int
    sets: tuple[str, ...]  # the --set arguments of this run (grid values and the seed)
    run_dir: Path

    def state(self) -> str:
        """``done`` (summary written, every round in), ``partial`` (started), or ``new``."""
        if (self.run_dir / "summary.json").exists():
            summary = read_json(self.run_dir / "summary.json")
            config = load(self.run_dir / "config.toml", check_plugin=False)
            if isinstance(summary, dict) and summary.get("rounds") == config.num_rounds:
                return "done"
        return "partial" if (self.run_dir / "config.toml").exists() else "new"


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``key=a,b,c`` items to {key: [a, b, c]}; each value read as TOML, else as a string."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(f"--grid expects key=value[,value...], got {item!r}")
        if not is_key(key):
            near = difflib.get_close_matches(key, SCHEMA, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"--grid: unknown config key '{key}'{hint}")
        if key == "seed":
            raise ConfigError("--grid: use --seeds for the seed")
        if key in grid:
            raise ConfigError(f"--grid: key '{key}' given twice")
        grid[key] = [parse_override(f"{key}={value}")[1] for value in raw.split(",")]
    return grid


def _folder_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,-]+", "_", text)[:120] or "base"


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def plan(config_path: str | Path, seeds: Sequence[int], grid: dict[str, list[Any]], sets: Sequence[str],
         out: Path) -> list[PlannedRun]:
    """Every run of the sweep, each config checked now (a bad one stops the sweep before any run)."""
    if not seeds:
        raise ConfigError("--seeds: expected at least one seed")
    keys = list(grid)
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        setting = ",".join(f"{k}={v}" for k, v in zip(keys, values)) or "base"
        grid_sets = tuple(f"{k}={_toml_value(v)}" for k, v in zip(keys, values))
        for seed in seeds:
            run_sets = (*sets, *grid_sets, f"seed={seed}")
            load(config_path, list(run_sets))  # raises ConfigError naming the key
            runs.append(PlannedRun(setting, seed, run_sets, out / _folder_name(setting) / f"seed-{seed}"))
    return runs


def _plan_record(config_path: str | Path, runs: Sequence[PlannedRun]) -> dict[str, Any]:
    return {"config": str(config_path),
            "runs": [{"setting": r.setting, "seed": r.seed, "sets": list(r.sets), "dir": str(r.run_dir)}
                     for r in runs]}


def run_sweep(config_path: str | Path, seeds: Sequence[int], grid_items: Sequence[str], sets: Sequence[str],
              out: Path, engine: str = "ray", target: float = 0.9) -> int:
    """Run (or continue) a sweep; returns the number of runs that failed."""
    from fedmask.console import make_console

    console = make_console()  # in a log, a long path stays on one line
    runs = plan(config_path, seeds, parse_grid(grid_items), sets, out)
    record = _plan_record(config_path, runs)
    plan_path = out / PLAN
    if plan_path.exists() and read_json(plan_path) != record:
        raise ConfigError(f"--out: {out} holds another sweep (its {PLAN} differs); choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(json.dumps(record, indent=2) + "\n")
    states = [run.state() for run in runs]
    console.print(f"[bold]fedmask sweep[/bold] {config_path} · {len(runs)} runs "
                  f"({states.count('done')} done, {states.count('partial')} to resume, {states.count('new')} new) "
                  f"→ {out}")
    failed = 0
    for index, (run, state) in enumerate(zip(runs, states), 1):
        name = f"[{index:>{len(str(len(runs)))}}/{len(runs)}] {run.setting} seed {run.seed}"
        if state == "done":
            console.print(f"{name}: done already, kept")
            continue
        command = [sys.executable, "-m", "fedmask.cli", "run"]
        if state == "partial":
            command += ["--resume", str(run.run_dir)]
        else:
            command += [str(config_path), *[a for s in run.sets for a in ("--set", s)], "--out", str(run.run_dir),
                        "--overwrite"]
        command += ["--engine", engine]
        run.run_dir.parent.mkdir(parents=True, exist_ok=True)
        log_path = run.run_dir.parent / f"seed-{run.seed}.log"
        console.print(f"{name}: {'resuming' if state == 'partial' else 'running'} … (log {log_path})")
        start = time.perf_counter()
        with log_path.open("a") as log:
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
        took = time.perf_counter() - start
        if code == 0 and run.state() == "done":
            summary = read_json(run.run_dir / "summary.json")
            console.print(f"{name}: done in {took:.1f} s, final accuracy {summary['final_accuracy']:.4f}")
        else:
            failed += 1
            console.print(f"{name}: FAILED (exit {code}); see {log_path}", style="red")
        write_summary(out, target)
    write_summary(out, target)
    console.print(f"summary → {out / 'summary.md'}")
    return failed


def write_summary(out: Path, target: float) -> list[dict[str, Any]]:
    """summary.md / .csv / .json and summary.png from the finished runs under ``out``."""
    from fedmask import report

    finished = [run for run in report.find_runs([out]) if run.finished]
    if not finished:
        return []
    settings = report.group_runs(finished)
    rows = report.summarise(settings, target)
    (out / "summary.md").write_text(report.format_rows(rows, "md", target))
    (out / "summary.csv").write_text(report.format_rows(rows, "csv", target))
    (out / "summary.json").write_text(json.dumps(report.nan_to_none({"target": target, "rows": rows}), indent=2))
    report.plot(settings, out / "summary.png")
    return rows
