"""``width``: the hidden layers and conv channels of the built-in models, widened (issue 28's
capacity question: masks are paid per weight, so a wider random network costs bytes in
proportion and may close an accuracy gap)."""

from __future__ import annotations

import pytest
from torch import nn

from fedmask import cli
from fedmask.config import ConfigError, resolve
from fedmask.core.models import build_model


def _hidden(model: nn.Module) -> list[int]:
    return [m.out_features for m in model.modules() if isinstance(m, nn.Linear)][:-1]


def _channels(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize(("width", "hidden"), [(1.0, [300, 100]), (2.0, [600, 200]), (0.5, [150, 50])])
def test_width_scales_lenets_hidden_layers(width, hidden):
    model = build_model("lenet-300-100", (1, 28, 28), 10, width)
    assert _hidden(model) == hidden
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)][-1] == 10


def test_width_scales_conv_channels_and_the_dense_head():
    model = build_model("conv4", (1, 28, 28), 10, 2.0)
    assert _channels(model) == [128, 128, 256, 256]
    assert _hidden(model) == [512, 512]


def test_a_wider_masked_run_trains_and_counts_the_wider_models_weights(tmp_path):
    base = tmp_path / "c.toml"
    base.write_text('num-clients = 2\nclients-per-round = 2\nnum-rounds = 1\nwidth = 2.0\n')
    assert cli.main(["run", str(base), "--engine", "inprocess", "--out", str(tmp_path / "o")]) == 0
    import json

    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    wide = build_model("mlp", (1, 8, 8), 10, 2.0)
    assert summary["num_params"] == sum(p.numel() for p in wide.parameters())


def test_width_with_resnet18_is_refused():
    with pytest.raises(ConfigError, match="'width'"):
        resolve({"model": "resnet18", "width": 2.0})


def test_width_outside_its_range_is_refused():
    with pytest.raises(ConfigError, match="width"):
        resolve({"width": 0})
