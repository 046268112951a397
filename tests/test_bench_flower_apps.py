"""bench/flower_apps.py reports a Ray row only for a run that trained: a plain ClientApp whose
every call fails (the apps unpicklable in Ray's workers) keeps the initial model, and its
rounds would time Flower's error path instead of training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import flower_apps


def _rows(accuracy: list[float]) -> dict:
    return {"rc": 0, "accuracy": accuracy, "s": [1.0] * len(accuracy), "cpu_s": [1.0] * len(accuracy)}


def test_a_ray_run_that_did_not_learn_is_refused_not_timed(tmp_path, monkeypatch):
    monkeypatch.setattr(flower_apps, "run_once", lambda *a: _rows([0.0931] * 4))
    with pytest.raises(SystemExit, match="flower did not learn"):
        flower_apps.ray_row("flower", [], Path(tmp_path / "run"))


def test_a_ray_run_that_learned_is_timed_over_rounds_after_the_first(tmp_path, monkeypatch):
    row = _rows([0.2, 0.35, 0.45])
    row["s"] = [9.0, 1.0, 2.0]
    monkeypatch.setattr(flower_apps, "run_once", lambda *a: row)
    assert flower_apps.ray_row("flower+injector", [], Path(tmp_path / "run"))["s_per_round"] == 1.5


def test_fedavg_is_judged_against_flower_run_in_the_same_repeat():
    """A slow repeat for both (the machine busier) must not count against fedmask: each ratio
    pairs runs of one repeat, where the best-of ratio would mix 1.20 with 1.06."""
    rows = [{"variant": "fedmask-fedavg", "repeat": 0, "s_per_round": 1.20},
            {"variant": "flower+injector", "repeat": 0, "s_per_round": 1.19},
            {"variant": "flower+injector", "repeat": 1, "s_per_round": 1.06},
            {"variant": "fedmask-fedavg", "repeat": 1, "s_per_round": 1.07}]
    ratios = flower_apps.paired_ratios(rows, "fedmask-fedavg", "flower+injector")
    assert [round(r, 3) for r in ratios] == [round(1.20 / 1.19, 3), round(1.07 / 1.06, 3)]
    assert flower_apps.paired_ratios(rows[:1], "fedmask-fedavg", "flower+injector") == []


def test_render_writes_the_report_again_from_its_json_with_its_own_machine(tmp_path):
    rows = [{"variant": v, "repeat": 0, "s_per_round": s, "cpu_per_round": 1.0, "rc": 0}
            for v, s in (("flower+injector", 1.0), ("fedmask-fedavg", 1.2))]
    (tmp_path / "flower-apps.json").write_text(json.dumps({"ray": rows, "attribution": [], "source": "x",
                                                            "machine": {"git_head": "abc1234"}}))
    assert flower_apps.main(["--render", str(tmp_path)]) == 0
    report = (tmp_path / "flower-apps.md").read_text()
    assert "median 1.20 (target <= 1.1) FAIL" in report and "abc1234" in report
