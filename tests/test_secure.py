"""FedPM under SecAgg+: the server learns only sums, and the result equals plain FedPM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clients.client_app import app as plain_app
from clients.secure_client_app import app as secure_app
from fedmask.config import ConfigError, resolve
from server.inprocess_grid import InProcessGrid
from server.server_app import run_server

SMALL = {"num-clients": 4, "clients-per-round": 4, "num-rounds": 2}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("secure")
    secure = resolve({**SMALL, "secure-aggregation": True})
    plain = resolve(SMALL)
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
