"""Tests for fedmask.core.weights and fedmask.core.masking: seeded frozen weights, masks, gradients."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from fedmask.core.masking import frozen_weights, get_scores, score_masks, set_scores, to_masked
from fedmask.core.models import build_model
from fedmask.core.weights import derive_seed, fan_in, frozen_tensor
from fedmask.methods import mode_of as mode_class
from fedmask.methods.base import MaskMode
from fedmask.methods.edge_popup import TopK
from fedmask.methods.fedpm import Bernoulli
from fedmask.names import MASK_MODES


def small_net() -> nn.Module:
    """A tiny model with Linear and Conv2d layers (with and without bias)."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(3, 2, 3, padding=1, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4),
    )


def masked(mode: MaskMode | None = None, seed=0, init="signed-kaiming-constant", model=None) -> nn.Module:
    """``small_net()`` (or ``model``) masked by ``mode`` (default: top-k at density 0.5)."""
    return to_masked(model if model is not None else small_net(), mode or TopK(), seed=seed, init=init)


def module_masks(model: nn.Module) -> dict[str, np.ndarray]:
    """The mask each tensor's forward uses now (sampled or thresholded as the module's mode says)."""
    return {name: module.mask().detach().cpu().numpy().astype(bool) for name, module in score_masks(model).items()}


def weights_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(frozen_weights(model).items()):
        digest.update(name.encode())
        digest.update(tensor.cpu().numpy().tobytes())
    return digest.hexdigest()


def as_numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.cpu().numpy() for k, v in tensors.items()}


# ---------------------------------------------------------------- frozen weights


def test_same_seed_gives_bitwise_identical_frozen_weights_and_scores():
    """Two independent builds with one seed agree bit for bit, whatever torch's global RNG did."""
    torch.manual_seed(1)
    a = masked(seed=7)
    torch.manual_seed(2)
    b = masked(seed=7)
    fa, fb = as_numpy(frozen_weights(a)), as_numpy(frozen_weights(b))
    assert fa.keys() == fb.keys() and len(fa) == 7  # 4 weights + 3 biases
    for name in fa:
        assert fa[name].tobytes() == fb[name].tobytes(), name
    sa, sb = get_scores(a), get_scores(b)
    for name in sa:
        assert sa[name].tobytes() == sb[name].tobytes(), name


@pytest.mark.parametrize("other", [{"seed": 8}, {"init": "kaiming-normal"}, {"init": "signed-constant-e"}])
def test_another_seed_or_init_gives_other_frozen_weights(other):
    """Changing the seed or the init changes every frozen tensor."""
    base = as_numpy(frozen_weights(masked(seed=7)))
    changed = as_numpy(frozen_weights(masked(**{"seed": 7, **other})))
    for name in base:
        assert not np.array_equal(base[name], changed[name]), name


def test_frozen_tensor_depends_on_tensor_name():
    """Two tensors of one shape but different names do not share values."""
    a = frozen_tensor(0, "0.weight", (16, 16), 16, "kaiming-normal")
    b = frozen_tensor(0, "2.weight", (16, 16), 16, "kaiming-normal")
    assert not torch.equal(a, b)


def test_derive_seed_is_63_bit_and_order_sensitive():
    """derive_seed fits torch/numpy seeds (< 2**63) and depends on the order of its parts."""
    s = derive_seed(1, "a")
    assert 0 <= s < 2**63
    assert s != derive_seed("a", 1)
    assert s == derive_seed(1, "a")


def test_fan_in_of_linear_and_conv_shapes():
    """fan_in is in_features for Linear and in*kh*kw for Conv; 1-D shapes are refused."""
    assert fan_in((10, 7)) == 7
    assert fan_in((8, 3, 5, 5)) == 75
    with pytest.raises(ValueError):
        fan_in((10,))


def test_unknown_init_is_refused():
    """An unknown init name raises ValueError naming the init."""
    with pytest.raises(ValueError, match="init"):
        frozen_tensor(0, "w", (4, 4), 4, "xavier")


@pytest.mark.parametrize(
    "init, magnitude",
    [("signed-kaiming-constant", lambda f: math.sqrt(2.0 / f)),
     ("signed-constant-e", lambda f: math.e * math.sqrt(1.0 / f))],
)
def test_signed_constant_inits_have_documented_magnitude(init, magnitude):
    """Signed-constant inits: every |w| (weights and biases) is exactly the documented constant."""
    model = masked(init=init)
    frozen = frozen_weights(model)
    for name, tensor in frozen.items():
        module = model.get_submodule(name.rpartition(".")[0])
        f = fan_in(tuple(module.weight.shape))
        expected = np.float32(magnitude(f))
        values = tensor.numpy()
        assert np.all(np.abs(values) == expected), name
        if values.size >= 32:  # both signs occur
            assert (values > 0).any() and (values < 0).any(), name


def test_kaiming_normal_has_documented_std():
    """kaiming-normal draws N(0, 2/fan_in): sample std within 2% of sqrt(2/fan_in), mean ~ 0."""
    w = frozen_weights(masked(init="kaiming-normal", model=nn.Sequential(nn.Linear(200, 300))))["0.weight"]
    expected = math.sqrt(2.0 / 200)
    assert abs(w.std().item() - expected) < 0.02 * expected
    assert abs(w.mean().item()) < 0.02 * expected
    assert len(torch.unique(w)) > 1000  # really random, not a constant


def test_frozen_weights_regenerate_identically_in_another_process():
    """A fresh interpreter (as on a Ray worker, with another hash salt) rebuilds the same weights."""
    script = textwrap.dedent(
        """
        import hashlib
        import torch
        from torch import nn
        from fedmask.core.masking import frozen_weights, to_masked
        from fedmask.methods.edge_popup import TopK
        torch.manual_seed(12345)
        for init in ("signed-kaiming-constant", "kaiming-normal"):
            model = nn.Sequential(
                nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
                nn.Conv2d(3, 2, 3, padding=1, bias=False), nn.ReLU(),
                nn.Flatten(), nn.Linear(2 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4),
            )
            to_masked(model, TopK(), seed=3, init=init)
            digest = hashlib.sha256()
            for name, tensor in sorted(frozen_weights(model).items()):
                digest.update(name.encode())
                digest.update(tensor.cpu().numpy().tobytes())
            print(digest.hexdigest())
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "987"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    expected = [weights_hash(masked(seed=3, init=init)) for init in ("signed-kaiming-constant", "kaiming-normal")]
    assert out.stdout.split() == expected


# ---------------------------------------------------------------- what is trainable


def test_only_scores_are_trainable_after_to_masked():
    """After to_masked the trainable tensors are the scores; frozen originals have no grad."""
    model = masked()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".scores") for n in trainable)
    assert len(trainable) == 7
    for name, module in score_masks(model).items():
        mod_name, _, tensor_name = name.rpartition(".")
        original = model.get_submodule(mod_name).parametrizations[tensor_name].original
        assert not original.requires_grad
        assert module.scores.requires_grad
        assert module.scores.shape == original.shape


@pytest.mark.parametrize(
    "extra, culprit",
    [(nn.LayerNorm(4), "1.weight"), (nn.BatchNorm1d(4), "1.weight")],
)
def test_non_maskable_trainable_layer_is_refused(extra, culprit):
    """A trainable layer that masks cannot carry raises ValueError naming the tensor."""
    with pytest.raises(ValueError, match=culprit.replace(".", r"\.")):
        to_masked(nn.Sequential(nn.Linear(3, 4), extra), TopK(), seed=0)


def test_embedding_is_refused():
    """An Embedding (not Linear/Conv2d) is named in the ValueError."""
    with pytest.raises(ValueError, match=r"0\.weight"):
        to_masked(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)), Bernoulli(), seed=0)


def test_batchnorm2d_becomes_stateless():
    """BatchNorm2d is swapped for a non-affine one without running statistics."""
    model = to_masked(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), TopK(), seed=0)
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm2d)
    assert not bn.affine and not bn.track_running_stats
    assert bn.running_mean is None and not list(bn.parameters())


# ---------------------------------------------------------------- top-k masks


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 0.77, 1.0])
def test_topk_keeps_round_density_n_largest_scores(density):
    """Top-k keeps exactly round(density*n) entries per tensor, the largest |score| ones."""
    mode = TopK(density)
    model = masked(mode, model=nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 12)))
    masks, scores = mode.upload(model), get_scores(model)
    for name, mask in masks.items():
        magnitude = np.abs(scores[name])
        assert mask.dtype == bool and mask.shape == magnitude.shape
        assert mask.sum() == max(1, round(density * mask.size)), name
        if not mask.all():
            assert magnitude[mask].min() >= magnitude[~mask].max(), name


def test_topk_effective_weight_is_frozen_times_mask():
    """The layer's weight seen by forward is frozen * topk mask."""
    mode = TopK(0.3)
    model = masked(mode)
    masks, frozen = mode.upload(model), frozen_weights(model)
    for name in masks:
        mod_name, _, tensor_name = name.rpartition(".")
        effective = getattr(model.get_submodule(mod_name), tensor_name).detach()
        assert torch.equal(effective, frozen[name] * torch.as_tensor(masks[name]).float())


def _linear_grads(mode: MaskMode):
    """scores.grad of a tiny masked Linear and the dL/dW_eff computed on the effective weights."""
    torch.manual_seed(0)
    layer = to_masked(nn.Linear(5, 3), mode, seed=4)
    x, r = torch.randn(6, 5), torch.randn(6, 3)
    # loss linear in the output: dL/dW_eff = r^T x does not depend on the sampled mask
    (layer(x) * r).sum().backward()
    w_eff = layer.weight.detach().clone().requires_grad_(True)
    b_eff = layer.bias.detach().clone().requires_grad_(True)
    (nn.functional.linear(x, w_eff, b_eff) * r).sum().backward()
    return layer, w_eff.grad, b_eff.grad


def test_topk_straight_through_gradient_reaches_scores():
    """topk: scores.grad == dL/dW_eff * W_frozen * sign(score) (straight-through over |score|)."""
    layer, gw, gb = _linear_grads(TopK(0.5))
    pw = layer.parametrizations["weight"]
    pb = layer.parametrizations["bias"]
    expected_w = gw * pw.original * torch.sign(pw[0].scores.detach())
    expected_b = gb * pb.original * torch.sign(pb[0].scores.detach())
    assert pw[0].scores.grad is not None and pw[0].scores.grad.abs().sum() > 0
    torch.testing.assert_close(pw[0].scores.grad, expected_w)
    torch.testing.assert_close(pb[0].scores.grad, expected_b)
    # dropped weights get gradient too (straight-through), not only the kept ones
    dropped = ~torch.as_tensor(TopK(0.5).upload(layer)["weight"])
    assert (pw[0].scores.grad[dropped] != 0).all()


def test_bernoulli_straight_through_gradient_reaches_scores():
    """bernoulli: scores.grad == dL/dW_eff * W_frozen * sigmoid'(score)."""
    layer, gw, _ = _linear_grads(Bernoulli())
    pw = layer.parametrizations["weight"]
    s = torch.sigmoid(pw[0].scores.detach())
    torch.testing.assert_close(pw[0].scores.grad, gw * pw.original * s * (1 - s))
    assert pw.original.grad is None


# ---------------------------------------------------------------- bernoulli masks


def _set_all_scores(model: nn.Module, value_fn) -> None:
    set_scores(model, {k: value_fn(v).astype(np.float32) for k, v in get_scores(model).items()})


def test_bernoulli_samples_in_train_mode():
    """Train mode draws a fresh mask each forward: theta = 0.5 gives different outputs."""
    model = masked(Bernoulli(), model=nn.Sequential(nn.Linear(64, 64)))
    _set_all_scores(model, np.zeros_like)
    model.train()
    x = torch.randn(4, 64)
    assert not torch.equal(model(x), model(x))
    m1, m2 = module_masks(model), module_masks(model)
    assert not np.array_equal(m1["0.weight"], m2["0.weight"])
    assert 0.4 < m1["0.weight"].mean() < 0.6


def test_bernoulli_eval_threshold_is_deterministic_and_thresholds_theta():
    """Eval mode with eval_mask='threshold' uses sigmoid(scores) > 0.5, deterministically."""
    model = masked(Bernoulli(eval_mask="threshold"), model=nn.Sequential(nn.Linear(32, 16)))
    rng = np.random.default_rng(0)
    _set_all_scores(model, lambda v: rng.normal(size=v.shape))
    model.eval()
    x = torch.randn(3, 32)
    assert torch.equal(model(x), model(x))
    scores, frozen = get_scores(model), frozen_weights(model)
    expected = 1 / (1 + np.exp(-scores["0.weight"])) > 0.5
    assert np.array_equal(module_masks(model)["0.weight"], expected)
    assert torch.equal(model[0].weight.detach(), frozen["0.weight"] * torch.as_tensor(expected).float())
    theta = {name: 1 / (1 + np.exp(-value)) for name, value in scores.items()}
    assert np.array_equal(Bernoulli().global_mask(theta)["0.weight"], expected)  # the state's mask is the same


def test_bernoulli_eval_sample_samples_in_eval_mode():
    """eval_mask='sample' keeps sampling in eval mode."""
    model = masked(Bernoulli(eval_mask="sample"), model=nn.Sequential(nn.Linear(64, 64)))
    _set_all_scores(model, np.zeros_like)
    model.eval()
    x = torch.randn(4, 64)
    assert not torch.equal(model(x), model(x))


def test_bernoulli_upload_samples_even_in_eval_threshold_mode():
    """A FedPM upload is a fresh sample even in eval-threshold mode, where the forward thresholds."""
    mode = Bernoulli(eval_mask="threshold")
    model = masked(mode, model=nn.Sequential(nn.Linear(64, 64)))
    _set_all_scores(model, np.zeros_like)
    model.eval()
    assert not module_masks(model)["0.weight"].any()  # sigmoid(0) = 0.5 is not > 0.5
    sampled = [mode.upload(model)["0.weight"] for _ in range(2)]
    assert sampled[0].any() and not np.array_equal(*sampled)


@pytest.mark.parametrize("make", [lambda: mode_class("dense")(), lambda: TopK(density=0.0), lambda: TopK(density=1.5),
                                  lambda: Bernoulli(eval_mask="x")], ids=["dense", "density-0", "density-1.5",
                                                                          "eval-mask-x"])
def test_bad_mask_settings_are_refused(make):
    """Unknown mode, density outside (0, 1] and unknown eval_mask raise ValueError."""
    with pytest.raises(ValueError):
        to_masked(nn.Sequential(nn.Linear(3, 2)), make(), seed=0)


# ---------------------------------------------------------------- get/set scores


def test_set_get_scores_round_trip():
    """set_scores then get_scores returns the same arrays; get_scores returns copies."""
    model = masked(TopK())
    rng = np.random.default_rng(1)
    new = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in get_scores(model).items()}
    set_scores(model, new)
    got = get_scores(model)
    assert got.keys() == new.keys()
    for k in new:
        assert np.array_equal(got[k], new[k])
    got[next(iter(got))][...] = 123.0
    assert not np.any(get_scores(model)[next(iter(got))] == 123.0)


@pytest.mark.parametrize("change", ["missing", "extra", "renamed"])
def test_set_scores_with_wrong_names_raises(change):
    """set_scores refuses a dict whose tensor names differ from the model's."""
    model = masked(TopK())
    scores = get_scores(model)
    name = sorted(scores)[0]
    if change == "missing":
        del scores[name]
    elif change == "extra":
        scores["extra.weight"] = np.zeros(3, np.float32)
    else:
        scores["renamed"] = scores.pop(name)
    with pytest.raises(ValueError, match="scores"):
        set_scores(model, scores)


def test_set_scores_with_wrong_shape_raises():
    """set_scores refuses an array whose shape differs from the tensor's."""
    model = to_masked(nn.Sequential(nn.Linear(4, 3)), TopK(), seed=1)
    with pytest.raises(ValueError):
        set_scores(model, {"0.weight": np.zeros(1, np.float32), "0.bias": np.zeros(3, np.float32)})


# ---------------------------------------------------------------- training changes scores only


def _train_step(model: nn.Module, x: torch.Tensor, num_classes: int):
    before_scores = {k: v.copy() for k, v in get_scores(model).items()}
    before_frozen = {k: v.clone() for k, v in frozen_weights(model).items()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    y = torch.arange(len(x)) % num_classes
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    after_scores, after_frozen = get_scores(model), frozen_weights(model)
    changed = [k for k in before_scores if not np.array_equal(before_scores[k], after_scores[k])]
    for k in before_frozen:
        assert torch.equal(before_frozen[k], after_frozen[k]), f"frozen {k} changed"
    return changed, before_scores


def test_conv_model_train_step_changes_scores_only():
    """conv2 converts; one SGD step changes the scores of every tensor and no frozen weight."""
    torch.manual_seed(0)
    model = to_masked(build_model("conv2", (1, 8, 8), 10), TopK(), seed=0)
    changed, before = _train_step(model, torch.randn(4, 1, 8, 8), 10)
    assert sorted(changed) == sorted(before)


def test_bernoulli_conv_with_batchnorm_train_step_changes_scores_only():
    """A Conv2d+BatchNorm2d net in bernoulli mode trains scores only."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    model = to_masked(net, Bernoulli(), seed=0)
    changed, before = _train_step(model, torch.randn(8, 1, 6, 6), 5)
    assert sorted(changed) == sorted(before) == ["0.weight", "4.bias", "4.weight"]


def test_resnet18_converts_and_trains_scores_only():
    """resnet18 converts (BN stateless, only scores trainable) and a step changes scores only."""
    torch.manual_seed(0)
    dense = build_model("resnet18", (3, 32, 32), 10)
    expected = sum(1 for m in dense.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                   for t in (m.weight, m.bias) if t is not None)
    model = to_masked(dense, TopK(0.5), seed=0)
    assert len(score_masks(model)) == expected
    assert not any(isinstance(m, nn.BatchNorm2d) and (m.affine or m.track_running_stats)
                   for m in model.modules())
    assert all(n.endswith(".scores") for n, p in model.named_parameters() if p.requires_grad)
    changed, before = _train_step(model, torch.randn(2, 3, 8, 8), 10)  # small input: speed
    assert len(changed) > 0.9 * len(before)


@pytest.mark.parametrize("name", MASK_MODES)
def test_every_mask_mode_is_registered_and_masks_a_model(name):
    """Each mask mode the config offers is registered under its name, built from a config,
    and turns a model into one whose only trainable tensors are its scores, one per
    Linear/Conv2d tensor, with an upload for each tensor of its upload layout."""
    from fedmask import task
    from fedmask.config import resolve
    from fedmask.wire.frame import Layout

    mode = task.mode_of(resolve({}), name)
    assert isinstance(mode, mode_class(name)) and mode.name == name
    model = masked(mode, init="kaiming-uniform")
    assert len(score_masks(model)) == 7
    assert all(n.endswith(".scores") for n, p in model.named_parameters() if p.requires_grad)
    upload = mode.upload(model)
    assert sorted(upload) == mode.upload_layout(Layout.from_arrays(get_scores(model))).names


def test_seed_torch_gives_the_stream_of_torch_manual_seed():
    """Training and evaluation seed torch with ``seed_torch`` (no CUDA seeding queued on a
    machine without one): the draws must be those ``torch.manual_seed`` gives, or every
    recorded run would change."""
    from fedmask.core.training import seed_torch

    torch.manual_seed(11)
    expected = (torch.rand(5), torch.bernoulli(torch.full((7,), 0.3)), torch.randperm(9))
    torch.manual_seed(99)
    seed_torch(11)
    got = (torch.rand(5), torch.bernoulli(torch.full((7,), 0.3)), torch.randperm(9))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_a_client_limits_numpys_blas_threads_to_its_num_cpus():
    """``use_threads`` (called by the ClientApp with ``num-cpus``) limits BLAS as well as torch:
    OpenBLAS's own threads, spinning after a long dot product, took half of a 2-core machine
    from the clients' training."""
    from threadpoolctl import threadpool_info

    from fedmask.core.threads import use_threads

    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    if not blas:
        pytest.skip("numpy here has no BLAS that threadpoolctl can see")
    before = torch.get_num_threads()
    try:
        for count in (1, 2, 1):
            use_threads(count)
            assert torch.get_num_threads() == count
            assert {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"} == {count}
    finally:
        use_threads(before)
