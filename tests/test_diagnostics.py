"""Per-round mask diagnostics (issue 14): global flip rate, client drift, FedPM's theta
saturation and entropy, computed by the server while it aggregates and written to every
round line of rounds.jsonl (null where they do not apply)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from clients.client_app import app as real_client_app
from engines.inprocess import InProcessGrid
from fedmask import task
from fedmask.config import resolve
from fedmask.methods.edge_popup import TopK
from fedmask.methods.slot_machines import choices_to_planes
from fedmask.record.diagnostics import DIAGNOSTIC_KEYS
from fedmask.record.ledger import Ledger
from fedmask.record.results import RoundOutcome
from fedmask.task import ModelSpec
from fedmask.wire.frame import Layout
from fedmask.wire.masks import encode_masks
from server import strategies
from server.server_app import run_server
from server.strategies import MaskStrategy, Start

FP = b"diagnose"
LAYOUT = Layout((("a", (2, 3)), ("b", (2,))))  # 8 entries
TINY = {"num-clients": 3, "clients-per-round": 3, "num-rounds": 1, "dataset": "digits", "model": "mlp",
        "downlink-codec": "float32", "uplink-codec": "packbits"}
SMALL = {"num-clients": 4, "clients-per-round": 4, "num-rounds": 2, "dataset": "digits", "model": "mlp"}


def _strategy(overrides: dict, state: dict[str, np.ndarray],
              layout: Layout = LAYOUT) -> tuple[MaskStrategy, list[Message]]:
    """A MaskStrategy over hand-made tensors and its round-1 instructions (the prior of that
    broadcast set, as before a real round)."""
    config = resolve({**TINY, **overrides})
    aggregator = config.method_entry.make_aggregator(config)
    mode = task.mode_of(config, aggregator.mask_mode)
    connections = sum(math.prod(shape[1:] if mode.name == "slots" else shape) for _, shape in layout.shapes)
    spec = ModelSpec(layout, FP, mode.upload_layout(layout), connections)
    strat = MaskStrategy(config, Ledger(), Start(state), aggregator, mode, spec)
    sent = list(strat.configure_train(1, ArrayRecord(), ConfigRecord(),
                                      InProcessGrid(real_client_app, config.num_clients)))
    return strat, sent


def _aggregate(built: tuple[MaskStrategy, list[Message]], uploads: list, junk: int = 0) -> RoundOutcome:
    """Round 1: each upload (bit-packed, against the upload layout) as the reply to one
    instruction; ``junk`` more replies carry an undecodable blob. Returns the round's outcome."""
    strat, sent = built
    replies = []
    for pid, message in enumerate(sent[: len(uploads) + junk]):
        message.metadata.__dict__["_message_id"] = f"m{pid}"
        strat.ledger.sent_to[f"m{pid}"] = (1, message.metadata.dst_node_id, pid)
        if pid < len(uploads):
            masks = uploads[pid]
            if strat.aggregator.mask_mode == "slots":
                masks = choices_to_planes(masks, next(iter(strat.state.values())).shape[0])
            blob = encode_masks(masks, strat.spec.upload, FP, "packbits", bind=(1, pid))
        else:
            blob = np.zeros(5, dtype=np.uint8)
        content = RecordDict({"arrays": ArrayRecord({"mask": Array(blob)}),
                              "metrics": MetricRecord({"num-examples": 10})})
        replies.append(Message(content, reply_to=message))
    strat.aggregate_train(1, replies)
    return strat.outcome(1)


def _bits(*values: int) -> np.ndarray:
    return np.array(values, dtype=bool)


def _h(p: float) -> float:
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def test_fedpm_flip_rate_drift_and_theta_by_hand():
    """FedPM, theta a = [[.9 .2 .6] [.4 .7 .1]], b = [.55 .3]: global mask a = 101 010, b = 10.
    Client 0 uploads it, client 1 differs in 2 entries, client 2 in 6; a fourth reply is junk
    (rejected, so not counted). Drift = (0 + 2 + 6) / (3 * 8) = 1/3, max 6/8. The counts of
    ones are a = 2 2 2 1 2 0, b = 2 1, so theta = k/3 (0 clamped to eps = 0.01): the majority
    mask a = 111 010, b = 10 differs from the old one in one entry of 8 (flip 1/8); one theta
    of 8 is at the clamp; the entropy is (7 H(1/3) + H(0.01)) / 8 bits."""
    theta = {"a": np.array([[0.9, 0.2, 0.6], [0.4, 0.7, 0.1]], dtype=np.float32),
             "b": np.array([0.55, 0.3], dtype=np.float32)}
    built = _strategy({"num-clients": 4, "clients-per-round": 4}, theta)
    uploads = [
        {"a": _bits(1, 0, 1, 0, 1, 0).reshape(2, 3), "b": _bits(1, 0)},
        {"a": _bits(1, 1, 1, 0, 1, 0).reshape(2, 3), "b": _bits(1, 1)},
        {"a": _bits(0, 1, 0, 1, 0, 0).reshape(2, 3), "b": _bits(0, 0)},
    ]
    outcome = _aggregate(built, uploads, junk=1)
    assert outcome.aggregated == 3 and len(outcome.failures) == 1
    got = outcome.diagnostics
    assert got is not None and set(got) == set(DIAGNOSTIC_KEYS)
    assert got["client_drift"] == pytest.approx(1 / 3)
    assert got["client_drift_max"] == pytest.approx(6 / 8)
    assert got["global_flip_rate"] == pytest.approx(1 / 8)
    assert got["theta_saturated"] == pytest.approx(1 / 8)
    assert got["theta_entropy_bits"] == pytest.approx((7 * _h(1 / 3) + _h(0.01)) / 8)


def test_edge_popup_flip_rate_and_drift_by_hand():
    """Edge-popup, density 0.5: scores a = 10 1 9 2 8 3 keep 101 010 (3 of 6), b = 5 1 keep 10.
    Every client drops a[4] and keeps a[5] (2 entries off); client 2 also swaps b (4 off): drift
    (2 + 2 + 4) / 24 = 1/3, max 4/8. Standardised, a[4] = 8/3.594 = 2.23 loses lr = 2 and
    a[5] = 0.83 gains 2, passing a[0] and a[2] (2.78, 2.50): the new top-3 is 101 001, two
    flips; b's split vote (2/3 against 1/3) moves it by 2/3 of a spread, not enough to swap
    2.5 and 0.5. Flip rate 2/8. No theta: both theta keys are None."""
    scores = {"a": np.array([[10, 1, 9], [2, 8, 3]], dtype=np.float32), "b": np.array([5, 1], dtype=np.float32)}
    built = _strategy({"method": "edge-popup"}, scores)
    swapped = _bits(1, 0, 1, 0, 0, 1).reshape(2, 3)
    uploads = [{"a": swapped, "b": _bits(1, 0)}, {"a": swapped, "b": _bits(1, 0)}, {"a": swapped, "b": _bits(0, 1)}]
    got = _aggregate(built, uploads).diagnostics
    assert got is not None
    assert got["client_drift"] == pytest.approx(1 / 3)
    assert got["client_drift_max"] == pytest.approx(0.5)
    assert got["global_flip_rate"] == pytest.approx(0.25)
    assert got["theta_saturated"] is None and got["theta_entropy_bits"] is None


def test_slot_machines_drift_counts_connections_not_bit_planes():
    """Slot Machines, K = 4 (two bit-planes): the global choice is each connection's argmax.
    Client 1 of 3 chooses another candidate on one connection of 8 (3 - c for c: both
    bit-planes differ) but it is one connection, so drift is 1 / (3 * 8) (max 1/8). With a tiny
    slot-server-lr no global choice moves: flip rate 0."""
    rng = np.random.default_rng(3)
    layout = Layout((("a", (4, 2, 3)), ("b", (4, 2))))
    state = {name: rng.normal(size=shape).astype(np.float32) for name, shape in layout.shapes}
    built = _strategy({"method": "slot-machines", "init": "kaiming-uniform", "slots": 4, "slot-server-lr": 1e-3},
                      state, layout)
    chosen = {name: np.argmax(value, axis=0).astype(np.uint8) for name, value in state.items()}
    other = {name: value.copy() for name, value in chosen.items()}
    other["b"][0] = 3 - chosen["b"][0]  # 0 <-> 3, 1 <-> 2: both bit-planes differ
    got = _aggregate(built, [chosen, other, chosen]).diagnostics
    assert got is not None
    assert got["client_drift"] == pytest.approx(1 / 24)
    assert got["client_drift_max"] == pytest.approx(1 / 8)
    assert got["global_flip_rate"] == 0.0


def test_skipped_round_has_no_diagnostics():
    """A round below min-clients changes nothing and aggregates no one: diagnostics stay unset
    (null in the round line), not a flip rate of 0 that would read as a frozen mask."""
    theta = {"a": np.full((2, 3), 0.7, dtype=np.float32), "b": np.full(2, 0.2, dtype=np.float32)}
    built = _strategy({"min-clients": 3}, theta)
    outcome = _aggregate(built, [{"a": np.ones((2, 3), bool), "b": np.zeros(2, bool)}] * 2)
    assert outcome.skipped and outcome.diagnostics is None


# ---------------------------------------------------------------- end to end


def _run(tmp_path: Path, name: str, **overrides) -> list[dict]:
    config = resolve({**SMALL, **overrides})
    run_server(InProcessGrid(real_client_app, config.num_clients), config, tmp_path / name)
    return [json.loads(line) for line in (tmp_path / name / "rounds.jsonl").read_text().splitlines()]


def _diagnostics(rows: list[dict]) -> list[dict]:
    return [{key: row[key] for key in DIAGNOSTIC_KEYS} for row in rows]


def test_fedpm_run_writes_diagnostics_deterministically(tmp_path):
    """Through the in-process engine: every FedPM round line holds the five keys, each a
    fraction in [0, 1] (entropy in bits per parameter, also <= 1); drift is above 0 (the
    uploads are Bernoulli samples, never all equal to the thresholded theta). A second run
    with the same seed writes the same diagnostics, to the bit."""
    rows = _run(tmp_path, "a")
    for row in rows:
        assert all(isinstance(row[key], float) and 0.0 <= row[key] <= 1.0 for key in DIAGNOSTIC_KEYS), row
        assert row["client_drift"] > 0.0 and row["client_drift_max"] >= row["client_drift"]
    assert _diagnostics(_run(tmp_path, "b")) == _diagnostics(rows)


def test_edge_popup_run_has_mask_diagnostics_and_they_change_nothing_else(tmp_path, monkeypatch):
    """Edge-popup: flip rate and drift in [0, 1], the theta keys null. The same run with the
    diagnostics switched off (the strategy's hooks replaced by no-ops) has the same
    accuracies, losses and byte figures: computing them touches nothing the run uses."""
    rows = _run(tmp_path, "on", method="edge-popup")
    for row in rows:
        assert 0.0 <= row["global_flip_rate"] <= 1.0 and 0.0 <= row["client_drift"] <= row["client_drift_max"] <= 1.0
        assert row["theta_saturated"] is None and row["theta_entropy_bits"] is None
    assert rows[0]["global_flip_rate"] > 0.0  # round 1 moves the seed's selection
    monkeypatch.setattr(strategies, "round_diagnostics", lambda *args, **kwargs: None)
    monkeypatch.setattr(TopK, "global_mask", lambda *args, **kwargs: None)  # the flip rate's and drift's masks
    off = _run(tmp_path, "off", method="edge-popup")
    assert all(row[key] is None for row in off for key in DIAGNOSTIC_KEYS)
    figures = ("accuracy", "loss", "uplink_payload_bytes", "uplink_message_bytes", "downlink_payload_bytes",
               "downlink_message_bytes", "uplink_ideal_bpp", "train")
    assert [[row[k] for k in figures] for row in off] == [[row[k] for k in figures] for row in rows]


@pytest.mark.parametrize("overrides", [{"method": "fedavg"}, {"method": "laperm", "downlink-codec": "float32"}],
                         ids=["fedavg", "laperm"])
def test_methods_without_a_mask_hold_null_diagnostics(tmp_path, overrides):
    """FedAvg has no mask, LaPerm's state is ranks: the keys are in every round line, all null."""
    rows = _run(tmp_path, "run", **{**overrides, "num-rounds": 1})
    assert rows and all(key in row and row[key] is None for row in rows for key in DIAGNOSTIC_KEYS)
