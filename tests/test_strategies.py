"""The worked plug-in of docs/strategies.md: majority vote with server momentum."""

from __future__ import annotations

import re

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


def test_runs_end_to_end_and_learns(tmp_path, caplog):
    """Through the in-process engine on digits: every round aggregates every client and
    accuracy rises above its first round. Its theta takes many values, so the lossless
    downlink sends the float32 state from round 2: one warning says so, the summary counts
    it, and compare's label says it rather than 'lossless down'."""
    from fedmask import report

    result = fedmask.simulate({"method": NAME, "num-clients": 4, "clients-per-round": 4, "num-rounds": 4},
                              engine="inprocess", out=tmp_path / "r")
    assert [r["clients"] for r in result.rounds] == [4, 4, 4, 4]
    assert result.accuracy[-1] > result.accuracy[0]
    assert set(result.final_state) and all(np.all((v >= 0.02) & (v <= 0.98)) for v in result.final_state.values())
    assert result.summary["downlink_kinds"] == {"replay": 4, "full": 12}
    fell_back = [r.getMessage() for r in caplog.records if "float32 state" in r.getMessage()]
    assert len(fell_back) == 1 and "MajorityMomentum" in fell_back[0] and "round 2" in fell_back[0]
    (setting,) = report.group_runs([result])
    # a Bernoulli plug-in's 'auto' uplink is relative-entropy: the label reads it from summary.json
    assert "(relative-entropy up, lossless down, 75% of broadcasts float32)" in setting.label


def test_plugin_parameters_are_frozen():
    with pytest.raises(AttributeError):
        MomentumParams().server_lr = 1.0  # type: ignore[misc]


def test_plugin_parameters_come_from_the_config():
    """plugin.<field> keys set the plug-in's Params (ints become floats for float fields); the
    resolved config holds every field, so config.toml and compare's labels show them."""
    config = resolve({"method": NAME, "plugin.server-lr": 0.05, "plugin.momentum": 0})
    assert MajorityMomentum(config).params == MomentumParams(server_lr=0.05, momentum=0.0)
    assert config.to_dict()["plugin.server-lr"] == 0.05 and config.to_dict()["plugin.eps"] == 0.02
    assert resolve(config.to_dict()) == config


@pytest.mark.parametrize("values, message", [
    ({"plugin.server-rate": 0.1}, "MajorityMomentum.Params has no field 'server-rate'; its fields: server-lr"),
    ({"plugin.server-lr": "fast"}, "config key 'plugin.server-lr': expected float"),
    ({"plugin.server-lr": [0.1]}, "expected a number, boolean or string"),
])
def test_bad_plugin_parameters_are_refused_naming_the_key(values, message):
    from fedmask.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve({"method": NAME, **values})
    with pytest.raises(ConfigError, match="plug-in parameters need method = 'module:Class'"):
        resolve({"plugin.server-lr": 0.1})


def test_a_sweep_grids_plugin_parameters_and_toml_takes_a_plugin_table(tmp_path):
    """--grid plugin.server-lr=0.05,0.2 plans two checked settings; a config file's [plugin]
    table (or plugin.<field> dotted keys) is read as the same keys."""
    from fedmask.config import load
    from fedmask.sweep import parse_grid, plan

    path = tmp_path / "c.toml"
    path.write_text(f'method = "{NAME}"\n[plugin]\nserver-lr = 0.3\n')
    assert load(path)["plugin.server-lr"] == 0.3
    grid = parse_grid(["plugin.server-lr=0.05,0.2"])
    runs = plan(path, [0], grid, [], tmp_path / "out")
    assert [r.setting for r in runs] == ["plugin.server-lr=0.05", "plugin.server-lr=0.2"]
    assert load(path, list(runs[1].sets))["plugin.server-lr"] == 0.2
