"""A validation split for every choice, the test split read once (issue 28): the server holds
out a seeded share of the train split that no client trains on, evaluates every round on it,
and reads the test split after the last round only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedmask import cli, task
from fedmask.config import resolve
from fedmask.core.data import DataError, Splits, hold_out_validation, partition_sizes


def _splits(n: int = 50) -> Splits:
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1)
    y = torch.arange(n) % 3
    return Splits(x, y, x[:5].clone(), y[:5].clone(), 3)


def _ids(x: torch.Tensor | None) -> set[int]:
    assert x is not None
    return {int(v) for v in x.flatten()}


def test_validation_is_a_seeded_share_of_train_that_leaves_train():
    splits = _splits()
    held = hold_out_validation(splits, 0.2, seed=3)
    assert held.x_val is not None and held.y_val is not None
    assert len(held.y_val) == 10 and len(held.y_train) == 40
    assert _ids(held.x_val).isdisjoint(_ids(held.x_train))
    assert _ids(held.x_val) | _ids(held.x_train) == set(range(50))
    assert torch.equal(held.y_val, held.x_val.flatten().long() % 3)  # labels travel with their images
    assert torch.equal(held.x_test, splits.x_test)
    again = hold_out_validation(splits, 0.2, seed=3)
    assert torch.equal(again.x_val, held.x_val) and torch.equal(again.x_train, held.x_train)
    assert _ids(hold_out_validation(splits, 0.2, seed=4).x_val) != _ids(held.x_val)


def test_no_validation_fraction_keeps_the_splits():
    splits = _splits()
    assert hold_out_validation(splits, 0.0, seed=0) is splits


def test_a_validation_fraction_that_empties_a_split_is_refused():
    with pytest.raises(DataError, match="validation-fraction"):
        hold_out_validation(_splits(3), 0.1, seed=0)


def test_clients_partition_only_what_validation_left():
    config = resolve({"validation-fraction": 0.25, "num-clients": 5, "clients-per-round": 5})
    splits = task.splits_of(config)
    assert splits.x_val is not None
    sizes = partition_sizes(splits, 5, config.partitioner, config.seed, config.dirichlet_alpha,
                            config.classes_per_client)
    assert sum(sizes) == len(splits.y_train)
    val_rows = {tuple(row.tolist()) for row in splits.x_val.flatten(1)}
    for pid in range(5):
        x, _ = task.client_data(config, pid)
        assert not val_rows & {tuple(row.tolist()) for row in x.flatten(1)}


def test_validation_fraction_outside_its_range_stops_before_the_run(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("validation-fraction = 1.0\n")
    code = cli.main(["run", str(config), "--engine", "inprocess", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "validation-fraction" in err and "[0, 1)" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_rounds_are_scored_on_validation_and_the_test_split_is_read_once(tmp_path, monkeypatch):
    from clients.client_app import app
    from engines.inprocess import InProcessGrid
    from server import server_app

    config = resolve({"num-clients": 3, "clients-per-round": 3, "num-rounds": 3, "validation-fraction": 0.2})
    splits = task.splits_of(config)
    reads: list[str] = []
    real = task.evaluate

    def watched(model, x, y, *args, **kwargs):
        reads.append("test" if x is splits.x_test else "validation" if x is splits.x_val else "other")
        return real(model, x, y, *args, **kwargs)

    monkeypatch.setattr(task, "evaluate", watched)
    summary = server_app.run_server(InProcessGrid(app, 3), config, tmp_path / "run")
    assert reads.count("test") == 1 and reads[-1] == "test"
    assert reads.count("validation") == 4  # the initial state and each of 3 rounds
    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [("test_accuracy" in r) for r in rows] == [False, False, True]
    assert summary["evaluated_on"] == "validation"
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert summary["test_accuracy"] == rows[-1]["test_accuracy"]
    assert np.isfinite(rows[-1]["test_loss"])


def test_without_validation_the_test_split_is_the_reported_and_evaluated_split(tmp_path):
    from clients.client_app import app
    from engines.inprocess import InProcessGrid
    from server import server_app

    config = resolve({"num-clients": 3, "clients-per-round": 3, "num-rounds": 2})
    summary = server_app.run_server(InProcessGrid(app, 3), config, tmp_path / "run")
    assert summary["evaluated_on"] == "test" and summary["test_accuracy"] == summary["final_accuracy"]
