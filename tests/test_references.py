"""Each difference from the methods' reference code, as a setting, on hand-computed examples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedmask.config import ConfigError, resolve
from fedmask.core.masking import check_batchnorm, score_masks, to_masked
from fedmask.core.weights import derive_seed
from fedmask.methods.base import MaskMode
from fedmask.methods.biprop import Biprop, BipropScores
from fedmask.methods.edge_popup import TopK
from fedmask.methods.fedpm import BernoulliMask, BernoulliScores, FedPMAggregator, prior_resets
from fedmask.methods.slot_machines import Slots

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("reference, expected", [(False, [1.0, 2.0]), (True, [0.2, 1.8])])
def test_fedpm_gradient_through_the_bernoulli_sample(reference, expected):
    """Upstream gradient [1, 2] at theta [0.2, 0.9]: straight-through passes [1, 2];
    the references pass theta * g = [0.2, 1.8]."""
    probs = torch.tensor([0.2, 0.9], requires_grad=True)
    (BernoulliMask.apply(probs, reference) * torch.tensor([1.0, 2.0])).sum().backward()
    assert probs.grad is not None and probs.grad.tolist() == pytest.approx(expected)


def test_fedpm_gradient_setting_reaches_the_model():
    config = resolve({"method": "fedpm", "fedpm-gradient": "reference"})
    from fedmask import task

    model = task.make_model(config, task.splits_of(config), task.mode_of(config, "bernoulli"))
    assert {m.reference_gradient for m in score_masks(model).values()} == {True}


def test_fedpm_eval_threshold_is_a_different_model_than_a_sample():
    """theta = [0.3, 0.7] in evaluation: 'threshold' is always the mask [0, 1]; 'sample'
    draws masks whose mean is theta (the reference evaluates one such draw)."""
    scores = torch.logit(torch.tensor([0.3, 0.7]))
    threshold, sample = (BernoulliScores(torch.zeros(2), how, False) for how in ("threshold", "sample"))
    for module in (threshold, sample):
        module.scores.data.copy_(scores)
        module.eval()
    assert threshold.mask().tolist() == [0.0, 1.0]
    torch.manual_seed(0)
    mean = torch.stack([sample.mask() for _ in range(4000)]).mean(0)
    assert mean.tolist() == pytest.approx([0.3, 0.7], abs=0.03)


def test_fedpm_configs_do_not_claim_thresholding_is_the_same_model():
    for name in ("quickstart.toml", "mnist-fedpm.toml", "fmnist-fedpm.toml"):
        text = (ROOT / "configs" / name).read_text()
        assert "the same model without sampling noise" not in text and 'eval-mask = "sample"' in text, name


def _tiny(mode: MaskMode, init: str) -> nn.Module:
    return to_masked(nn.Sequential(nn.Linear(3, 2, bias=False)), mode, seed=7, init=init)


def test_slot_machines_reference_candidates_and_scores():
    """Linear 3 -> 2: Glorot bound sqrt(6 / (3 + 2)); candidates U(-b, b) drawn from the seed,
    reference scores U(0, b)."""
    bound = math.sqrt(6 / 5)
    model = _tiny(Slots(slots=4, score_init="reference"), init="glorot-uniform")
    module = score_masks(model)["0.weight"]
    generator = torch.Generator().manual_seed(derive_seed(7, "0.weight"))
    expected = torch.rand((4, 2, 3), generator=generator) * (2 * bound) - bound
    assert torch.equal(module.candidates, expected)
    scores = module.scores.detach()
    assert float(scores.min()) >= 0.0 and float(scores.max()) < bound
    default = score_masks(_tiny(Slots(slots=4), init="kaiming-uniform"))["0.weight"]
    assert float(default.candidates.abs().max()) <= math.sqrt(6 / 3)  # fedmask's: He uniform, fan_in only
    assert float(default.scores.min()) < 0.0


@pytest.mark.parametrize("how, expected", [("fedmask", [1.5, -1.5, 1.5, -1.5]), ("reference", [0.5, -2.0, 1.0, -0.1])])
def test_biprop_score_gradient(how, expected):
    """w = [0.5, -2, 1, -0.1], |scores| keep positions 1 and 2 (density 0.5): alpha = 1.5,
    weight used [0, -1.5, 1.5, 0] either way; with g = 1 the scores get g * sign(w) * alpha
    (fedmask) or, as chrundle/biprop computes it, (g * sign(w)) * |w| = g * w: its
    GetQuantnet_binary.backward returns the incoming gradient times |w|, and the incoming
    gradient carries sign(w) because SubnetConv multiplies the output by sign(w)."""
    module = BipropScores(torch.tensor([0.1, 0.9, 0.8, 0.2]), 0.5, how == "reference")
    used = module(torch.tensor([0.5, -2.0, 1.0, -0.1]))
    assert used.tolist() == pytest.approx([0.0, -1.5, 1.5, 0.0])
    used.sum().backward()
    assert module.scores.grad is not None and module.scores.grad.tolist() == pytest.approx(expected)


def test_biprop_scale_fan_divides_the_frozen_weights_as_the_reference_code_does():
    """chrundle/biprop's builder multiplies the fan by (1 - prune_rate), prune_rate being the
    fraction of weights kept: at density 0.75 the std doubles (1 / sqrt(0.25)); density 1
    is refused (a division by zero there)."""
    from fedmask.config import ConfigError, resolve
    from fedmask.core.masking import frozen_weights

    plain = frozen_weights(_tiny(Biprop(density=0.75), init="kaiming-normal"))["0.weight"]
    scaled = frozen_weights(_tiny(Biprop(density=0.75, scale_fan=True), init="kaiming-normal"))["0.weight"]
    assert torch.allclose(scaled, plain * 2.0)
    with pytest.raises(ConfigError, match="biprop-scale-fan"):
        resolve({"method": "biprop", "biprop-scale-fan": True, "density": 1.0})


def test_batchnorm_running_keeps_statistics_and_federated_runs_refuse_it():
    """One training batch of mean 3 per channel: running mean = 0.1 * 3 (momentum 0.1);
    stateless BatchNorm keeps none. A federated ResNet-18 run with 'running' is refused by name;
    the conv nets have no BatchNorm, so they accept it."""
    def model(how: str) -> nn.Module:
        net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
        return to_masked(net, TopK(), seed=0, init="kaiming-normal", batchnorm=how)

    running, stateless = model("running"), model("stateless")
    x = torch.full((4, 1, 2, 2), 3.0)
    for net in (running, stateless):
        net.train()
        net[0] = nn.Identity()  # the BatchNorm sees the input itself: channel means are 3
        net(x.expand(4, 2, 2, 2))
    assert running[1].running_mean.tolist() == pytest.approx([0.3, 0.3])
    assert stateless[1].running_mean is None
    with pytest.raises(ValueError, match="batchnorm"):
        check_batchnorm("running", "resnet18")
    check_batchnorm("running", "conv2")  # no BatchNorm in the conv nets: nothing to refuse
    from fedmask.preflight import check_before_start

    with pytest.raises(ConfigError, match="batchnorm"):
        check_before_start(resolve({"model": "resnet18", "batchnorm": "running", "method": "edge-popup"}))


def test_fedpm_prior_reset_rounds_by_rule():
    """Period 3: fedmask resets at rounds 1, 4, 7; FL4Health's (round + 1) % 3 == 0 at 2, 5."""
    rounds = range(1, 8)
    assert [r for r in rounds if prior_resets(r, 3, "fedmask")] == [1, 4, 7]
    assert [r for r in rounds if prior_resets(r, 3, "fl4health")] == [2, 5]
    assert [r for r in rounds if prior_resets(r, 1, "fl4health")] == list(rounds)


@pytest.mark.parametrize("rule, theta", [("fedmask", 0.5), ("fl4health", 0.01)])
def test_fedpm_prior_reset_rule_changes_theta(rule, theta):
    """One weight, one client: round 1 keeps it, round 2 drops it. fedmask (period 3) still
    counts round 1: theta = 1/2; FL4Health resets before round 2: theta = 0, clamped to eps."""
    aggregator = FedPMAggregator.from_config(resolve({"fedpm-prior-reset": 3, "fedpm-prior-reset-rule": rule}))
    state = {"w": np.array([0.5], dtype=np.float32)}
    state = aggregator.aggregate(1, state, [{"w": np.array([True])}], [1.0])
    state = aggregator.aggregate(2, state, [{"w": np.array([False])}], [1.0])
    assert float(state["w"][0]) == pytest.approx(theta)
