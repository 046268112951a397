"""bench/noniid.py with a validation split: what its finals, budgets and choices are read from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.noniid import main, run_dir, summarise

PARAMS = 1_000


def fake_run(out: Path, method: str, accuracy: list[float], bits_per_round: float, test: float | None) -> None:
    """A finished run's files: per-round accuracy, uplink bytes worth ``bits_per_round`` bits per
    parameter per client, and the test accuracy read once when ``test`` is given (validated)."""
    path = run_dir(out, "mnist", "iid", method, 0)
    path.mkdir(parents=True)
    up = bits_per_round * PARAMS / 8 * 10
    rows = [{"round": i + 1, "accuracy": a, "clients": 10, "num_params": PARAMS, "uplink_payload_bytes": up,
             "downlink_payload_bytes": 4 * PARAMS * 10, "uplink_bpp": bits_per_round} for i, a in enumerate(accuracy)]
    (path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"rounds": len(rows), "evaluated_on": "validation" if test is not None else "test",
               "test_accuracy": test if test is not None else accuracy[-1]}
    (path / "summary.json").write_text(json.dumps(summary))


# Up at round 2, down after: the best round within a budget and the last one differ.
CURVE = [0.5, 0.9, 0.6, 0.7]


def test_a_validated_run_reports_its_one_test_reading_and_the_last_round_within_each_budget(tmp_path: Path):
    """Finals are the test accuracy read once (not the last validation figure); a budget's
    figure is the last round it pays for (round 4 at 4 bits: 0.7), not the best (0.9)."""
    fake_run(tmp_path, "fedpm", CURVE, 1.0, test=0.66)
    rows, lines = summarise(tmp_path, ["mnist"], ["iid"], ["fedpm"], [0], 4)
    row = rows[0]
    assert row["final"] == [0.66] and row["evaluated_on"] == "validation"
    assert row["budgets"][1] == [0.5] and row["budgets"][4] == [0.7]
    assert row["validation"] == [pytest.approx(sum(CURVE) / 4)]
    assert any("val acc % at 4 b/param" in line for line in lines)


def test_a_run_without_validation_keeps_the_earlier_tables_reading(tmp_path: Path):
    """Without a validation split the finals are the last round's test accuracy and a budget the
    best round within it, as the committed tables were written."""
    fake_run(tmp_path, "fedpm", CURVE, 1.0, test=None)
    row = summarise(tmp_path, ["mnist"], ["iid"], ["fedpm"], [0], 4)[0][0]
    assert row["final"] == [0.7] and row["budgets"][4] == [0.9] and "validation" not in row


def test_runs_with_and_without_validation_in_one_table_are_refused(tmp_path: Path):
    fake_run(tmp_path, "fedpm", CURVE, 1.0, test=0.66)
    fake_run(tmp_path, "qsgd", CURVE, 1.0, test=None)
    with pytest.raises(SystemExit, match="with and without a validation split"):
        summarise(tmp_path, ["mnist"], ["iid"], ["fedpm", "qsgd"], [0], 4)


def test_a_validation_fraction_outside_0_1_stops_before_any_run(tmp_path: Path, capsys):
    assert main(["--tasks", "mnist", "--partitions", "iid", "--methods", "fedavg", "--seeds", "0",
                 "--validation-fraction", "1.5", "--out", str(tmp_path)]) == 2
    assert "--validation-fraction takes a share in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
