"""Biprop: sign(w) * alpha * top-k mask, alpha re-derived by every party from mask and seed."""

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
from fedmask.config import resolve
from fedmask.core.masking import frozen_weights, score_masks, to_masked
from fedmask.methods import get_method
from fedmask.methods.biprop import Biprop, BipropAggregator
from fedmask.wire.masks import HEADER_BYTES
from server.server_app import run_server

MODE = Biprop(density=0.5)


def _layer(seed: int = 0) -> nn.Module:
    return to_masked(nn.Sequential(nn.Linear(6, 4)), MODE, seed=seed, init="kaiming-normal")


def test_forward_uses_sign_times_mean_kept_magnitude():
    """W_eff = sign(w) * mean(|w| over kept) * mask, per tensor."""
    model = _layer()
    frozen = frozen_weights(model)["0.weight"]
    mask = torch.as_tensor(MODE.upload(model)["0.weight"], dtype=torch.float32)
    alpha = (frozen.abs() * mask).sum() / mask.sum()
    expected = torch.sign(frozen) * alpha * mask
    assert torch.allclose(model[0].weight, expected)
    assert int(mask.sum()) == round(0.5 * frozen.numel())
    assert len(torch.unique(model[0].weight.abs()[mask.bool()])) == 1  # one magnitude per tensor


def test_gradient_reaches_scores_through_the_mask():
    """Straight-through: d loss / d score = d loss / d W_eff * sign(w) * alpha * sign(score)."""
    model = _layer(3)
    x = torch.randn(5, 6)
    model(x).pow(2).sum().backward()
    scores = score_masks(model)["0.weight"].scores
    frozen = frozen_weights(model)["0.weight"]
    mask = torch.as_tensor(MODE.upload(model)["0.weight"], dtype=torch.float32)
    alpha = (frozen.abs() * mask).sum() / mask.sum()
    weight = model[0].weight.detach().requires_grad_(True)
    torch.nn.functional.linear(x, weight, model[0].bias.detach()).pow(2).sum().backward()
    expected = weight.grad * torch.sign(frozen) * alpha * torch.sign(scores.detach())
    assert torch.allclose(scores.grad, expected, atol=1e-6)
    assert scores.grad.abs().sum() > 0


def test_every_party_derives_the_same_weights():
    """Two builds with one seed and one score state give bitwise equal effective weights."""
    a, b = _layer(7), _layer(7)
    assert torch.equal(a[0].weight, b[0].weight) and torch.equal(a[0].bias, b[0].bias)


def test_biprop_is_a_builtin_topk_method():
    """The registry's biprop entry gives a BipropAggregator that trains biprop masks."""
    aggregator = get_method("biprop").make_aggregator(resolve({"method": "biprop"}))
    assert isinstance(aggregator, BipropAggregator) and aggregator.mask_mode == "biprop"


def test_biprop_runs_end_to_end_and_uploads_masks(tmp_path):
    """Through the in-process grid: masks travel (<= packed size), accuracy is a number."""
    config = resolve({"method": "biprop", "init": "kaiming-normal", "num-clients": 3, "clients-per-round": 3,
                      "num-rounds": 2, "optimizer": "adam", "lr": 0.1, "uplink-codec": "packbits"})
    run_server(InProcessGrid(client_app, 3), config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rows] == [3, 3]
    assert rows[0]["uplink_payload_bytes"] == 3 * (HEADER_BYTES + math.ceil(85_002 / 8))
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)


@pytest.mark.parametrize("name", ["digits-biprop.toml", "mnist-biprop.toml"])
def test_biprop_configs_resolve(name):
    from fedmask.config import load

    config = load(Path(__file__).resolve().parents[1] / "configs" / name)
    assert config.method == "biprop" and np.isfinite(config.lr)
