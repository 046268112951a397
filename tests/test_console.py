"""The console of a run (fedmask.console): one line per round whatever the output, a live
progress line only on a terminal, no line wrapped in a log, nothing at all when quiet, and
none of the third-party notices that say nothing about the run."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from rich.console import Console

import fedmask
from fedmask import cli, console
from fedmask.console import (
    FRACTION_EVALUATE_NOTICE,
    RUN_SIMULATION_NOTICE,
    RunDisplay,
    flower_notices_hidden,
    hide_ray_accelerator_tip,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "num-rounds=2", "--set", "num-clients=2", "--set", "clients-per-round=2"]
NOTICES = ("DEPRECATED", "run_simulation", "fraction_evaluate", "FutureWarning", "RAY_ACCEL_ENV_VAR")


def _long_dir(tmp_path: Path) -> Path:
    """A run directory whose path alone is longer than 80 columns."""
    path = tmp_path / ("a-folder-name-long-enough-to-pass-eighty-columns-" * 2) / "run"
    assert len(str(path)) > 100
    return path


def _table_lines(out: str, run_dir: Path) -> list[str]:
    """The header (with the whole run directory), the columns, one line per round and the final line."""
    lines = out.splitlines()
    assert lines[0].startswith("fedmask ") and lines[0].endswith(f"→ {run_dir}"), lines[0]
    assert lines[1].split()[:3] == ["round", "acc", "loss"]
    assert lines[-1].startswith("final accuracy") and lines[-1].endswith(f"→ {run_dir}"), lines[-1]
    return lines[2:-1]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def flower_log():
    """Every message Flower's logger lets through, as text."""
    records = _Records()
    logger = logging.getLogger("flwr")
    logger.addHandler(records)
    yield records.messages
    logger.removeHandler(records)


def test_round_lines_are_printed_and_paths_not_wrapped_when_not_a_terminal(tmp_path, capsys):
    """Piped output (not a terminal, 80 columns by default): a line per round, and the header
    and final line hold the whole 100+ character run directory on one line."""
    run_dir = _long_dir(tmp_path)
    code = cli.main(["run", str(ROOT / "configs/quickstart.toml"), *TINY, "--engine", "inprocess",
                     "--out", str(run_dir)])
    assert code == 0
    rows = _table_lines(capsys.readouterr().out, run_dir)
    assert [row.split()[0] for row in rows] == ["1", "2"]


def test_sweep_lines_are_not_wrapped_when_not_a_terminal(tmp_path, capsys):
    """`fedmask sweep` piped: its lines (header, run started, run failed, summary) each hold the
    whole 100+ character folder on one line. The run fails fast: its data folder is missing."""
    config = tmp_path / "missing-data.toml"
    config.write_text(f'dataset = "idx"\ndata-dir = "{tmp_path / "no-such-folder"}"\nnum-rounds = 1\n')
    out = _long_dir(tmp_path)
    assert cli.main(["sweep", str(config), "--engine", "inprocess", "--out", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    log = out / "base" / "seed-0.log"
    assert lines[0].endswith(f"→ {out}")
    assert lines[1].endswith(f"running … (log {log})") and lines[2].endswith(f"FAILED (exit 2); see {log}")
    assert all(str(out) in line for line in lines)  # no line holds a piece of the path only


def test_quiet_simulate_prints_nothing(tmp_path, capfd, flower_log):
    """fedmask.simulate(..., quiet=True) writes its run directory and prints nothing at all."""
    result = fedmask.simulate({"num-clients": 3, "clients-per-round": 3, "num-rounds": 2}, engine="inprocess",
                              out=tmp_path / "r", quiet=True)
    assert result.finished and len(result.rounds) == 2
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert not any(FRACTION_EVALUATE_NOTICE in message for message in flower_log)


def test_config_error_is_exported_from_the_package(tmp_path):
    """`from fedmask import ConfigError` catches what simulate raises for a bad key."""
    from fedmask import ConfigError

    assert ConfigError is fedmask.config.ConfigError and "ConfigError" in fedmask.__all__
    with pytest.raises(ConfigError, match="num-rounds"):
        fedmask.simulate({"num-rounds": 0}, engine="inprocess", out=tmp_path / "r", quiet=True)


def test_flower_notices_hidden_drops_only_the_named_notices(flower_log):
    """The filter drops Flower's run_simulation deprecation notice and the fraction_evaluate
    warning, exactly: another deprecation and another warning still show, and nothing is
    dropped outside the ``with``."""
    from flwr.common.logger import log
    from flwr.supercore.logger import warn_deprecated_feature

    notice = ("The `run_simulation` function is deprecated and will be removed in a future version of Flower. "
              "Please use `flwr run` in the CLI instead to run your simulation.")
    with flower_notices_hidden(RUN_SIMULATION_NOTICE, FRACTION_EVALUATE_NOTICE):
        warn_deprecated_feature(notice)
        log(logging.WARNING, FRACTION_EVALUATE_NOTICE)
        warn_deprecated_feature("The `other` function is deprecated.")
        log(logging.WARNING, "fraction_train is set to 0.0. Federated training will be skipped.")
    warn_deprecated_feature(notice)
    assert not any(FRACTION_EVALUATE_NOTICE in m for m in flower_log)
    assert sum(RUN_SIMULATION_NOTICE in m for m in flower_log) == 1  # the one outside the with
    assert any("The `other` function is deprecated" in m for m in flower_log)
    assert any("fraction_train is set to 0.0" in m for m in flower_log)


def test_ray_accelerator_tip_is_hidden_and_other_future_warnings_kept():
    """Ray's FutureWarning about accelerator variables is filtered by its text; any other
    FutureWarning still shows."""
    tip = ("Tip: In future versions of Ray, Ray will no longer override accelerator visible devices env var if "
           "num_gpus=0 or num_gpus=None (default). To enable this behavior and turn off this error message, set "
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hide_ray_accelerator_tip()
        warnings.warn(tip, FutureWarning, stacklevel=1)
        warnings.warn("Tip: something else will change", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["Tip: something else will change"]


def test_live_line_on_a_terminal_shows_stage_round_and_eta():
    """On a terminal the display draws the stage, then 'round N/M' with the time per round and
    an ETA; the rounds' own lines printed meanwhile stay in the output."""
    screen = io.StringIO()
    with RunDisplay(Console(file=screen, force_terminal=True, width=120, highlight=False)) as display:
        assert display.live and console.current() is display
        display.stage("starting Ray")
        display.rounds(0, 4)
        display.console.print("    1 0.5000 (a round's line)")
        display.round_done(1)
        display.round_done(2)
    shown = screen.getvalue()
    assert "round 3/4" in shown and "s/round · ETA" in shown
    assert "    1 0.5000 (a round's line)" in shown
    assert console.current() is not display  # closed: nothing left active


def test_no_live_line_when_not_a_terminal():
    """Not a terminal (a pipe, a log file): the display draws nothing, whatever it is told."""
    screen = io.StringIO()
    with RunDisplay(Console(file=screen, width=120)) as display:
        assert not display.live
        display.stage("starting Ray")
        display.rounds(0, 4)
        display.round_done(1)
    assert screen.getvalue() == ""


def test_eta_is_time_per_round_times_rounds_left(monkeypatch):
    """Two rounds in 4 s of 10 (a resumed run that had done 0): 2.0 s/round, 8 left, ETA 0:16;
    a resumed run counts only the rounds it ran itself."""
    clock = iter([100.0, 104.0, 200.0, 209.0])
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    display = RunDisplay(Console(file=io.StringIO()))
    display.rounds(0, 10)
    display.round_done(2)
    assert display.eta() == "2.0 s/round · ETA 0:16"
    display.rounds(5, 10)  # resumed after round 5: 3 rounds in 9 s
    display.round_done(8)
    assert display.eta() == "3.0 s/round · ETA 0:06"


@pytest.mark.ray
def test_ray_run_shows_no_third_party_notices(tmp_path):
    """`fedmask run` under Ray, output piped: no Flower deprecation notice, no fraction_evaluate
    warning, no Ray FutureWarning; one line per round; the long run directory on one line."""
    run_dir = _long_dir(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "fedmask.cli", "run", str(ROOT / "configs/quickstart.toml"), *TINY, "--out",
         str(run_dir)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert not [line for line in output.splitlines() if any(n in line for n in NOTICES)], output
    rows = _table_lines(proc.stdout, run_dir)
    assert [row.split()[0] for row in rows] == ["1", "2"]
