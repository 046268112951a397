"""Tests for issue 11 (scale): the fast Bernoulli sample, closed-form code lengths and the
lengths measured while decoding, streaming aggregation (fold/finish) against the votes of
the list, the per-client switch, the broadcast cache, and the batched engine against
one client at a time."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedmask import task
from fedmask.api import check_engine, config_from
from fedmask.config import ConfigError, resolve
from fedmask.core.masking import get_scores
from fedmask.methods.base import MaskAggregator
from fedmask.methods.biprop import BipropAggregator
from fedmask.methods.edge_popup import EdgePopupAggregator, TopK
from fedmask.methods.fedpm import Bernoulli, FedPMAggregator, bernoulli_sample, fedpm_theta
from fedmask.methods.slot_machines import SlotMachineAggregator
from fedmask.methods.votes import VoteRule, robust_vote
from fedmask.protocol.instruction import TrainInstruction
from fedmask.protocol.placement import TRAINED_RECORD
from fedmask.wire import masks as codec
from fedmask.wire.frame import Layout
from fedmask.wire.masks import code_lengths, decode_masks, encode_masks

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"a.weight": (40, 30), "a.bias": (40,), "b.weight": (3, 7, 5)}


# ------------------------------------------------------------------ Bernoulli sample

@pytest.mark.parametrize("size", [1, 15, 16, 17, 4097, 235_200])
@pytest.mark.parametrize("seed", [0, 7])
def test_fast_bernoulli_sample_is_torch_bernoulli_bit_for_bit(size, seed):
    """bernoulli_sample (rand < p) gives exactly torch.bernoulli's bits from the same generator
    state, and leaves the generator where torch.bernoulli leaves it (two draws in a row)."""
    probs = torch.rand(size, generator=torch.Generator().manual_seed(seed + 100))
    probs[::5], probs[1::7] = 0.0, 1.0
    torch.manual_seed(seed)
    expected = [torch.bernoulli(probs), torch.bernoulli(probs)]
    torch.manual_seed(seed)
    got = [bernoulli_sample(probs), bernoulli_sample(probs)]
    assert all(torch.equal(e, g) for e, g in zip(expected, got))
    gen = torch.Generator().manual_seed(seed)
    assert torch.equal(bernoulli_sample(probs, gen), expected[0])


# ------------------------------------------------------------------ code lengths

def _reference_bits(bits: np.ndarray, probs) -> float:
    p_bit = np.where(bits, probs, 1.0 - np.asarray(probs, dtype=np.float64))
    return float(-np.log2(np.maximum(p_bit, 1e-300)).sum())


@pytest.mark.parametrize("prior_kind", ["soft", "hard", "mixed", None])
def test_closed_form_candidates_equal_the_per_bit_sums(prior_kind):
    """Every candidate's ideal length equals the sum of -log2 p(bit) over the tensor (the
    definition) to 1e-9 relative, for soft (FedPM), hard (top-k) and mixed priors."""
    rng = np.random.default_rng(1)
    bits = rng.random(5000) < 0.3
    prior = {"soft": rng.random(5000), "hard": (rng.random(5000) < 0.3).astype(float),
             "mixed": np.where(rng.random(5000) < 0.5, rng.random(5000), 1.0), None: None}[prior_kind]
    for model, param, length in codec.section_candidates(bits, prior):
        if model == codec.MODEL_FREQUENCY:
            expected = _reference_bits(bits, codec._frequency_probs(param, bits.size))
        elif model == codec.MODEL_SIDE:
            expected = _reference_bits(bits, codec._side_probs(prior, param))
        else:
            expected = 8.0 * math.ceil(bits.size / 8)
        assert length == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("mode", ["bernoulli", "topk"])
def test_lengths_measured_while_decoding_equal_code_lengths(mode):
    """decode_masks(..., lengths) reports the ideal and formula bits that the separate
    second pass (code_lengths) computes, for the mask it decodes."""
    rng = np.random.default_rng(2)
    layout = Layout.from_arrays({k: np.zeros(s) for k, s in SHAPES.items()})
    state = {k: rng.random(s).astype(np.float32) for k, s in SHAPES.items()}
    prior = (Bernoulli() if mode == "bernoulli" else TopK(0.4)).prior(state)
    masks = {k: rng.random(s) < (state[k] if mode == "bernoulli" else 0.4) for k, s in SHAPES.items()}
    blob = encode_masks(masks, layout, b"12345678", "entropy", prior)
    lengths: dict[str, float] = {}
    decoded = decode_masks(blob, layout, b"12345678", prior, lengths)
    assert all(np.array_equal(decoded[k], masks[k]) for k in masks)
    reference = code_lengths(masks, layout, "entropy", prior)
    assert lengths["ideal_bits"] == pytest.approx(reference["ideal_bits"], rel=1e-12)
    assert lengths["formula_bits"] == pytest.approx(reference["formula_bits"], rel=1e-12)


# ------------------------------------------------------------------ streaming aggregation

def _masks(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.random(s) < rng.random() for k, s in SHAPES.items()} for _ in range(n)]


def _fold_finish(aggregator: MaskAggregator, state, masks, weights, server_round=1):
    for mask, weight in zip(masks, weights):
        aggregator.fold(server_round, state, mask, weight)
    return aggregator.finish(server_round, state)


@pytest.mark.parametrize("rule", ["none", "trimmed", "median"])
@pytest.mark.parametrize("cls", [EdgePopupAggregator, BipropAggregator])
def test_streamed_votes_equal_the_list_votes_bit_for_bit(cls, rule):
    """Folding each mask in order then finishing gives exactly robust_vote's votes of the
    whole list (the function plug-ins use), and the state is the rule's replay of them, two
    rounds running, for every robust rule."""
    config = resolve({"robust-aggregation": rule, "trim-fraction": 0.2})
    rng = np.random.default_rng(3)
    weights = [float(w) for w in rng.integers(1, 100, 9)]
    stream = cls.from_config(config)
    state = {k: rng.random(s).astype(np.float32) for k, s in SHAPES.items()}
    for server_round in (1, 2):
        masks = _masks(9, server_round)
        votes = robust_vote(masks, weights, VoteRule.from_config(config))
        got = _fold_finish(stream, state, masks, weights, server_round)
        assert got.clients == 9 and all(np.array_equal(votes[k], got.votes[k]) for k in votes)
        expected = stream.replay(state, votes, 9)
        assert all(np.array_equal(expected[k], got.state[k]) and got.state[k].dtype == np.float32 for k in expected)
        state = got.state


@pytest.mark.parametrize("rule", ["none", "trimmed", "median"])
def test_streamed_fedpm_counts_equal_the_list_and_the_prior_carries_over(rule):
    """FedPM folds unweighted counts of ones: finish's votes are robust_vote's shares of the
    list (every client weighing 1) times the clients, and with the prior never reset
    (fedpm-prior-reset 0) round 2's theta is the posterior mode of both rounds' counts."""
    config = resolve({"robust-aggregation": rule, "trim-fraction": 0.2, "fedpm-prior-reset": 0})
    rng = np.random.default_rng(3)
    weights = [float(w) for w in rng.integers(1, 100, 9)]
    stream = FedPMAggregator.from_config(config)
    state = {k: rng.random(s).astype(np.float32) for k, s in SHAPES.items()}
    ones = {k: np.zeros(s) for k, s in SHAPES.items()}
    for server_round in (1, 2):
        masks = _masks(9, server_round)
        shares = robust_vote(masks, [1.0] * 9, VoteRule.from_config(config))
        got = _fold_finish(stream, state, masks, weights, server_round)
        assert got.clients == 9 and all(np.array_equal(shares[k] * 9, got.votes[k]) for k in shares)
        for k in ones:
            ones[k] = ones[k] + shares[k] * 9
            expected = fedpm_theta(ones[k], 9 * server_round - ones[k], config.fedpm_eps)
            assert np.array_equal(expected, got.state[k]) and got.state[k].dtype == np.float32
        state = got.state


def test_streaming_slot_machines_counts_every_candidate():
    """Slot Machines stream per-candidate votes: finish's votes are the clients' weighted
    histogram of choices (the share choosing each candidate, summed in client order), bit
    for bit, and the state is the rule's replay of them."""
    config = resolve({"method": "slot-machines", "slots": 5, "init": "kaiming-uniform"})
    rng = np.random.default_rng(4)
    state = {k: rng.standard_normal((5, *s)).astype(np.float32) for k, s in SHAPES.items()}
    choices = [{k: rng.integers(0, 5, s).astype(np.uint8) for k, s in SHAPES.items()} for _ in range(6)]
    weights = [3.0, 1.0, 2.0, 5.0, 1.0, 1.0]
    aggregator = SlotMachineAggregator.from_config(config)
    got = _fold_finish(aggregator, state, choices, weights)
    for k, shape in SHAPES.items():
        histogram = np.zeros((5, *shape))
        for choice, weight in zip(choices, weights):
            histogram += (np.arange(5).reshape(-1, *[1] * len(shape)) == choice[k][None]) * weight
        assert np.array_equal(histogram / sum(weights), got.votes[k])
    expected = aggregator.replay(state, got.votes, len(choices))
    assert all(np.array_equal(expected[k], got.state[k]) for k in expected)


def test_plugin_with_only_aggregate_gets_the_masks_through_the_default_fold():
    """A plug-in that defines only aggregate receives every folded mask and weight, in order;
    discard forgets what was folded."""
    seen = []

    class Recording(MaskAggregator):
        def aggregate(self, server_round, state, masks, weights):
            seen.append((masks, weights))
            return state

    plugin, masks = Recording(resolve({})), _masks(3, 5)
    plugin.fold(1, {}, masks[0], 9.0)
    plugin.discard()
    _fold_finish(plugin, {}, masks, [1.0, 2.0, 3.0])
    assert seen[0][1] == [1.0, 2.0, 3.0] and seen[0][0] == masks


def test_finish_without_fold_is_a_clear_error():
    """A built-in rule asked to finish a round with nothing folded says so."""
    with pytest.raises(ValueError, match="nothing was folded"):
        FedPMAggregator.from_config(resolve({})).finish(1, {})


# ------------------------------------------------------------------ run-level switches and caches

def test_per_client_false_keeps_rounds_small(tmp_path):
    """per-client = false writes an empty per_client list; the totals stay."""
    import fedmask

    result = fedmask.simulate({"num-clients": 3, "clients-per-round": 3, "num-rounds": 1, "per-client": False},
                              engine="inprocess", out=tmp_path / "r")
    assert result.rounds[0]["per_client"] == [] and result.rounds[0]["uplink_payload_bytes"] > 0


def test_broadcast_is_decoded_once_per_distinct_arrays():
    """Equal broadcast bytes in new array objects hit the cache (the same Broadcast object);
    other bytes decode anew."""
    from clients.received import broadcast_of, model_for

    config = resolve({})
    mode = task.mode_of(config, "bernoulli")
    _, spec = model_for(config, "bernoulli")
    rng = np.random.default_rng(6)
    state = {name: rng.random(shape).astype(np.float32) for name, shape in spec.layout.shapes}
    first = broadcast_of(config, mode, spec, state)
    again = broadcast_of(config, mode, spec, {k: v.copy() for k, v in state.items()})
    other = broadcast_of(config, mode, spec, {k: v * 0.5 for k, v in state.items()})
    assert again is first and other is not first
    assert np.allclose(first.scores[spec.layout.shapes[0][0]],
                       np.log(state[spec.layout.shapes[0][0]] / (1 - state[spec.layout.shapes[0][0]])), atol=1e-4)


def test_arrays_key_is_equal_only_for_the_same_names_dtypes_shapes_and_bytes():
    """ArraysKey hashes a sample of the bytes but compares all of them: a change in one byte the
    sample skips, a -0.0 for a 0.0, another dtype, shape or name each make a different key."""
    from clients.received import _SAMPLE_STRIDE, ArraysKey

    rng = np.random.default_rng(3)
    arrays = {"b": rng.random((300, 50)).astype(np.float32), "a": np.zeros(7, np.float32)}
    key = ArraysKey(arrays)
    same = ArraysKey({k: v.copy() for k, v in reversed(arrays.items())})
    assert key == same and hash(key) == hash(same) and key == key.kept()
    one_byte = {k: v.copy() for k, v in arrays.items()}
    one_byte["b"].reshape(-1).view(np.uint8)[1] ^= 1  # byte 1: not in the hash's sample (stride > 1)
    assert _SAMPLE_STRIDE > 1 and hash(ArraysKey(one_byte)) == hash(key) and ArraysKey(one_byte) != key
    negative_zero = {**arrays, "a": -np.zeros(7, np.float32)}
    assert ArraysKey(negative_zero) != key  # equal as numbers, not as bytes
    assert ArraysKey({**arrays, "a": np.zeros(7, np.int32)}) != key
    assert ArraysKey({**arrays, "b": arrays["b"].reshape(50, 300)}) != key
    assert ArraysKey({"c": arrays["a"], "b": arrays["b"]}) != key
    kept = key.kept()
    arrays["a"][0] = 1.0  # the owner changes its arrays: the kept copy does not follow
    assert kept != ArraysKey(arrays) and not kept.arrays[0][1].flags.writeable


# ------------------------------------------------------------------ batched engine

@pytest.mark.parametrize("overrides", [{"method": "slot-machines", "init": "kaiming-uniform"}, {"method": "fedavg"},
                                       {"model": "conv2"}])
def test_batched_engine_refuses_what_it_does_not_support(overrides):
    """A ConfigError naming the engine (and the method or model) before anything runs."""
    config = resolve({"model": "mlp", **overrides})
    with pytest.raises(ConfigError, match="engine: 'batched'"):
        check_engine(config, "batched")


def _round_uploads(grid_cls, config, pids):
    from clients.client_app import app
    from server.strategies import state_record

    method = config.method_entry
    mode = task.mode_of(config, method.mask_mode)
    model = task.make_model(config, task.splits_of(config), mode)
    spec = task.ModelSpec.of(config, model, mode)
    state = method.make_aggregator(config).initial_state(get_scores(model))
    grid = grid_cls(app, config.num_clients)
    record = state_record(state)
    if config.downlink_codec == "lossless":  # the seed's state as every node is sent it in round 1
        from fedmask.downlink import RECORD, LosslessDownlink

        sender = LosslessDownlink.create(spec.layout, spec.fingerprint, mode.vote_contexts, True, False, state)
        record = ArrayRecord({RECORD: Array(sender.message_for(1001, state)[0])})
    messages = [Message(RecordDict({"arrays": record, "config": ConfigRecord(
        TrainInstruction(config, 1, pid, method.mask_mode).to_flat())}), dst_node_id=1001 + pid,
        message_type=MessageType.TRAIN, group_id="1") for pid in pids]
    replies = list(grid.pull_messages(list(grid.push_messages(messages))))
    assert not any(r.has_error() for r in replies), [r.error.reason for r in replies if r.has_error()]
    if config.downlink_codec == "lossless":  # every node says it holds the state it was sent
        from fedmask.downlink import CONFIRM

        assert all(r.content.config_records[CONFIRM]["version"] == 0 for r in replies)
    prior = mode.prior(state)
    return [(decode_masks(r.content.array_records["arrays"]["mask"].numpy(), spec.upload, spec.fingerprint, prior,
                          bind=(1, int(r.content.config_records[TRAINED_RECORD]["partition-id"]))),
             dict(r.content.metric_records["metrics"])) for r in replies]


@pytest.mark.parametrize("method, optimizer", [
    ("fedpm", {}), ("edge-popup", {}), ("biprop", {}),
    ("edge-popup", {"optimizer": "sgd", "lr": 0.05, "weight-decay": 0.001}),
    ("fedpm", {"optimizer": "sgd", "momentum": 0.0}),
    ("fedpm", {"downlink-codec": "lossless"}), ("edge-popup", {"downlink-codec": "lossless"}),
])
def test_batched_clients_match_one_at_a_time(method, optimizer):
    """After one round, every client's uploaded mask from the batched engine agrees with the
    one-at-a-time engine's on at least 99.9% of entries (same seeds), and so do the metrics;
    the clients' partitions have different sizes (Dirichlet), so batches are ragged. Adam, and
    SGD with and without momentum (the fused kernels' three paths); the float32 broadcast, and
    the lossless one, which each node receives by its own Context and confirms."""
    from engines.batched import BatchedGrid
    from engines.inprocess import InProcessGrid

    # uploads coded exactly ('entropy'): relative-entropy's pick among candidates turns a rounding
    # difference in one probability into a different sample for its whole block
    config = config_from({"method": method, "downlink-codec": "float32", **optimizer, "num-clients": 12,
                          "partitioner": "dirichlet", "local-epochs": 2, "batch-size": 16, "model": "mlp",
                          "uplink-codec": "entropy"})
    pids = [0, 3, 4, 7, 11]
    alone, together = _round_uploads(InProcessGrid, config, pids), _round_uploads(BatchedGrid, config, pids)
    for (mask_a, metrics_a), (mask_b, metrics_b) in zip(alone, together):
        agree = np.mean(np.concatenate([(mask_a[k] == mask_b[k]).ravel() for k in mask_a]))
        assert agree >= 0.999
        assert metrics_a["num-examples"] == metrics_b["num-examples"]
        assert metrics_a["train-loss"] == pytest.approx(metrics_b["train-loss"], rel=1e-3)


def test_batched_engine_runs_a_whole_run_with_faults(tmp_path):
    """fedmask.simulate(engine='batched') finishes, and dropped/crashed clients are recorded
    as failures exactly as on the in-process engine (same kinds, same partitions)."""
    import fedmask

    base = {"num-clients": 8, "clients-per-round": 8, "num-rounds": 2, "fault-drop-rate": 0.2,
            "fault-crash-rate": 0.2, "downlink-codec": "float32"}
    runs = {engine: fedmask.simulate(base, engine=engine, out=tmp_path / engine) for engine in ("inprocess", "batched")}
    kinds = {e: [[(f["kind"], f["partition_id"]) for f in row["failure_details"]] for row in r.rounds]
             for e, r in runs.items()}
    assert kinds["batched"] == kinds["inprocess"] and any(kinds["batched"])
    assert runs["batched"].finished


def test_batched_engine_sends_the_lossless_downlink_as_the_inprocess_engine(tmp_path):
    """The quickstart's default lossless downlink on the batched engine (README's command): it
    runs, every node confirms the state it was sent (no failure), and the bytes down are the
    in-process engine's to within the batched matmul's rounding (a few masks differ), far below
    the float32 state's; accuracy follows the in-process run's."""
    import fedmask

    check_engine(resolve({"model": "mlp", "downlink-codec": "lossless"}), "batched")  # no ConfigError
    base = {"num-clients": 6, "clients-per-round": 4, "num-rounds": 3}
    runs = {engine: fedmask.simulate(ROOT / "configs" / "quickstart.toml", engine=engine, out=tmp_path / engine,
                                     **base) for engine in ("inprocess", "batched")}
    batched, alone = runs["batched"].rounds, runs["inprocess"].rounds
    assert all(row["failures"] == 0 for row in batched) and runs["batched"].finished
    assert [sum(r["downlink_kinds"].values()) for r in batched] == [4, 4, 4]
    float32_down = 4 * 4 * batched[0]["num_params"]  # four nodes sent the float32 state
    for b, a in zip(batched[1:], alone[1:]):
        assert b["downlink_payload_bytes"] == pytest.approx(a["downlink_payload_bytes"], rel=0.05)
        assert b["downlink_payload_bytes"] < float32_down / 4
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=0.05)


def test_scale_bench_keeps_each_engines_fastest_run_and_largest_peak():
    """With --repeats, a table row is the engine's fastest run of the setting, its peak memory
    the largest of its runs, and every run's s/round is kept beside it."""
    from bench.scale import _row

    rows = [{"engine": "inprocess", "num_clients": 10, "clients_per_round": 2, "s_per_round": 3.0, "peak_mb": 900},
            {"engine": "plain", "num_clients": 10, "clients_per_round": 2, "s_per_round": 2.0, "peak_mb": 700},
            {"engine": "inprocess", "num_clients": 10, "clients_per_round": 2, "s_per_round": 2.5, "peak_mb": 800},
            {"engine": "inprocess", "num_clients": 99, "clients_per_round": 2, "s_per_round": 1.0, "peak_mb": 5}]
    best = _row(rows, "inprocess", 10, 2)
    assert best is not None and best["s_per_round"] == 2.5 and best["peak_mb"] == 900
    assert best["all_s_per_round"] == [3.0, 2.5] and _row(rows, "ray", 10, 2) is None


def test_plain_loop_reports_the_elapsed_time_after_each_round():
    """The plain loop's clock after every round, increasing, so benches can leave out round 1."""
    from bench.plain_loop import run_plain

    out = run_plain(resolve({"num-rounds": 2, "num-clients": 2, "clients-per-round": 2}))
    assert len(out["elapsed_s"]) == len(out["accuracy"]) == 2
    assert 0 < out["elapsed_s"][0] < out["elapsed_s"][1] <= out["wall_s"]


@pytest.mark.parametrize("method", [
    {"method": "fedpm", "eval-mask": "sample"},
    {"method": "edge-popup", "edge-popup-server-rule": "vote-levels"},
])
def test_plain_loop_reaches_the_engines_accuracy_every_round(method, tmp_path):
    """bench/plain_loop.py is the engines' work without Flower: for a mask method with an exact
    downlink (here lossless), from the same config and seeds it gives the in-process engine's
    test accuracy after every round. FedPM evaluates a
    sampled mask here (seeded by the round, as the server seeds it); edge-popup's vote-levels
    needs the clients' standardised starting scores (the integer levels as raw scores train
    differently)."""
    import fedmask
    from bench.plain_loop import run_plain

    # the plain loop aggregates each client's own sample: the engine's uploads coded exactly
    settings = {**method, "num-rounds": 3, "num-clients": 4, "clients-per-round": 2, "uplink-codec": "entropy"}
    plain = run_plain(resolve(settings))
    engine = fedmask.simulate(settings, engine="inprocess", out=tmp_path / "run")
    assert plain["accuracy"] == engine.accuracy


def test_fused_kernels_take_floating_point_tensors_only():
    """optimizers.fusable: floating-point CPU tensors of one dtype yes; an empty list, an integer
    tensor or a float32/float64 mix (which torch.optim would split into two kernel calls) no; and
    both optimizers refuse what fusable refuses."""
    from fedmask.core.optimizers import FusedAdam, FusedSGD, fusable

    assert fusable([torch.zeros(3), torch.zeros(2, 2)])
    assert fusable([torch.zeros(3, dtype=torch.float64)])
    assert not fusable([]) and not fusable([torch.zeros(3), torch.zeros(3, dtype=torch.int64)])
    assert not fusable([torch.zeros(3), torch.zeros(3, dtype=torch.float64)])
    for make in (lambda ps: FusedAdam(ps, lr=0.1), lambda ps: FusedSGD(ps, lr=0.1)):
        with pytest.raises(ValueError, match="floating-point"):
            make([torch.zeros(3, dtype=torch.int64)])


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_fused_optimizers_give_torch_optims_bits(kind):
    """Three steps of FusedAdam equal torch.optim.Adam(fused=True), and of FusedSGD
    torch.optim.SGD(fused=True) with momentum, bit for bit (weight decay on; one tensor without
    a gradient in the second step stays where it is, as in torch)."""
    from fedmask.core.optimizers import FusedAdam, FusedSGD

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(7, 5, generator=gen), torch.randn(5, generator=gen)]
    grads = [[torch.randn(t.shape, generator=gen) for t in start] for _ in range(3)]
    ends = []
    for ours in (True, False):
        params = [t.clone().requires_grad_(True) for t in start]
        if kind == "adam":
            opt: Any = FusedAdam(params, lr=0.1, weight_decay=0.01) if ours else \
                torch.optim.Adam(params, lr=0.1, weight_decay=0.01, fused=True)
        else:
            opt = FusedSGD(params, lr=0.05, momentum=0.9, weight_decay=0.01) if ours else \
                torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01, fused=True)
        for step, grad in enumerate(grads):
            opt.zero_grad()
            for p, g in zip(params, grad):
                if not (step == 1 and p.dim() == 1):
                    p.grad = g.clone()
            opt.step()
        ends.append([p.detach() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*ends))
    assert not torch.equal(ends[0][0], start[0])


def test_local_training_does_not_import_torch_dynamo():
    """A client's local round (fedmask.task.train, Adam and SGD) leaves torch._dynamo unimported:
    torch.optim's first use imports it (about 2.6 s in every process that trains)."""
    import subprocess
    import sys

    code = """
import sys, torch
from fedmask import task
from fedmask.config import resolve
for optimizer in ("adam", "sgd"):
    config = resolve({"method": "fedpm", "optimizer": optimizer})
    splits = task.splits_of(config)
    mode = task.mode_of(config, "bernoulli")
    model = task.make_model(config, splits, mode)
    task.train(model, splits.x_train[:40], splits.y_train[:40], config, torch.device("cpu"), seed=1, mode=mode)
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "False"
