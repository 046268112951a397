"""Tests for `fedmask sweep`: the plan, refusing bad grids, and continuing after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmask import cli
from fedmask.config import ConfigError
from fedmask.sweep import parse_grid, plan

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.toml")
TINY = ["num-clients=2", "clients-per-round=2", "num-rounds=2"]


def test_grid_values_are_read_as_toml_or_strings():
    """Numbers stay numbers, words become strings, plug-in names keep their colon."""
    grid = parse_grid(["density=0.3,0.5", "method=fedpm,examples.mean_vote:MeanVote", "local-epochs=1,2"])
    assert grid == {"density": [0.3, 0.5], "method": ["fedpm", "examples.mean_vote:MeanVote"], "local-epochs": [1, 2]}


@pytest.mark.parametrize("item, fragment", [("num-round=1,2", "did you mean 'num-rounds'"), ("seed=1,2", "--seeds"),
                                            ("density", "key=value")])
def test_bad_grid_is_refused_naming_the_key(item, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_grid([item])


def test_plan_checks_every_config_before_any_run(tmp_path):
    """An impossible grid value stops the plan with the key named; a good grid gives one run per setting and seed."""
    with pytest.raises(ConfigError, match="'density'"):
        plan(QUICK, [0], parse_grid(["density=0.5,1.5"]), TINY, tmp_path)
    runs = plan(QUICK, [0, 1], parse_grid(["lr=0.1,0.05"]), TINY, tmp_path)
    assert [(r.setting, r.seed) for r in runs] == [("lr=0.1", 0), ("lr=0.1", 1), ("lr=0.05", 0), ("lr=0.05", 1)]
    assert runs[0].run_dir == tmp_path / "lr=0.1" / "seed-0"


def test_cli_refuses_an_unknown_grid_key_before_running(tmp_path, capsys):
    """`fedmask sweep --grid num-round=...` exits 2 naming the key, and creates nothing."""
    code = cli.main(["sweep", QUICK, "--grid", "num-round=1,2", "--out", str(tmp_path / "sw")])
    assert code == 2 and "num-round" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


def test_killed_sweep_continues_without_repeating_finished_runs(tmp_path):
    """Kill a sweep after its first run finished; the same command finishes the rest, keeps the
    finished run as it was, and writes a summary over all seeds."""
    out = tmp_path / "sw"
    command = ["sweep", QUICK, "--seeds", "0,1,2", *[a for s in TINY for a in ("--set", s)], "--engine", "inprocess",
               "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "fedmask.cli", *command], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "base" / "seed-0" / "summary.json"
    deadline = time.monotonic() + 120
    try:
        while not first.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert first.exists(), "the first run did not finish in time"
    stamp = first.stat().st_mtime_ns
    assert not (out / "base" / "seed-2" / "summary.json").exists()
    assert cli.main(command) == 0
    assert first.stat().st_mtime_ns == stamp  # kept, not run again
    assert all((out / "base" / f"seed-{s}" / "summary.json").exists() for s in (0, 1, 2))
    summary = json.loads((out / "summary.json").read_text())
    [row] = summary["rows"]
    assert row["seeds"] == [0, 1, 2] and row["final_accuracy"]["n"] == 3
    assert " ± " in (out / "summary.md").read_text()


def test_same_out_with_another_grid_is_refused(tmp_path):
    """A folder holding one sweep is not reused for a different plan."""
    out = tmp_path / "sw"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"config": "other.toml", "runs": []}))
    assert cli.main(["sweep", QUICK, "--out", str(out), *[a for s in TINY for a in ("--set", s)]]) == 2
