"""The compressed dense baselines: SignSGD, EF-SignSGD, QSGD, top-k with error feedback."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.client_app import app as client_app
from engines.inprocess import InProcessGrid
from fedmask.config import resolve
from fedmask.methods.dense import ErrorFeedback, aggregate_updates
from fedmask.wire.frame import Layout, WireError
from fedmask.wire.updates import HEADER_BYTES, compress, decompress
from server.server_app import run_server

LAYOUT = Layout((("a", (7, 5)), ("b", (3,))))
FP = b"\x01\x02\x03\x04\x05\x06\x07\x08"


def update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in LAYOUT.shapes}


@pytest.mark.parametrize("kind", ["sign", "scaled-sign", "qsgd", "topk"])
def test_decoded_upload_equals_what_the_client_computed(kind):
    """decompress(compress(u)) returns exactly the values the client kept as sent (C(p))."""
    blob, sent = compress(update(), LAYOUT, FP, kind, np.random.default_rng(1), levels=4, fraction=0.2)
    got = decompress(blob, LAYOUT, FP, kind, levels=4)
    assert all(np.array_equal(got[k], sent[k]) for k in sent)


def test_sign_is_one_bit_per_parameter_and_exact():
    u = update()
    blob, sent = compress(u, LAYOUT, FP, "sign", np.random.default_rng(0))
    assert blob.size == HEADER_BYTES + math.ceil(35 / 8) + math.ceil(3 / 8)
    assert all(np.array_equal(sent[k], np.where(u[k] >= 0, 1.0, -1.0)) for k in u)


def test_scaled_sign_keeps_the_mean_magnitude():
    u = update()
    _, sent = compress(u, LAYOUT, FP, "scaled-sign", np.random.default_rng(0))
    for k in u:
        assert np.allclose(np.abs(sent[k]), np.abs(u[k]).mean()) and np.array_equal(np.sign(sent[k]), np.sign(u[k]))


def test_qsgd_is_unbiased():
    """The mean of many QSGD draws approaches the update (stochastic rounding is unbiased)."""
    u = update(3)
    draws = [compress(u, LAYOUT, FP, "qsgd", np.random.default_rng(s), levels=2)[1] for s in range(3000)]
    for k in u:
        mean = np.mean([d[k] for d in draws], axis=0)
        norm = np.linalg.norm(u[k])
        assert np.abs(mean - u[k]).max() < 0.06 * norm, k


def test_topk_keeps_the_largest_entries_and_feedback_keeps_the_rest():
    u = update()
    feedback = ErrorFeedback()
    corrected = feedback.add(u)
    _, sent = compress(corrected, LAYOUT, FP, "topk", np.random.default_rng(0), fraction=0.2)
    assert np.count_nonzero(sent["a"]) == 7  # 20% of 35
    kept = np.abs(u["a"]).ravel()[np.flatnonzero(sent["a"].ravel())]
    assert kept.min() >= np.sort(np.abs(u["a"]).ravel())[-7]
    feedback.keep(corrected, sent)
    assert all(np.allclose(feedback.memory[k] + sent[k], u[k]) for k in u)
    again = feedback.add(u)
    assert np.allclose(again["a"], 2 * u["a"] - sent["a"])  # next round: new update plus what was left out


def test_majority_sign_and_mean_aggregation():
    state = {"w": np.zeros(3, dtype=np.float32)}
    ups = [{"w": np.array([1, 1, -1], np.float32)}, {"w": np.array([1, -1, -1], np.float32)},
           {"w": np.array([-1, 1, 1], np.float32)}]
    assert np.allclose(aggregate_updates("sign", state, ups, [1, 1, 1], 0.5)["w"], [0.5, 0.5, -0.5])
    mean = aggregate_updates("qsgd", state, ups, [2, 1, 1], 0.5)["w"]
    assert np.allclose(mean, [(2 + 1 - 1) / 4, (2 - 1 + 1) / 4, (-2 - 1 + 1) / 4])


@pytest.mark.parametrize("kind", ["sign", "scaled-sign", "qsgd", "topk"])
def test_wrong_model_truncation_and_corruption_are_refused_by_field(kind):
    blob, _ = compress(update(), LAYOUT, FP, kind, np.random.default_rng(0), fraction=0.2)
    with pytest.raises(WireError, match="fingerprint"):
        decompress(blob, LAYOUT, b"\x00" * 8, kind)
    with pytest.raises(WireError, match="length|crc32"):
        decompress(blob[:-1], LAYOUT, FP, kind)
    flipped = blob.copy()
    flipped[-1] ^= 1
    with pytest.raises(WireError, match="crc32"):
        decompress(flipped, LAYOUT, FP, kind)
    other = "qsgd" if kind != "qsgd" else "sign"
    with pytest.raises(WireError, match="kind"):
        decompress(blob, LAYOUT, FP, other)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), kind=st.sampled_from(["sign", "scaled-sign", "qsgd", "topk"]))
def test_any_bytes_are_refused_cleanly(data, kind):
    """Arbitrary bytes, with a valid header and CRC or without, decode or raise WireError only."""
    import zlib

    from fedmask.wire.updates import _KIND, FRAME

    sealed = FRAME.struct.pack(b"FMDU", 1, _KIND[kind], 0, FP, LAYOUT.num_params, zlib.crc32(data)) + data
    for raw in (data, sealed):
        try:
            out = decompress(np.frombuffer(raw, dtype=np.uint8), LAYOUT, FP, kind)
        except WireError:
            continue
        assert all(np.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("method", ["signsgd", "ef-signsgd", "qsgd", "topk-ef"])
def test_baselines_run_end_to_end_with_measured_uplink(tmp_path, method):
    """Through the in-process engine on digits: every client aggregated each round; SignSGD's
    uplink is exactly one bit per parameter plus headers; the others cost less than float32."""
    config = resolve({"method": method, "num-clients": 3, "clients-per-round": 3, "num-rounds": 2,
                      "optimizer": "sgd", "lr": 0.05})
    run_server(InProcessGrid(client_app, 3), config, tmp_path / "r")
    rows = [json.loads(line) for line in (tmp_path / "r" / "rounds.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rows] == [3, 3] and all(r["failures"] == 0 for r in rows)
    params = rows[0]["num_params"]
    if method == "signsgd":
        tensors = 6  # the MLP's three Linear layers: weights and biases
        assert rows[0]["uplink_payload_bytes"] <= 3 * (HEADER_BYTES + params // 8 + tensors)
        assert rows[0]["uplink_payload_bytes"] >= 3 * (HEADER_BYTES + params // 8)
    assert all(r["uplink_bpp"] < 32 for r in rows)


def test_error_feedback_memory_lives_in_the_node_context(tmp_path):
    """After a top-k round each node holds its partition's memory (update minus what it sent)."""
    config = resolve({"method": "topk-ef", "num-clients": 2, "clients-per-round": 2, "num-rounds": 1})
    grid = InProcessGrid(client_app, 2)
    run_server(grid, config, tmp_path / "r")
    for context in grid.contexts.values():
        memory = context.state.array_records["error-feedback"]
        owner = context.state.config_records["error-feedback-owner"]["partition-id"]
        assert owner in (0, 1) and any(np.abs(a.numpy()).sum() > 0 for a in memory.values())
