"""Slot Machines: K seeded candidates per connection, a choice per connection, choices uploaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clients.client_app import app as client_app
from engines.inprocess import InProcessGrid
from fedmask.config import ConfigError, load, resolve
from fedmask.core.masking import frozen_weights, get_scores, score_masks, set_scores, to_masked
from fedmask.methods import get_method
from fedmask.methods.slot_machines import (
    SlotMachineAggregator,
    Slots,
    choices_to_planes,
    planes_to_choices,
    slot_bits,
    slot_index,
)
from fedmask.wire.frame import Layout, WireError
from fedmask.wire.masks import HEADER_BYTES, SECTION_BYTES, decode_masks, encode_masks
from server.server_app import run_server

ROOT = Path(__file__).resolve().parents[1]


def _mode(slots: int = 8, selection: str = "greedy") -> Slots:
    return Slots(slots=slots, selection=selection, eval_mask="threshold")


def _layer(seed: int = 0, slots: int = 8, selection: str = "greedy") -> nn.Module:
    return to_masked(nn.Sequential(nn.Linear(6, 4)), _mode(slots, selection), seed=seed, init="kaiming-uniform")


def test_forward_uses_the_best_scored_candidate():
    model = _layer()
    slot = score_masks(model)["0.weight"]
    assert slot.candidates.shape == (8, 4, 6) and slot.scores.shape == (8, 4, 6)
    index = slot.scores.detach().argmax(dim=0)
    expected = slot.candidates.gather(0, index.unsqueeze(0)).squeeze(0)
    assert torch.equal(model[0].weight, expected)
    assert np.array_equal(_mode().choices(model)["0.weight"], index.numpy())


def test_candidates_are_distinct_seeded_values():
    a, b, c = _layer(5), _layer(5), _layer(6)
    fa, fb, fc = frozen_weights(a)["0.weight"], frozen_weights(b)["0.weight"], frozen_weights(c)["0.weight"]
    assert torch.equal(fa, fb) and not torch.equal(fa, fc)
    assert len(torch.unique(fa)) == fa.numel()  # K different values per connection, not signs
    bound = math.sqrt(6.0 / 6)
    assert fa.abs().max() <= bound


def test_gradient_reaches_every_candidate_score():
    """Straight-through: d loss / d score_k = d loss / d w * candidate_k, for every k."""
    model = _layer(3)
    x = torch.randn(5, 6)
    model(x).pow(2).sum().backward()
    slot = score_masks(model)["0.weight"]
    weight = model[0].weight.detach().requires_grad_(True)
    torch.nn.functional.linear(x, weight, model[0].bias.detach()).pow(2).sum().backward()
    expected = weight.grad.unsqueeze(0) * slot.candidates
    assert torch.allclose(slot.scores.grad, expected, atol=1e-6)
    assert (slot.scores.grad != 0).float().mean() > 0.9


def test_slot_index_matches_argmax_first_on_ties():
    scores = torch.randn(8, 50)
    scores[3, :10] = scores[5, :10] = 100.0  # a tie: the first maximum wins, as numpy's argmax
    assert torch.equal(slot_index(scores, sample=False), scores.argmax(dim=0))
    assert (slot_index(scores, sample=False)[:10] == 3).all()
    assert np.array_equal(slot_index(scores, False).numpy(), np.argmax(scores.numpy(), axis=0))


def test_probabilistic_choice_follows_the_softmax():
    scores = torch.tensor([[0.0], [math.log(3.0)]]).expand(2, 20000).contiguous()  # p = 1/4, 3/4
    torch.manual_seed(0)
    share = slot_index(scores, sample=True).float().mean().item()
    assert abs(share - 0.75) < 0.02


def test_probabilistic_sampling_is_seeded():
    mode = _mode(selection="probabilistic")
    model = _layer(selection="probabilistic")
    torch.manual_seed(11)
    first = mode.upload(model)
    torch.manual_seed(11)
    again = mode.upload(model)
    assert set(first) == set(again) and all(np.array_equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("slots", [2, 3, 8, 13, 64])
def test_choices_round_trip_through_both_codecs(slots):
    """Indices -> ceil(log2 K) planes -> packed or entropy-coded blob -> the same indices."""
    model = _layer(slots=slots)
    rng = np.random.default_rng(slots)
    set_scores(model, {k: rng.normal(size=v.shape).astype(np.float32) for k, v in get_scores(model).items()})
    layout = Layout.from_arrays(get_scores(model))
    uplayout = _mode(slots).upload_layout(layout)
    assert uplayout.num_params == slot_bits(slots) * (24 + 4)
    choices = _mode(slots).choices(model)
    prior = _mode(slots).prior(get_scores(model))
    for codec in ("packbits", "entropy"):
        blob = encode_masks(choices_to_planes(choices, slots), uplayout, b"fp-slots", codec=codec, prior=prior)
        back = planes_to_choices(decode_masks(blob, uplayout, b"fp-slots", prior), layout)
        assert all(np.array_equal(back[k], choices[k]) for k in choices)
    packed = HEADER_BYTES + math.ceil(uplayout.num_params / 8)
    assert blob.size <= packed + (SECTION_BYTES + 1) * len(uplayout.shapes)  # never worse than packed planes


def test_entropy_code_of_unchanged_choices_is_far_below_log2_k():
    """Choices equal to the broadcast's argmax cost almost nothing against the side prior."""
    state = {"w": np.random.default_rng(0).normal(size=(8, 300, 200)).astype(np.float32)}
    layout = Layout.from_arrays(state)
    uplayout = _mode().upload_layout(layout)
    choices = {"w": np.argmax(state["w"], axis=0).astype(np.uint8)}
    prior = _mode().prior(state)
    blob = encode_masks(choices_to_planes(choices, 8), uplayout, b"12345678", "entropy", prior)
    assert 8 * blob.size / 60_000 < 0.05


def test_index_beyond_k_is_rejected():
    layout = Layout((("w", (5, 4)),))  # K = 5: three planes can spell 5, 6, 7
    planes = choices_to_planes({"w": np.array([0, 1, 4, 7])}, 5)
    with pytest.raises(WireError, match="slot index"):
        planes_to_choices(planes, layout)


def test_aggregator_moves_scores_toward_the_clients_choices():
    config = resolve({"method": "slot-machines", "init": "kaiming-uniform"})
    aggregator = get_method("slot-machines").make_aggregator(config)
    assert isinstance(aggregator, SlotMachineAggregator) and aggregator.mask_mode == "slots"
    rng = np.random.default_rng(0)
    state = aggregator.initial_state({"w": rng.normal(size=(4, 100)).astype(np.float32)})
    assert np.allclose(state["w"].mean(axis=0), 0, atol=1e-6) and np.isclose(state["w"].std(), 1, atol=1e-5)
    current = state["w"].argmax(axis=0)
    other = (current + 1) % 4
    unanimous = aggregator.aggregate(1, state, [{"w": other}] * 3, [1.0, 1.0, 1.0])
    cols = np.arange(100)
    gap = lambda s: s[other, cols] - s[current, cols]  # noqa: E731
    assert (gap(unanimous["w"]) > gap(state["w"])).all()  # every connection moved toward the vote
    assert (unanimous["w"].argmax(axis=0) == other).mean() >= 0.85  # and most switched in one round
    agree = aggregator.aggregate(1, state, [{"w": current}] * 3, [1.0, 1.0, 1.0])
    assert np.allclose(agree["w"], state["w"], atol=1e-6)  # no disagreement, no move


def test_slot_machines_refuses_signed_constant_init():
    with pytest.raises(ConfigError, match="init"):
        resolve({"method": "slot-machines"})
    with pytest.raises(ConfigError, match="slots"):
        resolve({"method": "slot-machines", "init": "kaiming-uniform", "slots": 65})


def test_slot_machines_runs_end_to_end_at_most_log2_k_bits(tmp_path):
    """Through the in-process grid: packed planes are exactly 3 bits per connection for K=8,
    entropy-coded ones less; bpp is per connection; server and client agree on the prior."""
    base = {"method": "slot-machines", "init": "kaiming-uniform", "num-clients": 3, "clients-per-round": 3,
            "num-rounds": 2}
    rows = {}
    for codec in ("packbits", "entropy"):
        run_server(InProcessGrid(client_app, 3), resolve({**base, "uplink-codec": codec}), tmp_path / codec)
        rows[codec] = [json.loads(x) for x in (tmp_path / codec / "rounds.jsonl").read_text().splitlines()]
    connections = 85_002
    assert [r["clients"] for r in rows["entropy"]] == [3, 3] and rows["entropy"][0]["failures"] == 0
    assert rows["packbits"][0]["uplink_payload_bytes"] == 3 * (HEADER_BYTES + math.ceil(3 * connections / 8))
    assert rows["packbits"][0]["num_params"] == connections
    assert all(r["uplink_bpp"] <= 3.01 for r in rows["packbits"])
    assert all(r["uplink_bpp"] < 3.0 for r in rows["entropy"])
    assert rows["entropy"][1]["uplink_bpp"] < rows["entropy"][0]["uplink_bpp"]  # the side prior helps
    assert [r["accuracy"] for r in rows["entropy"]] == [r["accuracy"] for r in rows["packbits"]]  # lossless


@pytest.mark.parametrize("name", ["digits-slot-machines.toml", "mnist-slot-machines.toml"])
def test_slot_machine_configs_resolve(name):
    config = load(ROOT / "configs" / name)
    assert config.method == "slot-machines" and config.slots == 8
