"""Iterative Weight Recycling: derived from the global scores, replayed bit for bit everywhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from clients.client_app import app as client_app
from clients.local_round import local_round
from engines.inprocess import InProcessGrid
from fedmask import task
from fedmask.config import ConfigError, RunConfig, resolve
from fedmask.core.masking import frozen_weights, get_scores, to_masked
from fedmask.methods.edge_popup import TopK
from fedmask.protocol.instruction import TrainInstruction
from fedmask.recycling import (
    RecycleLog,
    apply_plan,
    check_plan,
    is_recycle_round,
    plan_layout,
    recycle_plan,
    sync_frozen,
)
from fedmask.wire.frame import Layout, WireError
from fedmask.wire.masks import decode_masks
from fedmask.wire.state import encode_state
from server.server_app import run_server


def _config(method: str = "edge-popup", **extra) -> RunConfig:
    init = "kaiming-normal" if method == "biprop" else "signed-kaiming-constant"
    return resolve({"method": method, "init": init, "num-clients": 3, "clients-per-round": 3, "num-rounds": 4,
                    "recycle-every": 1, "recycle-fraction": 0.2, **extra})


def _model(config: RunConfig) -> torch.nn.Module:
    return task.make_model(config, task.splits_of(config), task.mode_of(config, config.method_entry.mask_mode))


def _spec(config: RunConfig, model: torch.nn.Module) -> task.ModelSpec:
    return task.ModelSpec.of(config, model, task.mode_of(config, config.method_entry.mask_mode))


def test_plan_takes_lowest_and_highest_scores():
    scores = np.array([[0.5, -3.0, 0.1, 2.0, -0.2], [1.0, 0.05, -4.0, 0.3, 0.0]], dtype=np.float32)
    plan = recycle_plan({"w": scores}, 0.2)  # 2 of 10 by |score|
    assert np.flatnonzero(plan["w/low"].ravel()).tolist() == [6, 9]  # |0.05|, |0.0|
    assert np.flatnonzero(plan["w/high"].ravel()).tolist() == [1, 7]  # |-3|, |-4|
    check_plan(plan, Layout((("w", (2, 5)),)))


def test_apply_copies_high_values_onto_low_weights_in_index_order():
    model = to_masked(nn.Sequential(nn.Linear(5, 2, bias=False)), TopK(), seed=1, init="kaiming-normal")
    before = frozen_weights(model)["0.weight"].clone().ravel()
    scores = np.array([[0.5, -3.0, 0.1, 2.0, -0.2], [1.0, 0.05, -4.0, 0.3, 0.0]], dtype=np.float32)
    apply_plan(model, recycle_plan({"0.weight": scores}, 0.2))
    after = frozen_weights(model)["0.weight"].ravel()
    assert after[6] == before[1] and after[9] == before[7]
    untouched = [i for i in range(10) if i not in (6, 9)]
    assert torch.equal(after[untouched], before[untouched])


def test_ties_are_broken_by_index_so_every_party_agrees():
    plan = recycle_plan({"w": np.ones((4, 5), dtype=np.float32)}, 0.25)
    assert np.flatnonzero(plan["w/low"].ravel()).tolist() == [0, 1, 2, 3, 4]
    assert np.flatnonzero(plan["w/high"].ravel()).tolist() == [15, 16, 17, 18, 19]


@pytest.mark.parametrize("method", ["edge-popup", "biprop"])
def test_client_and_server_weights_are_bitwise_identical_after_recycling(method):
    """A client replaying the broadcast log from a fresh model, a client that applied a prefix
    already, and the server's model all hold the same frozen bits; and a client that derives the
    plan itself from the broadcast state gets the logged plan."""
    config = _config(method)
    server_model = _model(config)
    spec = _spec(config, server_model)
    aggregator = config.method_entry.make_aggregator(config)
    state = aggregator.initial_state(get_scores(server_model))
    log = RecycleLog()
    rng = np.random.default_rng(0)
    for server_round in (1, 2):
        state = {k: np.abs(v + rng.normal(size=v.shape).astype(np.float32)) for k, v in state.items()}
        log.add(server_round, recycle_plan(state, 0.2), spec.layout, spec.fingerprint)
        sync_frozen(server_model, log, spec.layout, spec.fingerprint, config.seed, config.init)
    arrays = encode_state(state, spec.layout, "float32", 8)
    client_model = local_round(TrainInstruction(config, 3, 0, config.method_entry.mask_mode), arrays,
                               log.to_arrays()).model
    fresh = _model(config)
    sync_frozen(fresh, RecycleLog.from_arrays(log.to_arrays()), spec.layout, spec.fingerprint, config.seed, config.init)
    seeded = frozen_weights(_model(config))
    server_w, client_w, fresh_w = frozen_weights(server_model), frozen_weights(client_model), frozen_weights(fresh)
    for name in server_w:
        assert torch.equal(server_w[name], client_w[name]) and torch.equal(server_w[name], fresh_w[name])
    assert any(not torch.equal(server_w[n], seeded[n]) for n in server_w)  # recycling did change weights
    logged = decode_masks(log.events[-1][1], plan_layout(spec.layout), spec.fingerprint)
    assert all(np.array_equal(v, recycle_plan(state, 0.2)[k]) for k, v in logged.items())


def test_a_shorter_log_regenerates_from_the_seed():
    """A model that applied events a new run's log does not have goes back to the seeded weights."""
    config = _config()
    model = _model(config)
    spec = _spec(config, model)
    seeded = {k: v.clone() for k, v in frozen_weights(model).items()}
    log = RecycleLog()
    log.add(1, recycle_plan(get_scores(model), 0.3), spec.layout, spec.fingerprint)
    sync_frozen(model, log, spec.layout, spec.fingerprint, config.seed, config.init)
    assert any(not torch.equal(seeded[k], v) for k, v in frozen_weights(model).items())
    sync_frozen(model, RecycleLog(), spec.layout, spec.fingerprint, config.seed, config.init)
    assert all(torch.equal(seeded[k], v) for k, v in frozen_weights(model).items())


def test_tampered_log_is_refused_by_name():
    config = _config()
    model = _model(config)
    spec = _spec(config, model)
    log = RecycleLog()
    log.add(1, recycle_plan(get_scores(model), 0.2), spec.layout, spec.fingerprint)
    arrays = log.to_arrays()
    arrays["event-0"] = arrays["event-0"].copy()
    arrays["event-0"][-1] ^= 1
    with pytest.raises(WireError, match="crc32"):
        sync_frozen(model, RecycleLog.from_arrays(arrays), spec.layout, spec.fingerprint, config.seed, config.init)
    with pytest.raises(WireError, match="recycle log"):
        RecycleLog.from_arrays({"rounds": np.array([1, 2])})


def test_recycle_rounds_and_config_checks():
    config = _config(**{"recycle-every": 2, "num-rounds": 6})
    assert [r for r in range(1, 7) if is_recycle_round(config, r)] == [2, 4]
    with pytest.raises(ConfigError, match="recycle-every"):
        resolve({"method": "fedpm", "recycle-every": 2})
    with pytest.raises(ConfigError, match="recycle-fraction"):
        resolve({"method": "edge-popup", "recycle-every": 2, "recycle-fraction": 0.5})


@pytest.mark.parametrize("method", ["edge-popup", "biprop"])
def test_recycling_runs_end_to_end_and_counts_its_bytes(tmp_path, method):
    """The log travels in every broadcast after the first event; the ledger weighs it apart;
    no client fails to replay it."""
    config = _config(method, **{"recycle-every": 1, "num-rounds": 3})
    run_server(InProcessGrid(client_app, 3), config, tmp_path / "iwr")
    rows = [json.loads(x) for x in (tmp_path / "iwr" / "rounds.jsonl").read_text().splitlines()]
    assert [r["failures"] for r in rows] == [0, 0, 0]
    recycle = [r["downlink_recycle_bytes"] for r in rows]
    assert recycle[0] == 0  # round 1: an empty log (a 0-length 'rounds' array)
    assert recycle[2] > recycle[1] > recycle[0]  # one event, then two
    per_event = (recycle[1] - recycle[0]) / 3
    entropy = -(0.2 * np.log2(0.2) + 0.8 * np.log2(0.8))
    assert per_event < 1.02 * 2 * entropy * 85_002 / 8 + 400  # two entropy-coded sets, ~2 H(0.2) bits/weight
    assert per_event < 0.2 * 85_002 * 2 * 4  # far below sending the pairs as int32 indices
    assert all(r["downlink_payload_bytes"] > r["downlink_recycle_bytes"] for r in rows)
    summary = json.loads((tmp_path / "iwr" / "summary.json").read_text())
    assert summary["downlink_recycle_bytes"] == sum(recycle)
