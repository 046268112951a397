"""Faults, bad replies, attackers and crashes: the run goes on and loses nothing."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.client_app import app as client_app
from engines.inprocess import InProcessGrid
from fedmask import faults, task
from fedmask.config import load, resolve
from fedmask.core.masking import get_scores
from fedmask.downlink import LosslessDownlink
from fedmask.faults import attackers, client_fault, corrupt_upload
from fedmask.methods.fedpm import FedPMAggregator
from fedmask.methods.votes import robust_vote
from fedmask.names import CORRUPTIONS
from fedmask.record.failures import FAILURE_KINDS
from fedmask.record.ledger import Ledger
from fedmask.wire import masks as mask_codec
from fedmask.wire.frame import Frame, Layout, WireError
from fedmask.wire.masks import decode_masks, encode_masks
from server.server_app import run_server
from server.strategies import MaskStrategy, Start

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"num-clients": 4, "clients-per-round": 4, "num-rounds": 3}


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def _run(tmp_path: Path, name: str, **overrides) -> list[dict]:
    config = resolve({**SMALL, **overrides})
    run_server(InProcessGrid(client_app, config.num_clients), config, tmp_path / name)
    return _rounds(tmp_path / name)


def test_fault_plan_is_seeded_and_follows_the_rates():
    """The same (seed, round, client) always suffers the same fault; rates hold on average."""
    config = resolve({"fault-drop-rate": 0.1, "fault-crash-rate": 0.2, "fault-corrupt-rate": 0.3})
    plan = [client_fault(config, r, p) for r in range(1, 201) for p in range(10)]
    assert plan == [client_fault(config, r, p) for r in range(1, 201) for p in range(10)]
    for fault, rate in (("drop", 0.1), ("crash", 0.2), ("corrupt", 0.3), (None, 0.4)):
        assert abs(plan.count(fault) / len(plan) - rate) < 0.04, fault
    assert client_fault(resolve({}), 1, 0) is None


def test_without_fault_rates_no_client_suffers_a_fault_and_none_is_drawn(monkeypatch):
    """All rates 0 (every run without faults): no fault, decided without building a generator."""
    config = resolve({"num-clients": 50})

    def no_draw(*args, **kwargs):
        raise AssertionError("a random generator was built")

    monkeypatch.setattr(faults.np.random, "default_rng", no_draw)
    assert all(client_fault(config, r, p) is None for r in (1, 2) for p in range(50))


def test_every_injected_fault_is_recorded_with_its_kind_and_reason(tmp_path):
    """Drops, crashes and corrupt uploads appear in rounds.jsonl per client with the kind that
    matches the injected fault (dropped, client-error, rejected); summary.json counts them by
    kind; rounds go on."""
    overrides = {"num-clients": 8, "clients-per-round": 8, "num-rounds": 3, "fault-drop-rate": 0.15,
                 "fault-crash-rate": 0.15, "fault-corrupt-rate": 0.2}
    config = resolve(overrides)
    rows = _run(tmp_path, "faults", **overrides)
    for row in rows:
        expected = {p: client_fault(config, row["round"], p) for p in range(8)}
        recorded = {f["partition_id"]: f for f in row["failure_details"]}
        assert set(recorded) == {p for p, fault in expected.items() if fault}
        for pid, failure in recorded.items():
            kind, word = {"drop": ("dropped", "dropped"), "crash": ("client-error", "injected crash"),
                          "corrupt": ("rejected", "mask rejected")}[expected[pid]]
            assert failure["kind"] == kind and word in failure["reason"], (pid, failure)
        assert row["clients"] == 8 - len(recorded)
        assert np.isfinite(row["accuracy"])
    summary = json.loads((tmp_path / "faults" / "summary.json").read_text())
    kinds = [f["kind"] for row in rows for f in row["failure_details"]]
    assert summary["failures_by_kind"] == {kind: kinds.count(kind) for kind in FAILURE_KINDS}
    assert {"dropped", "client-error", "rejected"} <= set(kinds)


def test_slow_clients_past_the_timeout_are_lost_and_the_round_ends_at_the_timeout(tmp_path):
    """round-timeout 1.5 s, fault-slow-delay 30 s: exactly the slow clients are recorded as
    'no reply before round-timeout', every other client is aggregated, and each round ends
    after about the timeout, not the delay."""
    overrides = {"num-clients": 6, "clients-per-round": 6, "num-rounds": 2, "fault-slow-rate": 0.4,
                 "fault-slow-delay": 30.0, "round-timeout": 1.5}
    config = resolve({**SMALL, **overrides})
    start = time.monotonic()
    rows = _run(tmp_path, "slow", **overrides)
    took = time.monotonic() - start
    slow_seen = 0
    for row in rows:
        slow = {p for p in range(6) if client_fault(config, row["round"], p) == "slow"}
        slow_seen += len(slow)
        recorded = {f["partition_id"]: f["reason"] for f in row["failure_details"]}
        assert set(recorded) == slow
        assert all(reason == "no reply before round-timeout" for reason in recorded.values())
        assert {f["kind"] for f in row["failure_details"]} <= {"no-reply"}
        assert row["clients"] == 6 - len(slow)
        assert {c["partition_id"] for c in row["per_client"] if c["uplink_message_bytes"]} == set(range(6)) - slow
    assert slow_seen and any(row["clients"] for row in rows)
    assert took < 2 * 1.5 + 20  # two rounds of ~1.5 s (plus training), far below one 30 s delay


def test_slow_client_within_the_timeout_is_aggregated(tmp_path):
    """A client late by 0.3 s against a 5 s round-timeout still counts."""
    start = time.monotonic()
    rows = _run(tmp_path, "slow", **{"num-rounds": 1, "fault-slow-rate": 1.0, "fault-slow-delay": 0.3,
                                     "round-timeout": 5.0})
    assert rows[0]["failures"] == 0 and rows[0]["clients"] == 4
    assert time.monotonic() - start < 30


def _one_of_each_corruption(config: dict) -> dict[str, tuple[int, int]]:
    """A (round, partition) for which :func:`corrupt_upload` picks each kind."""
    found: dict[str, tuple[int, int]] = {}
    dummy = np.zeros(64, dtype=np.uint8)
    dummy[:4] = np.frombuffer(mask_codec.FRAME.magic, dtype=np.uint8)  # corrupted as a mask upload
    for server_round in range(1, 50):
        for pid in range(10):
            found.setdefault(corrupt_upload(dummy, config, server_round, pid)[1], (server_round, pid))
    assert set(found) == set(CORRUPTIONS)
    return found


def _changed(a: np.ndarray, b: np.ndarray) -> set[int]:
    return {int(i) for i in np.flatnonzero(a != b)}


def test_each_corruption_hits_its_field_and_decode_refuses_it_for_that_field():
    """bit-flip changes one payload byte (refused as crc32), foreign-fingerprint changes only
    the header's fingerprint bytes (refused as fingerprint), truncate shortens (length)."""
    config = resolve({})
    layout = Layout((("a", (40, 30)), ("b", (77,))))
    fingerprint = layout.fingerprint(0, "mlp", "x")
    rng = np.random.default_rng(0)
    blob = encode_masks({n: rng.random(s) < 0.5 for n, s in layout.shapes}, layout, fingerprint, "packbits")
    fingerprint_field = mask_codec.FRAME.slice("fingerprint")
    fp_bytes = set(range(fingerprint_field.start, fingerprint_field.stop))
    assert len(fp_bytes) == 8
    for kind, (server_round, pid) in _one_of_each_corruption(config).items():
        broken, got_kind = corrupt_upload(blob, config, server_round, pid)
        assert got_kind == kind
        with pytest.raises(WireError) as err:
            decode_masks(broken, layout, fingerprint)
        if kind == "truncate":
            assert broken.size < blob.size and err.value.field == "length"
        elif kind == "bit-flip":
            (position,) = _changed(broken, blob)
            assert position >= mask_codec.HEADER_BYTES and err.value.field == "crc32"
        else:
            assert _changed(broken, blob) <= fp_bytes and len(_changed(broken, blob)) >= 7
            assert err.value.field == "fingerprint"


def test_corrupt_upload_follows_the_codec_header_layout(monkeypatch):
    """With an upload format whose header is laid out otherwise (48 bytes, the fingerprint
    at 36..44), the corruptions move with it: offsets come from the upload's own frame
    (found by its magic), not from numbers of their own."""
    config = resolve({})
    moved = Frame("mask", b"FMXX", (("padding", "32s"), ("fingerprint", "8s"), ("crc32", "I")))
    assert moved.size == 48 and moved.slice("fingerprint") == slice(36, 44)
    monkeypatch.setattr(faults, "UPLOAD_FRAMES", (*faults.UPLOAD_FRAMES, moved))
    blob = np.zeros(200, dtype=np.uint8)
    blob[:4] = np.frombuffer(moved.magic, dtype=np.uint8)
    seen = set()
    for server_round in range(1, 30):  # many draws, so a hard-coded offset would show
        for pid in range(10):
            broken, kind = corrupt_upload(blob, config, server_round, pid)
            seen.add(kind)
            if kind == "bit-flip":
                assert min(_changed(broken, blob)) >= 48
            elif kind == "foreign-fingerprint":
                assert _changed(broken, blob) <= set(range(36, 44)) and _changed(broken, blob)
    assert seen == set(CORRUPTIONS)


def test_round_below_min_clients_is_skipped_and_state_kept(tmp_path):
    """With every client crashing and min-clients 2, each round is skipped with a reason."""
    rows = _run(tmp_path, "skip", **{"fault-crash-rate": 1.0, "min-clients": 2, "eval-mask": "threshold"})
    assert all(r["skipped"] and "min-clients" in r["skipped"] and r["clients"] == 0 for r in rows)
    assert len({r["accuracy"] for r in rows}) == 1


def test_robust_votes_resist_a_minority_of_inverting_clients():
    """Trimmed and median votes stay with the honest majority; the plain mean does not."""
    rng = np.random.default_rng(0)
    truth = {"w": rng.random(1000) < 0.5}
    honest = [truth] * 7
    liars = [{"w": ~truth["w"]}] * 3
    masks = honest + liars
    weights = [1.0] * 10
    plain = robust_vote(masks, weights, resolve({}))["w"]
    trimmed = robust_vote(masks, weights, resolve({"robust-aggregation": "trimmed", "trim-fraction": 0.3}))["w"]
    median = robust_vote(masks, weights, resolve({"robust-aggregation": "median"}))["w"]
    assert np.allclose(plain, np.where(truth["w"], 0.7, 0.3))
    assert np.array_equal(trimmed, truth["w"].astype(float))
    assert np.array_equal(median, truth["w"].astype(float))


def test_attackers_are_a_seeded_fixed_subset():
    config = resolve({"attack": "invert", "attack-fraction": 0.3})
    assert attackers(config) == attackers(config) and len(attackers(config)) == 3
    assert attackers(resolve({"attack": "invert", "attack-fraction": 0.3, "seed": 1})) != attackers(config)


def test_trimmed_aggregation_recovers_accuracy_under_attack(tmp_path):
    """30% inverting clients wreck plain FedPM; trimmed votes keep most of the accuracy."""
    attack = {"num-clients": 10, "clients-per-round": 10, "num-rounds": 6, "attack": "invert",
              "attack-fraction": 0.3, "eval-mask": "threshold"}
    plain = _run(tmp_path, "plain", **attack)[-1]["accuracy"]
    trimmed = {"robust-aggregation": "trimmed", "trim-fraction": 0.3}
    robust = _run(tmp_path, "robust", **attack, **trimmed)[-1]["accuracy"]
    assert robust > plain + 0.2


@pytest.fixture(scope="module")
def strategy():
    """A FedPM MaskStrategy for the digits MLP, with the prior of its first broadcast."""
    config = resolve(SMALL)
    grid = InProcessGrid(client_app, 4)
    mode = task.mode_of(config, "bernoulli")
    model = task.make_model(config, task.splits_of(config), mode)
    aggregator = FedPMAggregator.from_config(config)
    spec, state = task.ModelSpec.of(config, model, mode), aggregator.initial_state(get_scores(model))
    lossless = LosslessDownlink.create(spec.layout, spec.fingerprint, mode.vote_contexts, aggregator.replayable,
                                       aggregator.absorbing, state)  # the default downlink-codec, as build makes it
    strat = MaskStrategy(config, Ledger(), Start(state), aggregator, mode, spec, lossless)
    list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    return strat


def _reply(content: RecordDict) -> Message:
    instruction = Message(RecordDict(), dst_node_id=1001, message_type=MessageType.TRAIN)
    instruction.metadata.__dict__["_message_id"] = "m"
    return Message(content, reply_to=instruction)


# What a MetricRecord can carry at all (Flower refuses other types when it is built); a
# missing value is drawn as None.
metric_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**6), st.none())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(num_examples=metric_values, loss=metric_values,
       blob=st.one_of(st.binary(max_size=64).map(lambda b: np.frombuffer(b, dtype=np.uint8).copy()),
                      st.lists(st.floats(allow_nan=True), max_size=8).map(lambda v: np.asarray(v, dtype=np.float32))),
       key=st.sampled_from(["mask", "weights"]))
def test_no_reply_content_crashes_the_server(strategy, num_examples, loss, blob, key):
    """Whatever a client sends, the server accepts it or records a reason; it never raises."""
    metrics = {}
    for name, value in (("num-examples", num_examples), ("train-loss", loss)):
        if value is not None:
            metrics[name] = value
    reply = _reply(RecordDict({"arrays": ArrayRecord({key: Array(blob)}), "metrics": MetricRecord(metrics)}))
    before = len(strategy.outcome(1).failures)
    usable = strategy.usable_replies(1, [reply])
    if usable:
        with pytest.raises(Exception) as err:  # a junk mask never decodes
            strategy.decode(1, reply)
        assert type(err.value).__name__ in ("WireError", "RejectedReply")
    else:
        assert len(strategy.outcome(1).failures) > before
        failure = strategy.outcome(1).failures[-1]
        assert failure["kind"] == "rejected" and "expected" in failure["reason"]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    """A run killed mid-way and resumed ends with the same rounds and global state.

    With the float32 broadcast, byte for byte too; the lossless one sends full states after
    a resume (the nodes' kept states are gone), see test_broadcast.py."""
    overrides = ["num-clients=3", "clients-per-round=3", "num-rounds=6", "fault-slow-rate=1.0",
                 "fault-slow-delay=0.15", 'downlink-codec="float32"']
    sets = [arg for item in overrides for arg in ("--set", item)]
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fedmask.cli", "run", str(ROOT / "configs/quickstart.toml"),
           "--engine", "inprocess", "--out", str(killed), *sets]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        path = killed / "rounds.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len((killed / "rounds.jsonl").read_text().splitlines())
    assert 2 <= done < 6, "the run must be killed mid-way for this test to mean anything"
    assert all(line.endswith("}") for line in (killed / "rounds.jsonl").read_text().splitlines())

    resumed = subprocess.run([sys.executable, "-m", "fedmask.cli", "run", "--resume", str(killed),
                              "--engine", "inprocess"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    whole = tmp_path / "whole"
    subprocess.run(cmd[:-len(sets) - 2] + ["--out", str(whole), *sets], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]

    assert strip(_rounds(killed)) == strip(_rounds(whole))
    with np.load(killed / "checkpoint.npz") as a, np.load(whole / "checkpoint.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            if name != "meta":
                assert np.array_equal(a[name], b[name]), name
    assert json.loads((killed / "summary.json").read_text())["rounds"] == 6
    assert not list(killed.glob("*.tmp"))
    assert math.isfinite(json.loads((killed / "summary.json").read_text())["final_accuracy"])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedmask.cli", "run", *args]


@pytest.mark.ray
def test_slow_clients_past_the_timeout_under_ray_cost_only_their_own_replies(tmp_path):
    """Under Ray, round-timeout 30 s (round 1 includes the workers' start, 5-20 s on 2
    cores) and fault-slow-delay 120 s: the slow clients are recorded as no reply, every
    honest client is aggregated, and rounds end at the timeout, not the delay. (It failed
    before the grid stopped re-pulling held replies: Flower's engine answers a second pull
    of a taken reply with a "Message Unavailable" error, so slow clients became client
    errors and rounds ended early.)"""
    sets = ["num-clients=4", "clients-per-round=4", "num-rounds=2", "fault-slow-rate=0.4",
            "fault-slow-delay=120", "round-timeout=30"]
    out = tmp_path / "ray-slow"
    start = time.monotonic()
    proc = subprocess.run(_cli(str(ROOT / "configs/quickstart.toml"), *[a for s in sets for a in ("--set", s)],
                               "--out", str(out)), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert time.monotonic() - start < 120  # not even one full delay
    config = load(ROOT / "configs/quickstart.toml", sets)
    slow_seen = 0
    for row in _rounds(out):
        slow = {p for p in range(4) if client_fault(config, row["round"], p) == "slow"}
        slow_seen += len(slow)
        assert {(f["partition_id"], f["kind"]) for f in row["failure_details"]} == {(p, "no-reply") for p in slow}
        assert row["clients"] == 4 - len(slow)
    assert slow_seen


@pytest.mark.ray
def test_ctrl_c_under_ray_stops_within_seconds_and_the_run_resumes(tmp_path):
    """SIGINT after the first round: exit 130 within 20 s; --resume finishes the run."""
    out = tmp_path / "ray-int"
    sets = ["num-clients=2", "clients-per-round=2", "num-rounds=40"]
    proc = subprocess.Popen(_cli(str(ROOT / "configs/quickstart.toml"), *[a for s in sets for a in ("--set", s)],
                                 "--out", str(out)), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        path = out / "rounds.jsonl"
        if path.exists() and path.read_text().count("\n") >= 1:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("fedmask did not stop within 20 s of Ctrl-C")
    assert code == 130, proc.stderr.read()[-2000:]
    assert time.monotonic() - sent < 20
    done = len(_rounds(out))
    assert 1 <= done < 40
    resumed = subprocess.run(_cli("--resume", str(out), "--engine", "inprocess"), capture_output=True, text=True,
                             cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["round"] for r in _rounds(out)] == list(range(1, 41))
