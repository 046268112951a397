"""LaPerm: rewiring, the multiset invariant, the Borda merge, the rank codec, end to end."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.client_app import app as real_client_app
from engines.inprocess import InProcessGrid
from fedmask import task
from fedmask.config import ConfigError, resolve
from fedmask.core.masking import frozen_weights, get_scores, to_masked
from fedmask.core.models import build_model
from fedmask.methods import laperm
from fedmask.methods.laperm import LaPerm
from fedmask.record.checkpoint import Checkpoint
from fedmask.wire import ranks as rank_codec
from fedmask.wire.frame import Layout, WireError
from server.server_app import run_server

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"method": "laperm", "init": "kaiming-uniform", "num-clients": 3, "clients-per-round": 3,
         "num-rounds": 2, "dataset": "digits", "model": "mlp", "downlink-codec": "float32"}


def _sorted_rows(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: laperm.sorted_rows(np.asarray(v)) for k, v in values.items()}


def _seed_rows(model) -> dict[str, np.ndarray]:
    return _sorted_rows({k: v.numpy() for k, v in frozen_weights(model).items()})


def test_rewire_assigns_sorted_values_in_shadow_rank_order():
    """Hand example: shadow row [0.5, -2.0, 0.1] ranks [2, 0, 1], so seed values {3, 1, 2}
    (sorted 1, 2, 3) are placed as [3, 1, 2]; each row of a 2-D weight separately."""
    module = laperm.Rewired(torch.tensor([[1.0, 2.0, 3.0], [30.0, 10.0, 20.0]]))
    with torch.no_grad():
        module.scores.copy_(torch.tensor([[0.5, -2.0, 0.1], [0.0, 1.0, -1.0]]))
    module.rewire()
    assert module.scores.tolist() == [[3.0, 1.0, 2.0], [20.0, 30.0, 10.0]]
    assert laperm.ranks_of(module.scores.detach().numpy()).tolist() == [[2, 0, 1], [1, 2, 0]]


def test_local_training_keeps_every_rows_multiset_and_changes_the_arrangement():
    """After LaPerm training (sync period 7, not a divisor of the steps, plus the final
    rewire) every row's sorted values equal the seed's exactly, and weights moved."""
    config = resolve({**SMALL, "laperm-sync": 7})
    splits = task.splits_of(config)
    mode = task.mode_of(config, "laperm")
    model = task.make_model(config, splits, mode)
    seed_rows, before = _seed_rows(model), laperm.arrangement(model)
    task.train(model, splits.x_train[:300], splits.y_train[:300], config, torch.device("cpu"), seed=1, mode=mode)
    after = laperm.arrangement(model)
    for name, values in _sorted_rows(get_scores(model)).items():
        assert np.array_equal(values, seed_rows[name]), name
    assert any(not np.array_equal(before[n], after[n]) for n in before)


def test_borda_merge_hand_example_with_tie_broken_by_previous_rank():
    """Ranks [0,1,2,3] and [1,0,3,2] sum to [1,1,5,5]: two ties, each kept in the previous
    order (previous ranks [3,2,1,0] put position 1 before 0 and 3 before 2)."""
    state = {"w": np.array([3, 2, 1, 0], dtype=np.float32)}
    uploads = [{"w": np.array([0, 1, 2, 3])}, {"w": np.array([1, 0, 3, 2])}]
    assert laperm.borda_merge(state, uploads)["w"].tolist() == [1, 0, 3, 2]


def test_borda_merge_is_deterministic_and_independent_of_arrival_order():
    rng = np.random.default_rng(0)
    shape = (5, 40)
    state = {"w": laperm.ranks_of(rng.random(shape)).astype(np.float32),
             "b": laperm.ranks_of(rng.random(5)).astype(np.float32)}
    uploads = [{"w": laperm.ranks_of(rng.random(shape)), "b": laperm.ranks_of(rng.random(5))} for _ in range(4)]
    first = laperm.borda_merge(state, uploads)
    for order in itertools.permutations(uploads):
        merged = laperm.borda_merge(state, list(order))
        assert all(np.array_equal(merged[k], first[k]) for k in first)
    assert all(rank_codec.is_permutation(v.astype(np.int64)) for v in first.values())


def _layout_and_ranks(seed: int = 0):
    rng = np.random.default_rng(seed)
    prior = {"a.weight": laperm.ranks_of(rng.random((6, 50))), "a.bias": laperm.ranks_of(rng.random(6))}
    client = {}
    for name, ranks in prior.items():  # a few small displacements: swap neighbours in each row
        rows = ranks.reshape(rank_codec.row_shape(ranks.shape)).copy()
        for row in rows:
            i, j = np.flatnonzero(row == 0)[0], np.flatnonzero(row == 1)[0]
            row[i], row[j] = row[j], row[i]
        client[name] = rows.reshape(ranks.shape)
    layout = Layout.from_arrays(prior)
    return layout, layout.fingerprint(0, "test", "kaiming-uniform"), prior, client


@pytest.mark.parametrize("codec", ["entropy", "packbits"])
def test_rank_upload_round_trips(codec):
    layout, fingerprint, prior, client = _layout_and_ranks()
    blob = rank_codec.encode_ranks(client, layout, fingerprint, codec, prior)
    decoded = rank_codec.decode_ranks(blob, layout, fingerprint, prior)
    assert all(np.array_equal(decoded[k], client[k]) for k in client)
    packed = rank_codec.max_upload_bytes(layout)
    if codec == "entropy":  # two swaps per row cost far less than 6 bits per rank
        assert blob.size < packed / 2
    else:
        assert blob.size == packed == 28 + 2 * 11 + math.ceil(300 * 6 / 8) + math.ceil(6 * 3 / 8)


@pytest.mark.parametrize("cut", [0, 27, 40, -1])
def test_truncated_rank_upload_is_refused(cut):
    layout, fingerprint, prior, client = _layout_and_ranks()
    blob = rank_codec.encode_ranks(client, layout, fingerprint, "entropy", prior)
    with pytest.raises(WireError, match="length|crc32|section"):
        rank_codec.decode_ranks(blob[:cut], layout, fingerprint, prior)


def test_tampered_rank_uploads_are_refused_naming_the_field():
    layout, fingerprint, prior, client = _layout_and_ranks()
    blob = rank_codec.encode_ranks(client, layout, fingerprint, "entropy", prior)
    flipped = blob.copy()
    flipped[-3] ^= 0x10
    with pytest.raises(WireError, match="crc32"):
        rank_codec.decode_ranks(flipped, layout, fingerprint, prior)
    foreign = blob.copy()
    foreign[rank_codec.FRAME.slice("fingerprint")] = 0
    with pytest.raises(WireError, match="fingerprint"):
        rank_codec.decode_ranks(foreign, layout, fingerprint, prior)
    other_prior = {k: v[..., ::-1].copy() for k, v in prior.items()}  # another broadcast
    with pytest.raises(WireError, match="crc32"):
        rank_codec.decode_ranks(blob, layout, fingerprint, other_prior)
    with pytest.raises(WireError, match="side information"):
        rank_codec.decode_ranks(blob, layout, fingerprint, None)


def test_rank_step_sends_unbiased_rounded_displacements_and_must_match():
    """With laperm-rank-step 4 a displacement of 6 arrives as 4 or 8 (mean 6 over many
    draws); a decoder expecting another step refuses the section."""
    rounded = rank_codec.quantize_displacement(np.full(20_000, 6), 4, np.random.default_rng(0))
    assert set(np.unique(4 * rounded)) == {4, 8}
    assert abs(4 * rounded.mean() - 6) < 0.05
    layout, fingerprint, prior, client = _layout_and_ranks()
    blob = rank_codec.encode_ranks(client, layout, fingerprint, "entropy", prior, step=4, rng=np.random.default_rng(1))
    decoded = rank_codec.decode_ranks(blob, layout, fingerprint, prior, step=4)["a.weight"]  # coded, not packed
    d = decoded - prior["a.weight"]
    assert (d % 4 == 0).all() and (np.abs(d - (client["a.weight"] - prior["a.weight"])) < 4).all()
    with pytest.raises(WireError, match="rank step"):
        rank_codec.decode_ranks(blob, layout, fingerprint, prior, step=1)


def test_ranks_that_are_not_a_permutation_are_refused_even_with_a_valid_crc():
    layout, fingerprint, prior, _ = _layout_and_ranks()
    twice = {k: np.zeros_like(v) for k, v in prior.items()}  # every weight claims rank 0
    blob = rank_codec.encode_ranks(twice, layout, fingerprint, "packbits")
    with pytest.raises(WireError, match="ranks.*permutation"):
        rank_codec.decode_ranks(blob, layout, fingerprint, prior)


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def test_inprocess_run_keeps_multisets_on_the_server_and_measures_rank_uploads(tmp_path):
    """Three rounds through the in-process grid: the server's global arrangement keeps every
    row's seed values, the run learns, and the ledger's uplink bytes are those of rank
    uploads (above the 28-byte header, below bit-packed ranks)."""
    config = resolve({**SMALL, "num-rounds": 3})
    run_server(InProcessGrid(real_client_app, 3), config, tmp_path / "run")
    rows = _rounds(tmp_path / "run")
    assert [r["clients"] for r in rows] == [3, 3, 3] and all(r["failures"] == 0 for r in rows)
    model = to_masked(build_model("mlp", (1, 8, 8), 10), LaPerm(), seed=0, init="kaiming-uniform")
    layout = Layout.from_arrays(get_scores(model))
    for r in rows:
        per_client = r["uplink_payload_bytes"] / 3
        assert rank_codec.HEADER_BYTES < per_client < rank_codec.max_upload_bytes(layout)
        assert r["uplink_ideal_bpp"] <= r["uplink_bpp"]
        assert r["downlink_payload_bytes"] == 3 * 4 * layout.num_params
    assert rows[-1]["accuracy"] > 0.6  # chance is 0.1
    ranks = laperm.state_ranks(Checkpoint.load(tmp_path / "run").state)  # the global state after round 3
    seed_rows = _seed_rows(model)
    for name, value in ranks.items():
        srt = laperm.sorted_rows(frozen_weights(model)[name].numpy())
        assert np.array_equal(laperm.sorted_rows(laperm.arrange(srt, value)), seed_rows[name])


def test_same_seed_same_numbers(tmp_path):
    def strip(rows):
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]

    a = _rounds(_run(tmp_path / "a"))
    b = _rounds(_run(tmp_path / "b"))
    assert strip(a) == strip(b)


def _run(run_dir: Path) -> Path:
    config = resolve(SMALL)
    run_server(InProcessGrid(real_client_app, 3), config, run_dir)
    return run_dir


def test_laperm_keys_are_checked_by_name():
    with pytest.raises(ConfigError, match="laperm-sync"):
        resolve({**SMALL, "laperm-sync": 0})
    with pytest.raises(ConfigError, match="laperm-lr"):
        resolve({**SMALL, "laperm-lr": -1.0})
    with pytest.raises(ConfigError, match="downlink-codec"):
        resolve({**SMALL, "downlink-codec": "quantized"})
    with pytest.raises(ConfigError, match="attack"):
        resolve({**SMALL, "attack": "invert", "attack-fraction": 0.3})


@pytest.mark.ray
def test_laperm_through_ray_matches_inprocess(tmp_path):
    """`fedmask run` with method = laperm through Flower's Ray engine: the same rounds as
    the in-process grid (timings and message ids aside)."""
    out = tmp_path / "ray"
    proc = subprocess.run(
        [sys.executable, "-m", "fedmask.cli", "run", str(ROOT / "configs/digits-laperm.toml"),
         "--set", "num-rounds=2", "--set", "num-clients=2", "--set", "clients-per-round=2", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rounds(out)
    assert [r["clients"] for r in rows] == [2, 2]
    from fedmask.config import load

    config = load(ROOT / "configs/digits-laperm.toml", ["num-rounds=2", "num-clients=2", "clients-per-round=2"])
    run_server(InProcessGrid(real_client_app, 2), config, tmp_path / "inprocess")

    def keep(r):
        return {k: v for k, v in r.items() if k != "elapsed_s" and "message" not in k and k != "per_client"}

    assert [keep(r) for r in _rounds(tmp_path / "inprocess")] == [keep(r) for r in rows]
