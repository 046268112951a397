"""Tests for the dense baselines' compressed downlink, ``downlink-codec = "ef-qsgd"``: the
round's update QSGD-quantized with server error feedback (DoubleSqueeze's server half,
:class:`fedmask.methods.dense.SqueezedDownlink`), sent per node as steps of the lossless
downlink (:mod:`fedmask.downlink`). Every node trains from the server's own state bit for
bit, nodes that missed rounds catch up, the bytes are a fraction of float32's, nothing the
quantizer drops is lost, and a resumed run goes on as the uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clients.client_app import app as real_client_app
from engines.inprocess import InProcessGrid
from fedmask import cli
from fedmask.config import resolve
from fedmask.methods.dense import SqueezedDownlink, apply_update, dense_fingerprint, downlink_levels
from fedmask.record.checkpoint import RESIDUAL_PREFIX, Checkpoint
from fedmask.wire.frame import Layout
from fedmask.wire.lossless import FRAME, envelope
from fedmask.wire.updates import compress, qsgd_quantize
from server.server_app import run_server
from server.strategies import SeededFedAvg
from tests.test_broadcast import killed_after_round_two

SMALL = {"dataset": "digits", "model": "mlp", "num-clients": 5, "clients-per-round": 2, "num-rounds": 5,
         "optimizer": "sgd", "lr": 0.05, "local-epochs": 1, "batch-size": 32, "method": "fedavg"}
LAYOUT = Layout((("a.weight", (40, 50)), ("b.bias", (7,))))


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def _run(tmp_path: Path, name: str, client_app=real_client_app, **overrides):
    config = resolve({**SMALL, **overrides})
    grid = InProcessGrid(client_app, config.num_clients)
    run_server(grid, config, tmp_path / name)
    return _rounds(tmp_path / name), grid, config


# ---------------------------------------------------------------- the server's squeeze


def test_squeezed_updates_add_up_to_the_true_ones_less_the_residual():
    """Error feedback accounts for everything: after T rounds of the same true update u the
    updates sent sum to T u minus the residual the server still holds, so their mean is u to
    within residual / T. The residual stays bounded even where QSGD's variance exceeds the
    update's norm (2,000 entries, 7 levels: unshrunk, the residual fed back grows ~100x a
    round: 1e7 x ||u|| after 300 rounds)."""
    rng = np.random.default_rng(0)
    true = {name: rng.normal(size=shape).astype(np.float32) for name, shape in LAYOUT.shapes}
    squeeze = SqueezedDownlink(levels=7, seed=3)
    state = {name: np.zeros(shape, np.float32) for name, shape in LAYOUT.shapes}
    sent_sum = {name: np.zeros(shape) for name, shape in LAYOUT.shapes}
    rounds, growth = 300, []
    for server_round in range(1, rounds + 1):
        target = {name: state[name] + true[name] for name in state}  # what the clients' average would be
        sent = squeeze.step(server_round, state, target, LAYOUT)
        assert all(np.unique(v).size <= 15 for v in sent.values())  # 2 * levels + 1 values per tensor
        state = apply_update(state, sent)
        for name in sent_sum:
            sent_sum[name] += sent[name]
        growth.append(np.linalg.norm(squeeze.residual["a.weight"]) / np.linalg.norm(true["a.weight"]))
    for name, u in true.items():
        residual = squeeze.residual[name].astype(np.float64)
        # float32 state arithmetic over 300 rounds: a few ulps of |T u| ~ 1000
        np.testing.assert_allclose(sent_sum[name] + residual, rounds * u.astype(np.float64), rtol=1e-4, atol=0.05)
        assert np.abs(sent_sum[name] / rounds - u).max() <= np.abs(residual).max() / rounds + 1e-4
    assert max(growth) < 10 and growth[-1] < 1.5 * growth[rounds // 2], (growth[rounds // 2], growth[-1])


def test_the_downlink_quantizer_is_the_uplinks_qsgd_seeded_by_the_round():
    """One quantizer: the downlink's values are what a ``qsgd`` upload with the same draws
    decodes to; the server's squeeze is a function of (seed, round) alone."""
    rng = np.random.default_rng(1)
    update = {name: rng.normal(size=shape).astype(np.float32) for name, shape in LAYOUT.shapes}
    blob, decoded = compress(update, LAYOUT, b"12345678", "qsgd", np.random.default_rng(9), 127)
    quantized = qsgd_quantize(update, LAYOUT, 127, np.random.default_rng(9))
    assert all(np.array_equal(decoded[name], quantized[name]) for name in update)
    state = {name: np.zeros(shape, np.float32) for name, shape in LAYOUT.shapes}
    first = SqueezedDownlink(127, seed=5).step(4, state, update, LAYOUT)
    again = SqueezedDownlink(127, seed=5).step(4, state, update, LAYOUT)
    other_round = SqueezedDownlink(127, seed=5).step(5, state, update, LAYOUT)
    assert all(np.array_equal(first[n], again[n]) for n in first)
    assert not all(np.array_equal(first[n], other_round[n]) for n in first)
    assert downlink_levels(8) == 127 and downlink_levels(2) == 1


# ---------------------------------------------------------------- end to end, real messages


@pytest.mark.parametrize("method", ["fedavg", "qsgd"])
def test_every_node_trains_from_the_servers_state_and_nodes_that_missed_rounds_catch_up(tmp_path, monkeypatch,
                                                                                       method):
    """2 of 5 clients a round: each node, whatever rounds it missed, decodes the server's own
    state bit for bit (the state the server evaluates and checkpoints), from the steps since
    the state it holds, or from the seed's weights, which it regenerates."""
    server_states: dict[int, dict[str, np.ndarray]] = {}
    blobs: dict[int, dict[int, np.ndarray]] = {}
    original = SeededFedAvg.train_messages

    def recording(self, server_round, grid):
        messages = original(self, server_round, grid)
        server_states[server_round] = {k: v.copy() for k, v in self.state.items()}
        blobs[server_round] = {m.metadata.dst_node_id: m.content["arrays"]["lossless"].numpy() for m in messages}
        return messages

    monkeypatch.setattr(SeededFedAvg, "train_messages", recording)
    held: dict[tuple[int, int], tuple[int, dict[str, np.ndarray]]] = {}

    def app(message, context):
        reply = real_client_app(message, context)
        server_round = int(message.content["config"]["server-round"])
        version = int(context.state["downlink-held-meta"]["version"])
        held[server_round, context.node_id] = (version, {k: a.numpy().copy()
                                                         for k, a in context.state["downlink-held"].items()})
        return reply

    rows, _, config = _run(tmp_path, "ef", client_app=app, method=method, **{"downlink-codec": "ef-qsgd"})
    assert [r["failures"] for r in rows] == [0] * 5 and [r["clients"] for r in rows] == [2] * 5
    assert len(held) == 10
    for (server_round, node), (version, state) in held.items():
        expected = server_states[server_round]
        assert version == server_round - 1
        assert sorted(state) == sorted(expected)
        for name, value in expected.items():
            assert state[name].dtype == value.dtype and np.array_equal(state[name], value), (server_round, node)
    final = Checkpoint.load(tmp_path / "ef").state
    layout = Layout.from_arrays(final)
    fingerprint = dense_fingerprint(layout, config.seed, config.model)
    bases = {(r, node): envelope(blob, fingerprint).base for r, sent in blobs.items() for node, blob in sent.items()}
    steps = {(r, node): envelope(blob, fingerprint).steps for r, sent in blobs.items() for node, blob in sent.items()}
    assert all(base is not None and steps[key] == key[0] - 1 - base[0] for key, base in bases.items())
    # caught up: a node that missed rounds got every step since the state it held; one that
    # never took part, every step since the seed's weights
    assert any(0 < base[0] < r - 2 for (r, _), base in bases.items() if base is not None)
    assert any(base[0] == 0 and r > 2 for (r, _), base in bases.items() if base is not None)
    assert all(kinds == {"replay": 2} for kinds in (r["downlink_kinds"] for r in rows))


def test_ef_qsgd_downlink_costs_a_fraction_of_float32s(tmp_path):
    """Measured from rounds.jsonl: the same uploads, a downlink under an eighth of float32's
    (round 1 sends a header: every node regenerates the seed's weights)."""
    options = {"clients-per-round": 5, "num-rounds": 3}
    f32, _, _ = _run(tmp_path, "f32", **options, **{"downlink-codec": "float32"})
    ef, _, _ = _run(tmp_path, "ef", **options, **{"downlink-codec": "ef-qsgd"})
    assert ef[0]["uplink_payload_bytes"] == f32[0]["uplink_payload_bytes"]
    assert ef[0]["downlink_payload_bytes"] == 5 * FRAME.size
    down_f32 = sum(r["downlink_payload_bytes"] for r in f32)
    down_ef = sum(r["downlink_payload_bytes"] for r in ef)
    assert 0 < down_ef < down_f32 / 8, (down_ef, down_f32)
    assert all(0 < r["downlink_bpp"] < 4 for r in ef[1:])


def test_resumed_ef_qsgd_run_equals_the_uninterrupted_one(tmp_path):
    """The checkpoint keeps the server's residual: a run stopped after round 2 and resumed
    ends in the uninterrupted run's state bit for bit. Its nodes' states are not known after
    the stop, so its first round sends the float32 state, then steps again."""
    overrides = {"num-rounds": 4, "clients-per-round": 3, "downlink-codec": "ef-qsgd"}
    whole, _, config = _run(tmp_path, "whole", **overrides)
    run_dir = tmp_path / "resumed"
    killed_after_round_two(config, run_dir)
    assert any(k.startswith(RESIDUAL_PREFIX) for k in Checkpoint.load(run_dir).aggregator)
    run_server(InProcessGrid(real_client_app, config.num_clients), config, run_dir, resume=True)
    rows = _rounds(run_dir)
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in whole]
    assert [r["loss"] for r in rows] == [r["loss"] for r in whole]
    end, resumed_end = Checkpoint.load(tmp_path / "whole").state, Checkpoint.load(run_dir).state
    assert all(np.array_equal(end[name], resumed_end[name]) for name in end)
    assert rows[2]["downlink_kinds"] == {"full": 3} and all(r["failures"] == 0 for r in rows)
    assert "replay" in rows[3]["downlink_kinds"]


def test_resume_refuses_a_checkpoint_without_the_residual(tmp_path, capsys):
    """A checkpoint whose residual is gone (hand-edited) would resume into another run:
    ``--resume`` refuses it in one line, exit 2."""
    _run(tmp_path, "run", **{"num-rounds": 3, "downlink-codec": "ef-qsgd"})
    run_dir = tmp_path / "run"
    checkpoint = Checkpoint.load(run_dir)
    lines = (run_dir / "rounds.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "rounds.jsonl").write_text("".join(lines[:2]))
    (run_dir / "summary.json").unlink()
    Checkpoint(2, checkpoint.state, {}, checkpoint.records, checkpoint.config_digest).save(run_dir)
    assert cli.main(["run", "--resume", str(run_dir), "--engine", "inprocess"]) == 2
    err = capsys.readouterr().err.strip()
    assert "residual" in err and len(err.splitlines()) == 1, err


def test_ef_qsgd_with_a_mask_method_is_a_config_error(tmp_path, capsys):
    """Mask states go exactly ('lossless'); 'ef-qsgd' is for the dense baselines: one line naming the key, exit 2."""
    code = cli.main(["run", "configs/quickstart.toml", "--set", 'downlink-codec="ef-qsgd"', "--out",
                     str(tmp_path / "out"), "--engine", "inprocess"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "downlink-codec" in err and "ef-qsgd" in err and "fedpm" in err, err
    assert not (tmp_path / "out").exists()
    resolve({**SMALL, "method": "topk-ef", "downlink-codec": "ef-qsgd"})  # every dense baseline takes it
