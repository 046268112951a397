"""FedPM under SecAgg+: the server learns only sums, and the result equals plain FedPM."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from clients.client_app import app as plain_app
from clients.secure_client_app import app as secure_app
from engines.inprocess import InProcessGrid
from fedmask.config import ConfigError, resolve
from fedmask.methods.fedpm import FedPMAggregator
from server.secure import SecureFedPM
from server.server_app import run_server

SMALL = {"num-clients": 4, "clients-per-round": 4, "num-rounds": 2}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("secure")
    secure = resolve({**SMALL, "secure-aggregation": True})
    plain = resolve({**SMALL, "uplink-codec": "entropy"})  # each client's own sample, coded exactly
    run_server(InProcessGrid(secure_app, 4), secure, base / "secure")
    run_server(InProcessGrid(plain_app, 4), plain, base / "plain")
    return base / "secure", base / "plain"


def test_secure_global_state_equals_plain_aggregation_bit_for_bit(runs):
    secure, plain = runs
    with np.load(secure / "final_state.npz") as a, np.load(plain / "checkpoint.npz") as b:
        assert len(a.files) == 6
        for name in a.files:
            assert np.array_equal(a[name], b[f"state/{name}"]), name
    assert [r["accuracy"] for r in _rows(secure)] == [r["accuracy"] for r in _rows(plain)]
    assert json.loads((secure / "summary.json").read_text())["uplink_codec"] == "secagg+"


def test_ledger_shows_what_secure_aggregation_costs(runs):
    """SecAgg+ ships masked fixed-point vectors and key shares: far more than a coded mask."""
    secure, plain = _rows(runs[0]), _rows(runs[1])
    for s, p in zip(secure, plain):
        assert s["clients"] == 4 and s["failures"] == 0
        assert s["uplink_payload_bytes"] > 20 * p["uplink_payload_bytes"]
        assert s["uplink_bpp"] > 32  # the protocol's modular integers, per parameter
        assert s["uplink_message_bytes"] >= s["uplink_payload_bytes"]


@pytest.mark.parametrize("clash", [{"method": "edge-popup"}, {"attack": "invert", "attack-fraction": 0.2},
                                   {"fault-drop-rate": 0.1}, {"downlink-codec": "float16"},
                                   {"clients-per-round": 2}])
def test_unsupported_combinations_are_refused_by_name(clash):
    with pytest.raises(ConfigError, match="secure-aggregation"):
        resolve({**SMALL, "secure-aggregation": True, **clash})


class _JoiningClientManager:
    """Nodes 1001.. that register one by one: ``wait_for(n)`` lets up to n of the ``joining``
    nodes in (as Flower's registration thread would) and says whether n are there."""

    def __init__(self, joining: int):
        self.joining, self.available, self.asked = joining, 1, []

    def wait_for(self, num_clients: int, timeout: int) -> bool:
        self.asked.append((num_clients, timeout))
        self.available = max(self.available, min(num_clients, self.joining))
        return self.available >= num_clients

    def num_available(self) -> int:
        return self.available

    def all(self) -> dict:
        return {str(n): SimpleNamespace(node_id=n) for n in range(1001, 1001 + self.available)}


def _secure_strategy() -> SecureFedPM:
    config = resolve({**SMALL, "secure-aggregation": True})
    return SecureFedPM(config, {"w": np.zeros(3, dtype=np.float32)}, FedPMAggregator.from_config(config),
                       lambda *args: (0.0, 0.0))


def test_secure_configure_fit_waits_for_every_node_and_sends_each_partition_to_its_own():
    """configure_fit asks the client manager for num-clients nodes (bounded wait), so the
    round's partitions go to distinct nodes even when only one node had joined so far."""
    strategy, manager = _secure_strategy(), _JoiningClientManager(joining=4)
    instructions = strategy.configure_fit(1, None, manager)
    (needed, timeout), *_ = manager.asked
    assert needed == 4 and 0 < timeout <= 600
    nodes = [proxy.node_id for proxy, _ in instructions]
    pids = [fit.config["partition-id"] for _, fit in instructions]
    assert sorted(pids) == [0, 1, 2, 3] and len(set(nodes)) == 4


def test_secure_configure_fit_refuses_to_start_without_every_node():
    """With fewer nodes than num-clients after the wait, the round fails and says so."""
    with pytest.raises(RuntimeError, match=r"2 of num-clients=4"):
        _secure_strategy().configure_fit(1, None, _JoiningClientManager(joining=2))
