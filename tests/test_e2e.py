"""End-to-end runs: real Flower messages through the in-process grid, and one through Ray."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message

from clients.client_app import app as real_client_app
from engines.inprocess import InProcessGrid
from fedmask import cli
from fedmask.config import resolve
from fedmask.wire.masks import HEADER_BYTES
from server.server_app import run_server

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"num-clients": 3, "clients-per-round": 3, "num-rounds": 2, "dataset": "digits", "model": "mlp"}
MLP_PARAMS = 85_002  # 64*256+256 + 256*256+256 + 256*10+10
TIMING_KEYS = {"elapsed_s"}


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def _run_inprocess(tmp_path: Path, name: str, client_app=real_client_app, **overrides) -> Path:
    config = resolve({**SMALL, **overrides})
    run_dir = tmp_path / name
    run_server(InProcessGrid(client_app, config.num_clients), config, run_dir)
    return run_dir


@pytest.mark.parametrize(
    "method, up_per_client",
    [("fedpm", HEADER_BYTES + math.ceil(MLP_PARAMS / 8)),
     ("edge-popup", HEADER_BYTES + math.ceil(MLP_PARAMS / 8)),
     ("fedavg", 4 * MLP_PARAMS)],
)
def test_run_writes_rounds_with_measured_bytes(tmp_path, method, up_per_client):
    """Each round line has the documented fields and the bytes of what was really sent."""
    overrides = {"optimizer": "sgd", "lr": 0.05} if method == "fedavg" else {"uplink-codec": "packbits"}
    # the float32 broadcast, whose size is known (the lossless one is tested in test_broadcast.py)
    run_dir = _run_inprocess(tmp_path, method, method=method, **overrides, **{"downlink-codec": "float32"})
    rows = _rounds(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("accuracy", "loss", "clients", "failures", "num_params", "uplink_payload_bytes",
                    "uplink_message_bytes", "downlink_payload_bytes", "downlink_message_bytes",
                    "uplink_bpp", "elapsed_s"):
            assert key in row, key
        assert row["num_params"] == MLP_PARAMS
        assert row["clients"] == 3 and row["failures"] == 0
        assert row["uplink_payload_bytes"] == 3 * up_per_client
        assert row["downlink_payload_bytes"] == 3 * 4 * MLP_PARAMS
        assert row["uplink_message_bytes"] > row["uplink_payload_bytes"]
        assert row["downlink_message_bytes"] > row["downlink_payload_bytes"]
        assert row["uplink_bpp"] == pytest.approx(8 * up_per_client / MLP_PARAMS)
        assert 0.0 <= row["accuracy"] <= 1.0 and np.isfinite(row["loss"])
        assert len(row["per_client"]) == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert (run_dir / "config.toml").exists() and (run_dir / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("method", ["fedpm", "edge-popup"])
def test_entropy_uplink_is_smaller_than_packed_and_reports_code_lengths(tmp_path, method):
    """Entropy-coded uploads beat packed bits after round 1, close to their ideal length."""
    packed = _rounds(_run_inprocess(tmp_path, "p", method=method, **{"uplink-codec": "packbits"}))
    coded = _rounds(_run_inprocess(tmp_path, "e", method=method, **{"uplink-codec": "entropy"}))
    assert [r["accuracy"] for r in packed] == [r["accuracy"] for r in coded]  # lossless: same training
    last = coded[-1]
    assert last["uplink_payload_bytes"] < packed[-1]["uplink_payload_bytes"]
    assert last["uplink_ideal_bpp"] <= last["uplink_bpp"] <= last["uplink_ideal_bpp"] * 1.05 + 0.01
    assert last["uplink_formula_bpp"] > 0


def test_mask_uploads_are_below_one_and_a_bit_bits_per_param(tmp_path):
    """A mask upload is ~1 bpp, 32x smaller than the dense FedAvg upload."""
    masks = _rounds(_run_inprocess(tmp_path, "fedpm", method="fedpm", **{"uplink-codec": "packbits"}))[0]
    dense = _rounds(_run_inprocess(tmp_path, "fedavg", method="fedavg", optimizer="sgd", lr=0.05))[0]
    assert masks["uplink_bpp"] < 1.01
    assert dense["uplink_payload_bytes"] / masks["uplink_payload_bytes"] > 31


def test_same_seed_same_numbers(tmp_path):
    """Two runs with one config and seed give identical rounds (timings aside)."""
    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]

    a = strip(_rounds(_run_inprocess(tmp_path, "a", method="fedpm", **{"eval-mask": "sample"})))
    b = strip(_rounds(_run_inprocess(tmp_path, "b", method="fedpm", **{"eval-mask": "sample"})))
    c = strip(_rounds(_run_inprocess(tmp_path, "c", method="fedpm", seed=1, **{"eval-mask": "sample"})))
    assert a == b
    assert a != c


def test_same_seed_same_rounds_whatever_the_node_ids(tmp_path):
    """Two runs with one seed, on nodes with other ids (1001.. and 2**40..: other varint
    widths), write the same rounds.jsonl, message byte counts included; only timings and
    the node ids themselves differ."""
    config = resolve({**SMALL, "method": "fedpm"})
    for name, first in (("low", 1001), ("high", 2**40 + 3)):
        run_server(InProcessGrid(real_client_app, config.num_clients, first_node_id=first),
                   config, tmp_path / name)

    def strip(rows):
        out = []
        for row in rows:
            row = {k: v for k, v in row.items() if k not in TIMING_KEYS}
            row["per_client"] = [{k: v for k, v in c.items() if k != "node_id"} for c in row["per_client"]]
            out.append(row)
        return out

    low, high = _rounds(tmp_path / "low"), _rounds(tmp_path / "high")
    assert {c["node_id"] for c in low[0]["per_client"]} != {c["node_id"] for c in high[0]["per_client"]}
    assert all(r["downlink_message_bytes"] > 0 and r["failures"] == 0 for r in low)
    assert strip(low) == strip(high)


def test_quickstart_learns_on_digits(tmp_path):
    """The quickstart config passes 90% test accuracy on digits (in-process, same rounds)."""
    assert cli.main(["run", str(ROOT / "configs/quickstart.toml"), "--engine", "inprocess",
                     "--out", str(tmp_path / "q")]) == 0
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["final_accuracy"] > 0.90


def _corrupting_client(bad_partition: int):
    """The real ClientApp, except one partition's upload gets a flipped payload bit."""
    def client(message: Message, context: Context) -> Message:
        reply = real_client_app(message, context)
        if int(message.content["config"]["partition-id"]) == bad_partition:
            blob = reply.content["arrays"]["mask"].numpy().copy()
            blob[-1] ^= 0x01
            reply.content["arrays"] = ArrayRecord({"mask": Array(blob)})
        return reply
    return client


def test_corrupt_upload_is_rejected_and_round_goes_on(tmp_path):
    """A corrupted mask is refused with its reason; the other clients still count."""
    rows = _rounds(_run_inprocess(tmp_path, "bad", _corrupting_client(1), method="fedpm"))
    assert rows  # entropy-coded (the default): the CRC covers the coded stream too
    for row in rows:
        assert row["failures"] == 1 and row["clients"] == 2
        (failure,) = row["failure_details"]
        assert failure["partition_id"] == 1 and "crc32" in failure["reason"]
        assert np.isfinite(row["accuracy"])


def test_crashing_clients_leave_state_unchanged(tmp_path):
    """When every client raises, the round is recorded as failed and the model is kept."""
    def crash(message: Message, context: Context) -> Message:
        raise RuntimeError("boom")

    rows = _rounds(_run_inprocess(tmp_path, "crash", crash, method="fedpm", **{"eval-mask": "threshold"}))
    assert all(r["failures"] == 3 and r["clients"] == 0 for r in rows)
    assert all("boom" in f["reason"] for r in rows for f in r["failure_details"])
    assert rows[0]["accuracy"] == rows[1]["accuracy"]  # nothing aggregated, nothing changed


def test_plugin_strategy_from_readme(tmp_path, monkeypatch):
    """The README's plug-in example runs by name and its rule sets the broadcast state."""
    monkeypatch.chdir(ROOT)
    rows = _rounds(_run_inprocess(tmp_path, "plugin", method="examples.mean_vote:MeanVote"))
    assert len(rows) == 2 and rows[-1]["clients"] == 3


def test_bad_config_exits_2_before_ray(tmp_path, capsys):
    """An unknown key stops the CLI with exit code 2 and names the key."""
    bad = tmp_path / "bad.toml"
    bad.write_text('method = "fedpm"\nnum-round = 3\n')
    assert cli.main(["run", str(bad), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert "num-round" in err and "num-rounds" in err
    assert not (tmp_path / "never").exists()


@pytest.mark.ray
def test_ray_simulation_end_to_end(tmp_path):
    """The real thing: `fedmask run` through Flower's Ray simulation engine."""
    out = tmp_path / "ray"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "fedmask.cli", "run", str(ROOT / "configs/quickstart.toml"),
         "--set", "num-rounds=2", "--set", "num-clients=2", "--set", "clients-per-round=2", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rounds(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] == 2 and r["failures"] == 0 for r in rows)
    assert 0 < rows[-1]["uplink_payload_bytes"] <= 2 * (HEADER_BYTES + math.ceil(MLP_PARAMS / 8) + 64)

    # Same config and seed through the in-process grid: the same numbers and masks. Only
    # timings and what depends on node ids (random under Ray) may differ.
    from fedmask.config import load

    config = load(ROOT / "configs/quickstart.toml", ["num-rounds=2", "num-clients=2", "clients-per-round=2"])
    run_server(InProcessGrid(real_client_app, 2), config, tmp_path / "inprocess")
    assert _comparable(_rounds(tmp_path / "inprocess")) == _comparable(rows)


def _comparable(rows: list[dict]) -> list[dict]:
    def keep(key: str) -> bool:
        return key not in TIMING_KEYS and "message" not in key and key not in ("per_client", "node_id")

    return [{k: v for k, v in r.items() if keep(k)} for r in rows]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on a lent GPU machine)")
def test_gpu_party_regenerates_same_weights_and_trains(tmp_path):
    """A CUDA party draws the same frozen weights as a CPU party and trains there."""
    from fedmask.core.masking import frozen_weights, to_masked
    from fedmask.core.models import build_model
    from fedmask.methods.fedpm import Bernoulli

    cpu = to_masked(build_model("mlp", (1, 8, 8), 10), Bernoulli(), seed=5)
    gpu = to_masked(build_model("mlp", (1, 8, 8), 10), Bernoulli(), seed=5).cuda()
    for name, value in frozen_weights(cpu).items():
        assert torch.equal(value, frozen_weights(gpu)[name].cpu()), name
    rows = _rounds(_run_inprocess(tmp_path, "gpu", method="fedpm", device="cuda"))
    assert rows[-1]["clients"] == 3
