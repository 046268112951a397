"""The worked plug-in of docs/strategies.md: majority vote with server momentum."""

from __future__ import annotations

import numpy as np
import pytest

import fedmask
from examples.majority_momentum import MajorityMomentum, MomentumParams
from fedmask.config import resolve

NAME = "examples.majority_momentum:MajorityMomentum"


def test_rule_on_a_hand_made_vote():
    """Two of three clients keep weight 0, one keeps weight 1: the majority is (1, 0); theta
    moves by lr * (majority - theta), then by lr * (momentum * previous + new step)."""
    agg = MajorityMomentum(resolve({"method": NAME}))
    p = MomentumParams()
    theta = {"w": np.array([0.5, 0.5], dtype=np.float32)}
    masks = [{"w": np.array([True, False])}, {"w": np.array([True, False])}, {"w": np.array([False, True])}]
    first = agg.aggregate(1, theta, masks, [1.0, 1.0, 1.0])
    assert np.allclose(first["w"], [0.5 + p.server_lr * 0.5, 0.5 - p.server_lr * 0.5])
    second = agg.aggregate(2, first, masks, [1.0, 1.0, 1.0])
    step = np.array([1.0, 0.0]) - first["w"]
    assert np.allclose(second["w"], first["w"] + p.server_lr * (p.momentum * np.array([0.5, -0.5]) + step))
    assert second["w"].dtype == np.float32


def test_momentum_survives_a_checkpoint():
    """state_dict -> load_state_dict into a fresh instance continues exactly as the original."""
    config = resolve({"method": NAME})
    rng = np.random.default_rng(0)
    theta = {"w": rng.random(20).astype(np.float32)}
    rounds = [[{"w": rng.random(20) < 0.5} for _ in range(3)] for _ in range(4)]
    straight, state = MajorityMomentum(config), theta
    for r, masks in enumerate(rounds, 1):
        state = straight.aggregate(r, state, masks, [1.0, 2.0, 1.0])
    first, resumed_state = MajorityMomentum(config), theta
    for r, masks in enumerate(rounds[:2], 1):
        resumed_state = first.aggregate(r, resumed_state, masks, [1.0, 2.0, 1.0])
    second = MajorityMomentum(config)
    second.load_state_dict(first.state_dict())
    for r, masks in enumerate(rounds[2:], 3):
        resumed_state = second.aggregate(r, resumed_state, masks, [1.0, 2.0, 1.0])
    assert np.array_equal(state["w"], resumed_state["w"])


def test_runs_end_to_end_and_learns(tmp_path):
    """Through the in-process engine on digits: every round aggregates every client and
    accuracy rises above its first round."""
    result = fedmask.simulate({"method": NAME, "num-clients": 4, "clients-per-round": 4, "num-rounds": 4},
                              engine="inprocess", out=tmp_path / "r")
    assert [r["clients"] for r in result.rounds] == [4, 4, 4, 4]
    assert result.accuracy[-1] > result.accuracy[0]
    assert set(result.final_state) and all(np.all((v >= 0.02) & (v <= 0.98)) for v in result.final_state.values())


def test_plugin_parameters_are_frozen():
    with pytest.raises(AttributeError):
        MomentumParams().server_lr = 1.0  # type: ignore[misc]
