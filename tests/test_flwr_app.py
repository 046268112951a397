"""The Flower app as ``flwr run .`` sees it: the run-config table, node placement, the app entry."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedmask import flwr_config
from fedmask.config import SCHEMA, read_toml
from fedmask.protocol.placement import PlacementError, held_partition, node_info, place

ROOT = Path(__file__).resolve().parents[1]


def _app_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_declares_every_key_with_the_quickstart_values():
    """flwr refuses --run-config keys the table does not declare: it must hold every schema key,
    the default where the quickstart says nothing, the quickstart's value where it does."""
    table = _app_table()
    assert list(table) == list(SCHEMA)
    quickstart = read_toml(ROOT / "configs" / "quickstart.toml")
    for key, setting in SCHEMA.items():
        expected = quickstart.get(key, setting.default)
        assert table[key] == expected and type(table[key]) is type(expected), key
    assert table == flwr_config.app_config()


def test_pyproject_table_is_up_to_date_and_has_no_legacy_federations():
    """`python -m fedmask.flwr_config --check` passes; no [tool.flwr.federations] (flwr 1.41 would
    rewrite pyproject.toml to migrate it)."""
    assert flwr_config.main(["--check"]) == 0
    assert "federations" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]


def test_table_generation_replaces_only_its_table(tmp_path):
    text = "[a]\nx = 1\n\n[tool.flwr.app.config]\nold = 1\n\n# next\n[b]\ny = 2\n"
    out = flwr_config.with_table(text, flwr_config.render_table({"k": 0.5, "s": "", "t": True}))
    assert tomllib.loads(out) == {"a": {"x": 1}, "tool": {"flwr": {"app": {"config": {"k": 0.5, "s": "", "t": True}}}},
                                  "b": {"y": 2}}
    assert "# next\n[b]" in out
    appended = flwr_config.with_table("[a]\nx = 1\n", flwr_config.render_table({"k": 1}))
    assert tomllib.loads(appended)["tool"]["flwr"]["app"]["config"] == {"k": 1}


def test_run_config_overrides_parse_as_flower_parses_them():
    """`--run-config "density=0.3 seed=4"` gives typed values the config accepts for every kind of key."""
    from flwr.common.config import fuse_dicts, parse_config_args

    from fedmask.config import resolve

    overrides = parse_config_args(["density=0.3 seed=4 secure-aggregation=false method='edge-popup' lr=1"])
    config = resolve(fuse_dicts(_app_table(), overrides))
    assert (config.density, config.seed, config.method, config.lr) == (0.3, 4, "edge-popup", 1.0)


# ---------------------------------------------------------------- placement


def test_node_info_and_held_partition():
    assert node_info({"partition-id": 2, "num-partitions": 4, "other": "x"}) == {"partition-id": 2, "num-partitions": 4}
    assert node_info({"partition-id": True}) == {}
    assert held_partition({"partition-id": 2, "num-partitions": 4}, 4) == 2
    assert held_partition({"partition-id": 2, "num-partitions": 10}, 4) is None  # made for another run
    assert held_partition({"partition-id": 4, "num-partitions": 4}, 4) is None
    assert held_partition({}, 4) is None


def test_place_gives_held_partitions_to_their_holders_and_the_rest_round_robin():
    infos = {30: {"partition-id": 0, "num-partitions": 4}, 10: {"partition-id": 3, "num-partitions": 4},
             20: None, 40: {}}
    assert place(infos, 4) == {0: 30, 3: 10, 1: 20, 2: 40}
    assert place({5: None, 6: None}, 3) == {0: 5, 1: 6, 2: 5}  # no node configs: by index, as before


def test_place_refuses_partitions_nobody_can_train():
    infos = {1: {"partition-id": 0, "num-partitions": 3}, 2: {"partition-id": 0, "num-partitions": 3}}
    with pytest.raises(PlacementError, match=r"partition\(s\) 1, 2 of num-clients=3"):
        place(infos, 3)
