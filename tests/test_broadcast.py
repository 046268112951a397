"""Tests for the lossless downlink (fedmask.downlink; its bytes: fedmask.wire.lossless): every
client ends with the server's state bit for bit, the server tracks what each node holds from
its confirmations only, and every broadcast is weighed by the ledger.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clients.client_app import app as real_client_app
from engines.inprocess import InProcessGrid
from fedmask import task
from fedmask.config import resolve
from fedmask.downlink import Held, LosslessDownlink, receive
from fedmask.methods.base import RoundResult
from fedmask.methods.edge_popup import EdgePopupAggregator, TopK
from fedmask.methods.fedpm import Bernoulli, FedPMAggregator
from fedmask.methods.slot_machines import SlotMachineAggregator
from fedmask.methods.votes import Voting
from fedmask.record.checkpoint import Checkpoint
from fedmask.wire.frame import Layout, WireError
from fedmask.wire.lossless import FRAME, decode_votes, encode_state, encode_votes, few_valued, replay_blob, state_digest
from server.server_app import run_server

SMALL = {"num-clients": 4, "clients-per-round": 4, "num-rounds": 3, "dataset": "digits", "model": "mlp"}
LAYOUT = Layout((("a.weight", (40, 30)), ("b.bias", (7,))))
FP = b"12345678"


SLOT_LAYOUT = Layout(tuple((name, (4, *shape)) for name, shape in LAYOUT.shapes))  # K = 4 scores each


def _layout(mode: str) -> Layout:
    return SLOT_LAYOUT if mode == "slots" else LAYOUT


def _rng_state(mode: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if mode == "slots":
        return {n: rng.normal(size=s).astype(np.float32) for n, s in SLOT_LAYOUT.shapes}
    if mode == "bernoulli":
        return {n: rng.uniform(0.01, 0.99, size=s).astype(np.float32) for n, s in LAYOUT.shapes}
    return {n: np.abs(rng.normal(size=s)).astype(np.float32) for n, s in LAYOUT.shapes}


def _masks(mode: str, state: dict[str, np.ndarray], rng: np.random.Generator, clients: int) -> list[dict]:
    if mode == "slots":
        return [{n: rng.integers(0, v.shape[0], size=v.shape[1:]) for n, v in state.items()} for _ in range(clients)]
    return [{n: rng.random(v.shape) < 0.5 for n, v in state.items()} for _ in range(clients)]


AGGREGATORS = {
    "bernoulli": (FedPMAggregator, {}),
    "topk": (EdgePopupAggregator, {"method": "edge-popup"}),
    "slots": (SlotMachineAggregator, {"method": "slot-machines", "init": "kaiming-uniform", "slots": 4}),
}


def _downlink(aggregator: Voting, layout: Layout, mode: str, config, state) -> LosslessDownlink:
    """The server's lossless downlink for a built-in rule, as server_app.build makes it."""
    return LosslessDownlink.create(layout, FP, task.mode_of(config, mode).vote_contexts, aggregator.replayable,
                                   aggregator.absorbing, state)


def _round(aggregator: Voting, version: int, state, masks, weights) -> RoundResult:
    """One round as the server runs it: each upload folded in, then the round finished."""
    for mask, weight in zip(masks, weights):
        aggregator.fold(version, state, mask, weight)
    return aggregator.finish(version, state)


def _record(downlink: LosslessDownlink, aggregator: Voting, version: int, state, result: RoundResult) -> None:
    downlink.record(version, state, result.state, result.votes, result.clients, aggregator.replay)


def _server_rounds(mode: str, rounds: int, seed: int = 0, **extra):
    """A server's history of ``rounds`` aggregations of random masks with unequal weights."""
    cls, keys = AGGREGATORS[mode]
    config = resolve({**SMALL, **keys, **extra, "downlink-codec": "lossless"})
    aggregator = cls.from_config(config)
    rng = np.random.default_rng(seed)
    state = _rng_state(mode, rng)
    if mode == "topk":  # the server's scores are standardised magnitudes
        state = aggregator.initial_state(state)
    downlink = _downlink(aggregator, _layout(mode), mode, config, state)
    states = [state]
    for version in range(1, rounds + 1):
        masks = _masks(mode, state, rng, 5)
        weights = [float(w) for w in rng.integers(50, 200, size=5)]
        result = _round(aggregator, version, state, masks, weights)
        _record(downlink, aggregator, version, state, result)
        state = result.state
        states.append(state)
    return config, aggregator, downlink, states


def _client(config, aggregator, mode, states, blob, held=None) -> Held:
    """A node's receive, with its own instance of the rule (as clients.received builds it)."""
    return receive(blob, _layout(mode), FP, held, lambda: states[0], type(aggregator).from_config(config).replay,
                   task.mode_of(config, mode).vote_contexts)


@pytest.mark.parametrize(("mode", "extra"), [
    *[(mode, {}) for mode in sorted(AGGREGATORS)],
    ("topk", {"edge-popup-server-rule": "vote-average"}),
    ("topk", {"edge-popup-server-rule": "vote-levels"}),
])
def test_replay_reaches_the_servers_state_bit_for_bit(mode, extra):
    """A node holding nothing, and one holding each earlier version, end with the server's
    float32 state byte for byte, through whichever broadcast the server picks for them
    (edge-popup under each server rule: the server checks that a client's replay reaches
    its state, and would fall back to full states, ``can_replay`` False, if not; FedPM's
    theta and vote-levels' scores take few values, so they may also go as a state step)."""
    config, aggregator, downlink, states = _server_rounds(mode, 4, **extra)
    assert downlink.can_replay
    blob, kind = downlink.message_for(1, states[-1])
    got = _client(config, aggregator, mode, states, blob)
    assert kind in ("replay", "standalone", "state") and (kind != "state" or downlink.few_valued)
    assert all(got.state[k].tobytes() == states[-1][k].tobytes() for k in states[-1])
    for version in range(len(states) - 1):
        downlink.sent([2])
        digest = state_digest(states[version], _layout(mode))
        assert downlink.confirm(2, version, digest.hex())
        blob, kind = downlink.message_for(2, states[-1])
        held = Held(version, digest, states[version])
        got = _client(config, aggregator, mode, states, blob, held)
        assert got.version == 4 and all(np.array_equal(got.state[k], states[-1][k]) for k in states[-1])


def test_node_holding_the_current_state_gets_a_header_only():
    config, aggregator, downlink, states = _server_rounds("topk", 2)
    downlink.sent([5])
    downlink.confirm(5, 2, state_digest(states[2], LAYOUT).hex())
    blob, kind = downlink.message_for(5, states[2])
    assert kind == "replay" and blob.size == FRAME.size
    held = Held(2, state_digest(states[2], LAYOUT), states[2])
    assert _client(config, aggregator, "topk", states, blob, held).version == 2


def test_unconfirmed_or_wrongly_confirmed_nodes_are_forgotten():
    """Never assume: a node that did not answer, or confirmed a digest the server never made,
    gets a self-contained broadcast (from the seed, standalone or full), not a delta."""
    config, aggregator, downlink, states = _server_rounds("topk", 3)
    downlink.sent([1, 2, 3])
    assert downlink.confirm(1, 3, state_digest(states[3], LAYOUT).hex())
    assert not downlink.confirm(2, 3, "00" * 8)
    downlink.end_round()  # node 3 never answered
    assert downlink.held == {1: 3}
    for node in (2, 3):
        blob, _ = downlink.message_for(node, states[3])
        header, _ = FRAME.read(blob.tobytes())
        assert header["base version"] == 0  # the seed's state, or (full) none
        got = _client(config, aggregator, "topk", states, blob, held=None)
        assert got.digest == state_digest(states[3], LAYOUT)


def test_node_that_lost_its_state_is_refused_with_a_clear_error():
    config, aggregator, downlink, states = _server_rounds("topk", 3)
    downlink.sent([1])
    downlink.confirm(1, 2, state_digest(states[2], LAYOUT).hex())
    blob, kind = downlink.message_for(1, states[3])
    assert kind == "replay"
    with pytest.raises(WireError, match="base state.*round 2.*nothing"):
        _client(config, aggregator, "topk", states, blob, held=None)


@pytest.mark.parametrize("flip", [3, FRAME.size + 5, -1])
def test_corrupted_broadcast_is_refused_by_crc(flip):
    config, aggregator, downlink, states = _server_rounds("bernoulli", 2)
    blob, _ = downlink.message_for(1, states[-1])
    bad = blob.copy()
    bad[flip] ^= 0x10
    with pytest.raises(WireError):
        _client(config, aggregator, "bernoulli", states, bad)


@pytest.mark.parametrize("flip", [3, FRAME.size - 14, FRAME.size - 6, FRAME.size + 5, -1])
def test_a_state_decoded_in_the_process_is_not_given_for_a_corrupted_blob_of_it(flip, monkeypatch):
    """Once a process holds the decoded state a broadcast leads to, a corrupted copy of that
    broadcast (magic, target digest, target version, body) is still refused by the header
    checks, not answered from the process's cache, and so is the intact blob when the node
    belongs to another run (fingerprint); the intact blob is answered from the cache
    without decoding."""
    import dataclasses

    from flwr.app import Context, RecordDict

    import clients.received as client_module

    config, aggregator, downlink, states = _server_rounds("bernoulli", 2)
    blob, _ = downlink.message_for(1, states[-1])
    mode = task.mode_of(config, "bernoulli")
    party = client_module._Party("bernoulli", LAYOUT, FP, None, mode.vote_contexts, None)
    held = Held(downlink.current, downlink.versions[downlink.current], states[-1])
    received = client_module._Received(held, {})
    monkeypatch.setattr(client_module, "_RECEIVED", {(config, "bernoulli", (held.version, held.digest)): received})
    monkeypatch.setattr(client_module.downlink, "receive", lambda *a, **k: pytest.fail("decoded again"))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert client_module._decoded_broadcast(blob, config, party, context) is received
    bad = blob.copy()
    bad[flip] ^= 0x10
    with pytest.raises(WireError, match="crc32|header"):
        client_module._decoded_broadcast(bad, config, party, context)
    other_run = dataclasses.replace(party, fingerprint=b"87654321")
    with pytest.raises(WireError, match="fingerprint"):
        client_module._decoded_broadcast(blob, config, other_run, context)


def test_broadcast_for_another_model_is_refused():
    config, aggregator, downlink, states = _server_rounds("bernoulli", 1)
    blob, _ = downlink.message_for(1, states[-1])
    with pytest.raises(WireError, match="fingerprint"):
        receive(blob, LAYOUT, b"87654321", None, lambda: states[0], aggregator.replay, Bernoulli().vote_contexts)


@pytest.mark.parametrize("contexts", [None, "ctx"])
def test_votes_round_trip_exactly(contexts):
    """Any float64 votes (weighted shares, counts, constants) come back bit for bit."""
    rng = np.random.default_rng(3)
    for votes in (rng.integers(0, 11, 500) / 10 * 10, rng.choice([0.0, 0.25, 1 / 3, 1.0], 500),
                  np.full(500, 0.7), rng.normal(size=500)):
        ctx = rng.integers(0, 2, 500) if contexts else None
        section = encode_votes(votes, ctx, 2)
        got, end = decode_votes("t", section, 0, 500, ctx, 2)
        assert end == len(section) and got.tobytes() == votes.astype(np.float64).tobytes()


def test_plugin_aggregators_get_full_states_only():
    """A plug-in is neither built in (a node cannot import it) nor replayable; a subclass of a
    built-in rule that rewrote aggregate (its replay would lie) makes no replayable votes, so
    the downlink stops offering replays and sends it full states, where the rule it
    subclasses keeps replays."""
    from examples.majority_momentum import MajorityMomentum

    config = resolve({**SMALL, "method": "examples.majority_momentum:MajorityMomentum",
                      "downlink-codec": "lossless"})
    assert not config.method_entry.builtin and not MajorityMomentum(config).replayable

    class Rewritten(EdgePopupAggregator):  # a subclass that rewrote aggregate: its replay would lie
        def aggregate(self, server_round, state, masks, weights):
            return state

    edge = resolve({**SMALL, "method": "edge-popup", "downlink-codec": "lossless"})
    rng = np.random.default_rng(2)
    for cls, replays in ((Rewritten, False), (EdgePopupAggregator, True)):
        aggregator = cls.from_config(edge)
        state = aggregator.initial_state(_rng_state("topk", rng))
        downlink = _downlink(aggregator, LAYOUT, "topk", edge, state)
        result = _round(aggregator, 1, state, _masks("topk", state, rng, 3), [1.0, 2.0, 3.0])
        assert (result.votes is not None) is replays
        _record(downlink, aggregator, 1, state, result)
        assert downlink.can_replay is replays
        downlink.sent([1])
        assert downlink.confirm(1, 0, state_digest(state, LAYOUT).hex())
        _, kind = downlink.message_for(1, result.state)
        assert kind == ("replay" if replays else "full"), cls


def test_fedpm_with_accumulated_prior_cannot_be_replayed():
    """theta then depends on past rounds' counts: a client cannot replay one round's (its
    state still goes as a state step: see test_lossless_run_equals_the_float32_run)."""
    assert not FedPMAggregator.from_config(resolve({**SMALL, "fedpm-prior-reset": 2})).replayable
    assert FedPMAggregator.from_config(resolve({**SMALL, "fedpm-prior-reset": 1})).replayable
    resolve({**SMALL, "method": "fedavg", "downlink-codec": "lossless"})  # dense float32 is lossless


# ---------------------------------------------------------------- end to end, real messages


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def _run(tmp_path: Path, name: str, client_app=real_client_app, **overrides):
    config = resolve({**SMALL, **overrides})
    grid = InProcessGrid(client_app, config.num_clients)
    run_server(grid, config, tmp_path / name)
    return _rounds(tmp_path / name), grid


@pytest.mark.parametrize("overrides", [
    {},  # FedPM: counts
    {"method": "edge-popup", "num-clients": 5, "clients-per-round": 2, "num-rounds": 4},  # nodes miss rounds
    {"method": "edge-popup", "edge-popup-server-rule": "vote-levels", "num-clients": 5, "clients-per-round": 2,
     "num-rounds": 4},  # state steps
    {"fedpm-prior-reset": 2, "num-clients": 5, "clients-per-round": 2, "num-rounds": 4},  # not replayable: state steps
])
def test_lossless_run_equals_the_float32_run(tmp_path, overrides):
    """Same accuracy every round as the float32 broadcast (the clients train from the
    identical state), far fewer downlink bytes, and every node's kept state is the server's."""
    f32, _ = _run(tmp_path, "f32", **{**overrides, "downlink-codec": "float32"})
    rows, grid = _run(tmp_path, "lossless", **{**overrides, "downlink-codec": "lossless"})
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in f32]
    assert [r["loss"] for r in rows] == [r["loss"] for r in f32]
    assert rows[0]["downlink_payload_bytes"] == FRAME.size * rows[0]["clients"]  # the seed's state: a header
    assert all(r["downlink_payload_bytes"] < f32[i]["downlink_payload_bytes"] / 4 for i, r in enumerate(rows))
    assert all(r["failures"] == 0 for r in rows)
    held = [c.state["downlink-held-meta"]["digest"] for c in grid.contexts.values() if "downlink-held-meta" in c.state]
    assert held  # nodes keep what they last received
    if overrides.get("edge-popup-server-rule") == "vote-levels" or "fedpm-prior-reset" in overrides:  # as state steps
        assert any("state" in (r.get("downlink_kinds") or {}) for r in rows), [r.get("downlink_kinds") for r in rows]


def test_in_process_nodes_holding_one_state_share_its_bytes(tmp_path):
    """The in-process engine keeps every node's context in one process: nodes that received
    the same state hold one copy of its bytes, not one each (a 1 MB LeNet state per node
    would grow to GBs over thousands of nodes)."""
    _, grid = _run(tmp_path, "shared-bytes", **{"num-rounds": 2, "downlink-codec": "lossless"})
    holders = [c.state for c in grid.contexts.values() if "downlink-held-meta" in c.state]
    last = max(int(h["downlink-held-meta"]["version"]) for h in holders)
    same = [h["downlink-held"] for h in holders if int(h["downlink-held-meta"]["version"]) == last]
    assert len(same) >= 2
    for name in same[0]:
        assert all(record[name].data is same[0][name].data for record in same[1:])


def test_node_that_lost_its_state_fails_once_then_gets_a_self_contained_broadcast(tmp_path):
    """A node whose context.state is wiped (a fresh process) cannot use the delta from the
    state it had confirmed: it fails that round with a clear error, and the next round it
    is sent a broadcast from the seed (or full), and trains again."""
    wiped = {}

    def app(message, context):
        round_ = int(message.content["config"]["server-round"])
        if round_ == 3 and context.node_id == 1001 and not wiped:
            for key in list(context.state.keys()):
                del context.state[key]
            wiped[round_] = True
        return real_client_app(message, context)

    rows, _ = _run(tmp_path, "wiped", client_app=app, method="edge-popup", **{"num-rounds": 4,
                                                                                  "downlink-codec": "lossless"})
    assert [r["failures"] for r in rows] == [0, 0, 1, 0]
    assert "base state" in rows[2]["failure_details"][0]["reason"]
    assert rows[3]["clients"] == 4 and sum(rows[3]["downlink_kinds"].values()) == 4


def test_totals_and_fedavg_equivalent_match_a_real_fedavg_round(tmp_path):
    """summary.json and every round report up + down per client and FedAvg's round trip,
    and that FedAvg figure is what a real FedAvg round of the same model weighs."""
    fedavg, _ = _run(tmp_path, "fedavg", method="fedavg", **{"num-rounds": 1})
    per_client = fedavg[0]["per_client"][0]
    real = per_client["uplink_message_bytes"] + per_client["downlink_message_bytes"]
    rows, _ = _run(tmp_path, "fedpm", **{"num-rounds": 1, "downlink-codec": "lossless"})
    # the reply's metric values and the instruction's config values differ in a few bytes
    assert abs(rows[0]["fedavg_message_bytes_per_client"] - real) <= 64
    summary = json.loads((tmp_path / "fedpm" / "summary.json").read_text())
    assert summary["fedavg_payload_bytes_per_client_round"] == (per_client["uplink_payload_bytes"]
                                                                + per_client["downlink_payload_bytes"])
    total = rows[0]["total_message_bytes_per_client"]
    assert total == (rows[0]["uplink_message_bytes"] + rows[0]["downlink_message_bytes"]) / 4
    assert summary["fedavg_ratio"] == pytest.approx(rows[0]["fedavg_message_bytes_per_client"] / total)
    assert summary["fedavg_ratio"] > 20


def killed_after_round_two(config, run_dir: Path) -> None:
    """Run ``config`` into ``run_dir``, then roll the folder back to what a kill after round 2
    leaves: the round-2 checkpoint (kept aside as it was saved), two round lines, no summary."""
    saved = {}
    original_save = Checkpoint.save

    def keep_round_two(checkpoint, where):
        original_save(checkpoint, where)
        if checkpoint.round == 2:
            saved["bytes"] = (Path(where) / "checkpoint.npz").read_bytes()

    Checkpoint.save = keep_round_two  # type: ignore[method-assign]
    try:
        run_server(InProcessGrid(real_client_app, config.num_clients), config, run_dir)
    finally:
        Checkpoint.save = original_save  # type: ignore[method-assign]
    (run_dir / "checkpoint.npz").write_bytes(saved["bytes"])
    lines = (run_dir / "rounds.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "rounds.jsonl").write_text("".join(lines[:2]))
    (run_dir / "summary.json").unlink()


def test_resumed_lossless_run_trains_the_same_and_codes_against_the_seeds_state_first(tmp_path):
    """After a resume the history of steps is gone: every node gets a self-contained
    broadcast once (FedPM's few-valued theta, coded against the seed's state that every
    node regenerates, never a replay from a state it held before the stop), then deltas
    again; the accuracies are those of the uninterrupted run."""
    whole, _ = _run(tmp_path, "whole", **{"num-rounds": 4, "downlink-codec": "lossless"})
    config = resolve({**SMALL, "num-rounds": 4, "downlink-codec": "lossless"})
    run_dir = tmp_path / "resumed"
    killed_after_round_two(config, run_dir)
    run_server(InProcessGrid(real_client_app, config.num_clients), config, run_dir, resume=True)
    rows = _rounds(tmp_path / "resumed")
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in whole]
    # then deltas: FedPM's relative-entropy uploads, relayed (nodes aggregate them themselves)
    assert rows[2]["downlink_kinds"] == {"state": 4} and rows[3]["downlink_kinds"] == {"relay": 4}
    assert rows[2]["downlink_payload_bytes"] < 4 * 4 * rows[0]["num_params"] / 2  # below the float32 state


def test_a_process_decodes_each_broadcast_state_once_yet_refuses_a_node_without_its_base(tmp_path, monkeypatch):
    """The clients of one process share a decoded lossless broadcast: ``downlink.receive``
    runs once per state the server sends, not once per client nor once per distinct blob
    (round 4 sends a delta and a self-contained blob of the same state: one decode). A node
    whose state is gone still gets the clear "base state" refusal when the state its delta
    leads to is already decoded in the process (it is wiped after another node of the round
    has decoded it)."""
    import hashlib

    import clients.received as client_module

    calls = []
    real_receive = client_module.downlink.receive

    def counting(blob, *args, **kwargs):
        raw = np.asarray(blob, dtype=np.uint8)
        target = client_module.envelope(raw, args[1]).target[0]
        calls.append((target, hashlib.blake2b(raw.tobytes()).hexdigest()))
        return real_receive(blob, *args, **kwargs)

    monkeypatch.setattr(client_module.downlink, "receive", counting)
    monkeypatch.setattr(client_module, "_RECEIVED", {})
    seen: dict[int, list[int]] = {}

    def app(message, context):
        round_ = int(message.content["config"]["server-round"])
        seen.setdefault(round_, []).append(context.node_id)
        if round_ == 3 and len(seen[round_]) == 2:  # another node of this round decoded the blob already
            for key in list(context.state.keys()):
                del context.state[key]
        return real_client_app(message, context)

    rows, _ = _run(tmp_path, "shared", client_app=app, method="edge-popup",
                   **{"num-rounds": 4, "downlink-codec": "lossless"})
    assert [r["failures"] for r in rows] == [0, 0, 1, 0]
    assert "base state" in rows[2]["failure_details"][0]["reason"]
    # rounds 1-3 each send one blob to every node (round 3's wiped node decodes it again and
    # fails); round 4 sends the wiped node a self-contained blob and the others a delta,
    # both of the state of round 3: decoded once
    targets = [target for target, _ in calls]
    assert targets == [0, 1, 2, 2, 3], calls
    assert calls[2] == calls[3]  # the wiped node was sent the blob the process had decoded
    assert sum(r["clients"] for r in rows) == 4 * 4 - 1


def test_fedpm_node_with_an_older_state_gets_this_rounds_counts_coded_against_it():
    """Partial participation: a FedPM node that last took part three rounds ago is sent one
    step, this round's counts coded with the contexts of the state it holds ("jump"),
    rather than every step since, the counts without context, or the float32 state. It is
    the shortest here (clients follow theta, so old and new counts are correlated), and the
    node decodes it to the server's state bit for bit."""
    config = resolve({**SMALL, "downlink-codec": "lossless"})
    aggregator = FedPMAggregator.from_config(config)
    rng = np.random.default_rng(4)
    state = _rng_state("bernoulli", rng)
    downlink = _downlink(aggregator, LAYOUT, "bernoulli", config, state)
    states = [state]
    for version in range(1, 6):
        masks = [{name: rng.random(value.shape) < value for name, value in state.items()} for _ in range(8)]
        result = _round(aggregator, version, state, masks, [1.0] * 8)
        _record(downlink, aggregator, version, state, result)
        state = result.state
        states.append(state)
    downlink.held[7] = 2
    blob, kind = downlink.message_for(7, states[-1])
    sizes = {name: downlink._blob(key, states[-1], (5, downlink.versions[5])).size
             for name, key in (("replay", 2), ("standalone", "standalone"), ("full", "full"))}
    assert kind == "jump" and blob.size < min(sizes.values()), (blob.size, sizes)
    held = Held(2, downlink.versions[2], states[2])
    got = receive(blob, LAYOUT, FP, held, lambda: states[0], aggregator.replay, Bernoulli().vote_contexts)
    assert got.version == 5 and all(np.array_equal(got.state[k], states[-1][k]) for k in states[-1])
    with pytest.raises(WireError, match="base state"):  # it is a replay from round 2: it needs that state
        receive(blob, LAYOUT, FP, Held(3, downlink.versions[3], states[3]), lambda: states[0], aggregator.replay,
                Bernoulli().vote_contexts)


def test_fedpm_node_holding_nothing_gets_the_counts_coded_against_the_seeds_state():
    """A FedPM node that holds nothing, in round 5, is sent this round's counts coded with
    the contexts of the seed's state (a "jump" from version 0, which every node
    regenerates): clients here keep following a theta near 0 or 1 from the seed's, so that
    beats the counts without context, every step since the seed, and the float32 state.
    A node holding nothing decodes it to the server's state bit for bit. In round 2 such a
    node gets no jump: the replay from the seed is that same single step."""
    config = resolve({**SMALL, "downlink-codec": "lossless"})
    aggregator = FedPMAggregator.from_config(config)
    rng = np.random.default_rng(6)
    layout = Layout((("a.weight", (200, 100)), ("b.bias", (7,))))
    seed_state = {n: np.where(rng.random(s) < 0.5, 0.05, 0.95).astype(np.float32) for n, s in layout.shapes}
    downlink = _downlink(aggregator, layout, "bernoulli", config, seed_state)
    states = [seed_state]
    for version in range(1, 5):
        # clients that learnt little: their masks follow the seed's theta, not the drifting global one
        masks = [{name: rng.random(value.shape) < value for name, value in seed_state.items()} for _ in range(8)]
        result = _round(aggregator, version, states[-1], masks, [1.0] * 8)
        _record(downlink, aggregator, version, states[-1], result)
        new_state = result.state
        states.append(new_state)
        if version == 1:
            assert downlink.message_for(9, new_state)[1] != "jump"  # round 2: the replay from 0 is the same step
    blob, kind = downlink.message_for(9, states[-1])
    target = (4, downlink.versions[4])
    sizes = {name: downlink._blob(key, states[-1], target).size
             for name, key in (("replay", 0), ("standalone", "standalone"), ("full", "full"))}
    assert kind == "jump" and blob.size < min(sizes.values()), (blob.size, sizes)
    got = receive(blob, layout, FP, None, lambda: seed_state, aggregator.replay, Bernoulli().vote_contexts)
    assert got.version == 4 and all(np.array_equal(got.state[k], states[-1][k]) for k in states[-1])


def test_vote_levels_node_that_missed_rounds_gets_the_state_coded_against_the_one_it_holds():
    """edge-popup with ``vote-levels`` (16 levels): the state takes at most L values and changes on few
    weights a round, so a node that last took part in round 2 of 8 is sent the current
    state itself, coded with the levels it holds as contexts ("state"), which is shorter
    than the six rounds of votes since, the state coded without context, or the float32
    state. It decodes to the server's state bit for bit, and only from the state it names."""
    config = resolve({**SMALL, "method": "edge-popup", "edge-popup-server-rule": "vote-levels",
                      "edge-popup-levels": 16, "downlink-codec": "lossless"})
    aggregator = EdgePopupAggregator.from_config(config)
    rng = np.random.default_rng(5)
    layout = Layout((("a.weight", (200, 100)), ("b.bias", (7,))))  # large enough for per-context tables to pay
    state = aggregator.initial_state({n: rng.normal(size=shape).astype(np.float32) for n, shape in layout.shapes})
    downlink = _downlink(aggregator, layout, "topk", config, state)
    states = [state]
    preference = {name: rng.random(value.shape) for name, value in state.items()}  # clients mostly agree
    for version in range(1, 9):
        masks = [{name: rng.random(value.shape) < 0.2 + 0.6 * preference[name] for name, value in state.items()}
                 for _ in range(8)]
        result = _round(aggregator, version, state, masks, [1.0] * 8)
        _record(downlink, aggregator, version, state, result)
        state = result.state
        states.append(state)
    assert downlink.few_valued
    downlink.held[7] = 2
    blob, kind = downlink.message_for(7, states[-1])
    target = (8, downlink.versions[8])
    sizes = {name: downlink._blob(key, states[-1], target).size
             for name, key in (("replay", 2), ("alone", ("state", None, 9)), ("full", "full"))}
    assert kind == "state" and blob.size < min(sizes.values()), (blob.size, sizes)
    held = Held(2, downlink.versions[2], states[2])
    contexts = TopK(config.density).vote_contexts
    got = receive(blob, layout, FP, held, lambda: states[0], aggregator.replay, contexts)
    assert got.version == 8 and all(got.state[k].tobytes() == states[-1][k].tobytes() for k in states[-1])
    with pytest.raises(WireError, match="base state"):
        receive(blob, layout, FP, Held(3, downlink.versions[3], states[3]), lambda: states[0], aggregator.replay,
                contexts)
    alone = downlink._blob(("state", None, 9), states[-1], target)  # any node can use it
    got = receive(alone, layout, FP, None, lambda: states[0], aggregator.replay, contexts)
    assert all(got.state[k].tobytes() == states[-1][k].tobytes() for k in states[-1])


def test_float_states_are_never_sent_as_state_steps():
    """vote-average's scores are floats that take more than 256 values per tensor: no state
    step is offered (the values' table alone would cost more than float32), only replays
    and full states."""
    config, aggregator, downlink, states = _server_rounds("topk", 3, **{"edge-popup-server-rule": "vote-average"})
    assert not downlink.few_valued
    downlink.held[4] = 1
    _, kind = downlink.message_for(4, states[-1])
    assert kind in ("replay", "full")
    assert not any(isinstance(key, tuple) and key[0] == "state" for key in downlink._plans)


def test_a_state_with_both_signed_zeros_is_not_sent_as_values():
    """np.unique merges -0.0 and 0.0, the digest does not: such a state must not go as a
    state step (the node would fail its digest check every round)."""
    assert few_valued({"w": np.array([0.0, 1.0, 2.0], np.float32)})
    assert not few_valued({"w": np.array([-0.0, 0.0, 1.0], np.float32)})
    assert not few_valued({"w": np.arange(257, dtype=np.float32)})


def test_a_state_step_with_values_float32_cannot_hold_is_refused():
    """A crafted state step whose table holds 1e300: a clear WireError, not a cast warning."""
    config = resolve({**SMALL, "method": "edge-popup", "edge-popup-server-rule": "vote-levels",
                      "downlink-codec": "lossless"})
    aggregator = EdgePopupAggregator.from_config(config)
    state = {name: np.full(shape, 1e300) for name, shape in LAYOUT.shapes}
    step = encode_state(1, bytes(8), state, LAYOUT, None)
    blob = replay_blob([step], FP, (0, bytes(8)), (1, bytes(8)))
    with pytest.raises(WireError, match="float32"):
        receive(blob, LAYOUT, FP, None, lambda: state, aggregator.replay, TopK(config.density).vote_contexts)


def test_after_a_round_without_replies_the_kept_state_is_filed_under_its_own_version():
    """Round 2 made no state (no replies): round 3's previous state is version 1's, and the
    server keeps it as version 1 (not 2), so a node holding version 1 gets the state coded
    against the levels it really holds."""
    config, aggregator, downlink, states = _server_rounds("topk", 1, **{"edge-popup-server-rule": "vote-levels"})
    rng = np.random.default_rng(9)
    masks = _masks("topk", states[1], rng, 5)
    result = _round(aggregator, 3, states[1], masks, [1.0] * 5)
    _record(downlink, aggregator, 3, states[1], result)
    new_state = result.state
    assert 2 not in downlink.kept_states and downlink.kept_states[1] is not None
    assert all(np.array_equal(downlink.kept_states[1][k], states[1][k]) for k in states[1])
    downlink.held[6] = 1
    blob, _ = downlink.message_for(6, new_state)
    got = _client(config, aggregator, "topk", [*states, new_state], blob, Held(1, downlink.versions[1], states[1]))
    assert got.version == 3 and all(np.array_equal(got.state[k], new_state[k]) for k in new_state)


def test_vote_levels_clients_train_from_the_levels_standardised():
    """The state is integer levels 0..L-1; a client starts training from them divided by
    their spread per tensor (the scale the other rules' scores have), with the same top-k.
    Under vote-average the client starts from the state as it is."""
    from clients.received import _new_broadcast, model_for
    from fedmask.core.masking import get_scores, topk_mask_np

    for rule in ("vote-levels", "vote-average"):
        config = resolve({**SMALL, "method": "edge-popup", "edge-popup-server-rule": rule})
        model, spec = model_for(config, "topk")
        assert spec is not None
        state = EdgePopupAggregator.from_config(config).initial_state(get_scores(model))
        scores = _new_broadcast(config, task.mode_of(config, "topk"), spec, state).scores
        for name, value in state.items():
            if rule == "vote-levels":
                assert value.max() > 2 and np.array_equal(value, np.rint(value))  # levels, not unit spread
                assert scores[name].std() == pytest.approx(1.0, rel=1e-4)
                assert np.array_equal(topk_mask_np(scores[name], 0.5), topk_mask_np(value, 0.5))
            else:
                assert np.array_equal(scores[name], value)


# ---------------------------------------------------------------- what a round costs the server


def _reference_section(votes: np.ndarray, contexts: np.ndarray | None, num_contexts: int) -> bytes:
    """A section as encode_votes coded it before the coding was split into shared parts
    (fedmask 3401d7a, verbatim but for the names): the bytes the split must reproduce."""
    import zlib

    from fedmask.wire import lossless as wire

    def table(values, hist):
        return zlib.compress(values.astype("<f8").tobytes() + (b"" if hist is None else hist.astype("<u4").tobytes()),
                             9)

    flat = np.ascontiguousarray(votes, dtype=np.float64).ravel()
    values, symbols = np.unique(flat, return_inverse=True)
    symbols = symbols.ravel()
    distinct = values.size
    if distinct <= 1:
        return wire._section(wire.MODEL_CONSTANT, distinct, table(values, None), b"")
    raw = symbols.astype(wire._raw_dtype(distinct)).tobytes()
    options = [(float(len(raw) + len(table(values, None))), wire.MODEL_RAW)]
    order0 = np.bincount(symbols, minlength=distinct)
    options.append((wire._ideal_bytes(order0) + wire._CODER_SLACK + len(table(values, order0)), wire.MODEL_ORDER0))
    if contexts is not None:
        hist = np.bincount(contexts * distinct + symbols, minlength=num_contexts * distinct).reshape(
            num_contexts, distinct)
        ideal = sum(wire._ideal_bytes(row) for row in hist) + wire._CODER_SLACK
        options.append((ideal + len(table(values, hist.ravel())), wire.MODEL_CONTEXT))
    model = min(options)[1]
    if model == wire.MODEL_RAW:
        return wire._section(model, distinct, table(values, None), raw)
    if model == wire.MODEL_ORDER0:
        return wire._section(model, distinct, table(values, order0), wire._range_code([(symbols, order0)]))
    order = np.argsort(contexts, kind="stable")
    positions = np.split(order, np.cumsum(hist.sum(axis=1))[:-1])
    groups = [(symbols[where], hist[c]) for c, where in enumerate(positions)]
    return wire._section(model, distinct, table(values, hist.ravel()), wire._range_code(groups))


@pytest.mark.parametrize("distinct", [1, 2, 11, 101, 300, 70000])
def test_symbols_coded_against_several_contexts_give_the_bytes_of_a_fresh_coding(distinct):
    """One tensor's symbols (:class:`Symbols`), coded against several contexts in turn, some
    indexed once and reused (:class:`ContextIndex`), give each time the bytes the coder gave
    when it coded every section from scratch: the constant, raw (u1, u2), order-0 and
    context models alike, whichever wins."""
    from fedmask.wire.lossless import ContextIndex, Symbols

    rng = np.random.default_rng(distinct)
    size = 80000
    votes = rng.integers(0, distinct, size).astype(np.float64) / 7.0
    votes[rng.random(size) < 0.5] = 0.0  # skewed: the coded models pay
    symbols = Symbols(votes)
    for num_contexts in (1, 3, 32, 300, 70000):  # 300 and 70000: the 16-bit and 64-bit sorts of contexts
        if num_contexts * distinct > 2e6:  # the histogram would not fit: no method has such contexts
            continue
        contexts = np.minimum(rng.integers(0, num_contexts, size), (votes * 7).astype(np.int64) % num_contexts)
        index = ContextIndex(contexts, num_contexts)
        expected = _reference_section(votes, contexts, num_contexts)
        assert symbols.section(index) == expected
        assert symbols.section(index) == expected  # the index reused
        assert encode_votes(votes, contexts, num_contexts) == expected
    assert symbols.section(None) == _reference_section(votes, None, 1) == encode_votes(votes, None, 1)


def _many_bases(mode: str, rounds: int, **extra):
    """A server after ``rounds`` aggregations, with one node holding each version (and one
    holding nothing): node 100 + v holds version v, node 99 nothing."""
    config, aggregator, downlink, states = _server_rounds(mode, rounds, **extra)
    nodes = [99, *[100 + v for v in range(rounds + 1)]]
    downlink.held.update({100 + v: v for v in range(rounds + 1)})
    return config, aggregator, downlink, states, nodes


@pytest.mark.parametrize(("mode", "extra"), [("bernoulli", {}), ("topk", {"edge-popup-server-rule": "vote-levels"}),
                                             ("bernoulli", {"fedpm-prior-reset": 3})])
def test_every_node_gets_the_shortest_of_its_options_sized_without_building_them(mode, extra):
    """With every held state coded exactly, each node gets the first of the shortest of its
    options, as when the server built every option's bytes to compare them; an option's
    size, computed without building it, is the size of its bytes."""
    config, aggregator, downlink, states, nodes = _many_bases(mode, 7, **extra)
    downlink.exact_bases = len(nodes)
    got = downlink.messages_for(nodes, states[-1])
    target = (downlink.current, downlink.versions[downlink.current])
    exact = set(range(len(nodes)))
    kinds = set()
    for node, (blob, kind) in zip(nodes, got):
        built = [(downlink._blob(key, states[-1], target), kind) for kind, key in downlink._options(node, exact)]
        for (_, key), (option, _) in zip(downlink._options(node, exact), built):
            assert downlink._size(key, states[-1], target) == option.size, key
        best = min(built, key=lambda pair: pair[0].size)
        assert kind == best[1] and blob.tobytes() == best[0].tobytes(), node
        kinds.add(kind)
        held = None if node == 99 else Held(node - 100, downlink.versions[node - 100], states[node - 100])
        assert _client(config, aggregator, mode, states, blob, held).digest == target[1]
    assert len(kinds) > 1, kinds  # more than one kind was in play


def test_relayed_uploads_are_sized_without_building_and_sent_when_shortest():
    """A relay (the uploads of every round since the state a node holds) is one more option
    of a round's broadcasts: sized without building it, the size of its bytes, and picked
    when it is the shortest; its bytes are the relays since the node's state."""
    from fedmask.wire.lossless import encode_relay

    _, _, downlink, states, nodes = _many_bases("bernoulli", 4)
    for version in range(1, 5):  # tiny uploads: the relay beats every coding of the votes
        downlink.relays[version] = encode_relay(version, downlink.versions[version], [(0, 1.0, b"u" * version)], 1.0)
    target = (downlink.current, downlink.versions[downlink.current])
    got = downlink.messages_for(nodes, states[-1])
    exact = {0, 1, 2, 3, 4}
    for node, (blob, kind) in zip(nodes, got):
        held = 0 if node == 99 else node - 100  # a node that holds nothing starts from the seed's state
        if held == downlink.current:
            assert kind == "replay"
            continue
        assert ("relay", ("relay", held)) in downlink._options(node, exact)
        assert downlink._size(("relay", held), states[-1], target) == blob.size
        assert kind == "relay", node
        steps = [downlink.relays[v] for v in range(held + 1, 5)]
        assert blob.tobytes() == replay_blob(steps, FP, (held, downlink.versions[held]), target).tobytes()


def test_older_held_states_get_one_fast_coding_that_decodes_and_costs_a_few_bytes_more():
    """Nodes holding many different states: the two most recent (and the seed's) get every
    option, tables at zlib level 9, exactly as before; every older one gets one coding
    against it (FedPM: the jump), its context tables compressed faster. Each node still
    decodes the server's state bit for bit, gets the same kind of broadcast, and its bytes
    grow by under 1%."""
    from fedmask import downlink as protocol

    config, aggregator, downlink, states, nodes = _many_bases("bernoulli", 9)
    layout = _layout("bernoulli")
    downlink.exact_bases = len(nodes)
    exact = downlink.messages_for(nodes, states[-1])
    downlink.exact_bases = 2
    downlink._plans, downlink._blobs = {}, {}
    coded = []
    real_state, real_step = protocol.encode_state, protocol.encode_step
    protocol.encode_state = lambda *a, **k: coded.append(("state", a[4] is not None, a[5] if len(a) > 5 else 9)) or \
        real_state(*a, **k)
    protocol.encode_step = lambda *a, **k: coded.append(("step", a[5] is not None, a[6] if len(a) > 6 else 9)) or \
        real_step(*a, **k)
    try:
        fast = downlink.messages_for(nodes, states[-1])
    finally:
        protocol.encode_state, protocol.encode_step = real_state, real_step
    target = (downlink.current, downlink.versions[downlink.current])
    for node, (blob, kind), (before, before_kind) in zip(nodes, fast, exact):
        assert kind == before_kind
        assert before.size <= blob.size < 1.01 * before.size
        held = None if node == 99 else Held(node - 100, downlink.versions[node - 100], states[node - 100])
        got = receive(blob, layout, FP, held, lambda: states[0], aggregator.replay, Bernoulli().vote_contexts)
        assert got.digest == target[1]
    older = range(1, 8)  # versions 8 and 9 are the two most recent held, 0 the seed's: all exact
    fast_codings = [c for c in coded if c[2] != 9]
    assert len(fast_codings) == len(older) and all(c[0] == "step" for c in fast_codings)


def test_kept_contexts_are_indexed_once_and_evicted_beyond_their_budget(monkeypatch):
    """A kept state's contexts are indexed once and reused across rounds; the indexes kept
    stay within KEPT_INDEX_BYTES (the least recently used go first)."""
    from fedmask import downlink as protocol

    _, _, downlink, states, nodes = _many_bases("bernoulli", 6)
    first = downlink._index("votes", 2)
    assert downlink._index("votes", 2) is first
    one = downlink._indexes[("votes", 2)][1]
    monkeypatch.setattr(protocol, "KEPT_INDEX_BYTES", 3 * one)
    for version in (3, 4, 5, 1):
        downlink._index("votes", version)
    assert list(downlink._indexes) == [("votes", 4), ("votes", 5), ("votes", 1)]
    assert downlink._index_bytes == sum(size for _, size in downlink._indexes.values()) <= 3 * one
