"""Trackers (fedmask.record.tracking): accuracy against the cumulative bytes it cost, in
TensorBoard and MLflow, and MLflow's end-of-run summary and artifacts, read back from what
was written. Each test skips only when its optional package is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import fedmask
from fedmask.record.tracking import Tracker

TINY = {"num-clients": 3, "clients-per-round": 3, "num-rounds": 3}


def _cumulative_total(rounds: list[dict]) -> list[int]:
    """Payload bytes sent so far, both directions, after each round."""
    return np.cumsum([r["uplink_payload_bytes"] + r["downlink_payload_bytes"] for r in rounds]).tolist()


def test_tensorboard_logs_accuracy_against_cumulative_total_bytes(tmp_path):
    """TensorBoard holds cumulative/{uplink,downlink,total}_payload_bytes per round, and
    vs_total_bytes/accuracy whose steps are the cumulative total bytes."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = fedmask.simulate(TINY, tracker="tensorboard", engine="inprocess", out=tmp_path / "r", quiet=True)
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    events.Reload()
    totals = _cumulative_total(result.rounds)
    assert totals[0] < totals[1] < totals[2]

    def logged(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    rounds = [r["round"] for r in result.rounds]
    assert logged("cumulative/total_payload_bytes") == list(zip(rounds, map(float, totals)))
    assert [v for _, v in logged("cumulative/uplink_payload_bytes")] == \
        np.cumsum([r["uplink_payload_bytes"] for r in result.rounds]).tolist()
    by_bytes = logged("vs_total_bytes/accuracy")
    assert [s for s, _ in by_bytes] == totals
    assert np.allclose([v for _, v in by_bytes], result.accuracy, rtol=1e-6)


def test_mlflow_gets_bytes_curve_final_summary_and_artifacts(tmp_path, monkeypatch):
    """MLflow: accuracy against cumulative total bytes (the step), the summary's numbers as
    summary.* metrics, and summary.json, config.toml and curves.png as artifacts, kept beside
    the run (nothing in the folder the run was started from)."""
    mlflow = pytest.importorskip("mlflow")
    started_in = tmp_path / "cwd"
    started_in.mkdir()
    monkeypatch.chdir(started_in)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = fedmask.simulate(TINY, tracker="mlflow", engine="inprocess", out=tmp_path / "r", quiet=True)
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'r' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("fedmask").experiment_id])
    run_id = run.info.run_id

    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "vs_total_bytes.accuracy")]
    assert history == list(zip(_cumulative_total(result.rounds), result.accuracy))
    totals = [m.value for m in client.get_metric_history(run_id, "cumulative.total_payload_bytes")]
    assert totals == list(map(float, _cumulative_total(result.rounds)))

    metrics = run.data.metrics
    assert metrics["summary.final_accuracy"] == pytest.approx(result.summary["final_accuracy"])
    assert metrics["summary.uplink_payload_bytes"] == result.summary["uplink_payload_bytes"]
    assert metrics["summary.total_payload_bytes"] == result.summary["total_payload_bytes"]

    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["config.toml", "curves.png", "summary.json"]
    fetched = Path(client.download_artifacts(run_id, "summary.json", str(tmp_path / "fetched")))
    assert json.loads(fetched.read_text()) == result.summary
    assert list(started_in.iterdir()) == []


class _Recording(Tracker):
    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[dict[str, float], int]] = []

    def scalars(self, values, step):
        self.logged.append((dict(values), step))


def test_resumed_run_counts_the_bytes_of_rounds_before_the_stop(tmp_path, monkeypatch):
    """A recorder resuming after round 2 gives its tracker the kept rounds' bytes, so round 3's
    cumulative bytes go on from them (not from zero)."""
    from fedmask.config import resolve
    from fedmask.record import results

    rows = [{"round": i, "accuracy": 0.5, "loss": 0.5, "clients": 3, "failures": 0, "num_params": 1000,
             "uplink_payload_bytes": 100 * i, "uplink_message_bytes": 100 * i + 50,
             "downlink_payload_bytes": 10 * i, "downlink_message_bytes": 10 * i + 50, "uplink_bpp": 0.1,
             "downlink_bpp": 0.01, "elapsed_s": float(i), "failure_details": []} for i in (1, 2, 3)]
    (tmp_path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    tracker = _Recording()
    monkeypatch.setattr(results, "make_tracker", lambda *args: tracker)
    results.RunRecorder(tmp_path, resolve(TINY), 1000, resume_after=2)
    tracker.log_round(3, rows[2])
    per_round, by_bytes = tracker.logged
    assert per_round[1] == 3
    assert per_round[0]["cumulative/uplink_payload_bytes"] == 600
    assert per_round[0]["cumulative/downlink_payload_bytes"] == 60
    assert per_round[0]["cumulative/total_payload_bytes"] == 660
    assert by_bytes == ({"vs_total_bytes/accuracy": 0.5, "vs_total_bytes/loss": 0.5}, 660)
