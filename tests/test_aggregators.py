"""Tests for the aggregation rules (FedPM, edge-popup), the method registry's plug-ins, and seeded client sampling."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmask.config import RunConfig, resolve
from fedmask.core.masking import topk_mask_np
from fedmask.core.sampling import sample_partitions
from fedmask.methods import PluginError, get_method
from fedmask.methods.base import MaskAggregator
from fedmask.methods.edge_popup import EdgePopupAggregator, EdgePopupParams, TopK
from fedmask.methods.fedpm import FedPMAggregator, FedPMParams
from fedmask.methods.votes import weighted_vote

SHAPES = {"a.weight": (6, 5), "a.bias": (6,), "b.weight": (2, 3, 3, 3)}


def config(**overrides) -> RunConfig:
    return resolve({k.replace("_", "-"): v for k, v in overrides.items()})


def random_masks(n: int, seed: int, p: float = 0.5) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.random(s) < p for k, s in SHAPES.items()} for _ in range(n)]


def theta_state(value: float = 0.5) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, np.float32) for k, s in SHAPES.items()}


def expected_theta(rounds: list[list[dict]], eps: float) -> dict[str, np.ndarray]:
    """Posterior mode of Beta(1 + ones, 1 + zeros) over the given rounds, clamped."""
    out = {}
    for name in SHAPES:
        ones = sum(m[name].astype(int) for r in rounds for m in r)
        total = sum(len(r) for r in rounds)
        zeros = total - ones
        alpha, beta = 1 + ones, 1 + zeros
        out[name] = np.clip((alpha - 1) / (alpha + beta - 2), eps, 1 - eps).astype(np.float32)
    return out


# ---------------------------------------------------------------- FedPM


def test_fedpm_theta_is_clipped_mean_with_reset_every_round():
    """fedpm-prior-reset = 1: theta == clip(mean of this round's masks, eps, 1-eps), exactly."""
    agg = FedPMAggregator.from_config(config(fedpm_eps=0.01, fedpm_prior_reset=1))
    state = theta_state()
    for rnd, seed in [(1, 0), (2, 1), (3, 2)]:
        masks = random_masks(5, seed)
        state = agg.aggregate(rnd, state, masks, [1.0] * 5)
        for name in SHAPES:
            mean = np.mean([m[name] for m in masks], axis=0)
            assert np.array_equal(state[name], np.clip(mean, 0.01, 0.99).astype(np.float32)), (rnd, name)


def test_fedpm_counts_accumulate_without_reset():
    """fedpm-prior-reset = 0: round-2 theta is the posterior mode over both rounds' counts."""
    r1, r2 = random_masks(3, 10), random_masks(2, 11)
    agg = FedPMAggregator.from_config(config(fedpm_prior_reset=0, fedpm_eps=0.05))
    state = agg.aggregate(1, theta_state(), r1, [1.0] * 3)
    state = agg.aggregate(2, state, r2, [1.0] * 2)
    expected = expected_theta([r1, r2], 0.05)
    for name in SHAPES:
        np.testing.assert_allclose(state[name], expected[name], rtol=1e-6)
    # and it differs from what a reset would give
    reset = FedPMAggregator.from_config(config(fedpm_prior_reset=1, fedpm_eps=0.05))
    reset.aggregate(1, theta_state(), r1, [1.0] * 3)
    only_r2 = reset.aggregate(2, theta_state(), r2, [1.0] * 2)
    assert any(not np.array_equal(state[n], only_r2[n]) for n in SHAPES)


def test_fedpm_prior_resets_every_n_rounds():
    """fedpm-prior-reset = 2: rounds 1-2 share counts, round 3 starts from a fresh prior."""
    r1, r2, r3 = random_masks(2, 20), random_masks(2, 21), random_masks(3, 22)
    agg = FedPMAggregator.from_config(config(fedpm_prior_reset=2))
    state = agg.aggregate(1, theta_state(), r1, [1.0] * 2)
    state = agg.aggregate(2, state, r2, [1.0] * 2)
    expected2 = expected_theta([r1, r2], 0.01)
    assert all(np.allclose(state[n], expected2[n]) for n in SHAPES)
    state = agg.aggregate(3, state, r3, [1.0] * 3)
    expected3 = expected_theta([r3], 0.01)
    assert all(np.allclose(state[n], expected3[n]) for n in SHAPES)


def test_fedpm_eps_clamp():
    """Unanimous keep gives theta = 1-eps, unanimous drop gives eps, never 0 or 1."""
    agg = FedPMAggregator.from_config(config(fedpm_eps=0.1))
    keep_all = [{k: np.ones(s, bool) for k, s in SHAPES.items()}] * 3
    drop_all = [{k: np.zeros(s, bool) for k, s in SHAPES.items()}] * 3
    high = agg.aggregate(1, theta_state(), keep_all, [1.0] * 3)
    low = agg.aggregate(2, theta_state(), drop_all, [1.0] * 3)
    for name in SHAPES:
        assert np.all(high[name] == np.float32(0.9))
        assert np.all(low[name] == np.float32(0.1))


def test_fedpm_output_dtype_shapes_and_ignores_weights():
    """FedPM returns float32 arrays of the state's shapes; counts are unweighted."""
    masks = random_masks(2, 5)
    a = FedPMAggregator.from_config(config()).aggregate(1, theta_state(), masks, [1.0, 1.0])
    b = FedPMAggregator.from_config(config()).aggregate(1, theta_state(), masks, [1.0, 100.0])
    for name, shape in SHAPES.items():
        assert a[name].dtype == np.float32 and a[name].shape == shape
        assert np.array_equal(a[name], b[name])


def test_fedpm_initial_state_is_sigmoid_of_scores():
    """The first bernoulli broadcast is theta = sigmoid(scores), float32."""
    scores = {"w": np.array([-2.0, 0.0, 3.0], np.float32)}
    state = FedPMAggregator.from_config(config()).initial_state(scores)
    assert state["w"].dtype == np.float32
    np.testing.assert_allclose(state["w"], 1 / (1 + np.exp(-np.array([-2.0, 0.0, 3.0]))), rtol=1e-6)


# ---------------------------------------------------------------- edge-popup


def score_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def order_of(value):
    return np.abs(value).ravel().argsort()[::-1]


def kept_of(state, density):
    return {k: np.abs(v.astype(np.float64)).ravel().argsort()[::-1][: max(1, round(density * v.size))]
            for k, v in state.items()}


def standardised(magnitude: np.ndarray) -> np.ndarray:
    magnitude = np.maximum(magnitude, 0.0)
    return magnitude / magnitude.std()


def test_edge_popup_unanimous_agreement_keeps_topk_and_magnitudes():
    """Clients that all return the current top-k leave the ranking unchanged (|scores| / spread)."""
    cfg = config(method="edge-popup", density=0.4)
    state = score_state(1)
    current = {k: np.isin(np.arange(v.size), kept_of(state, 0.4)[k]).reshape(v.shape) for k, v in state.items()}
    new = EdgePopupAggregator.from_config(cfg).aggregate(1, state, [current] * 3, [5.0, 1.0, 2.0])
    for name, value in state.items():
        assert new[name] == pytest.approx(standardised(np.abs(value.astype(np.float64))), rel=1e-6)
        assert new[name].std() == pytest.approx(1.0, rel=1e-5)
        assert set(kept_of(new, 0.4)[name]) == set(kept_of(state, 0.4)[name])


def test_edge_popup_unanimous_votes_move_scores_by_server_lr_times_std():
    """A weight outside top-k that all keep moves up by lr spreads; one inside that all drop moves down."""
    lr, density = 0.5, 0.5
    cfg = config(method="edge-popup", density=density, edge_popup_server_lr=lr)
    state = score_state(2)
    votes = {}
    moved_up, moved_down = {}, {}
    for name, value in state.items():
        order = np.abs(value).ravel().argsort()[::-1]
        k = max(1, round(density * value.size))
        current = np.zeros(value.size, bool)
        current[order[:k]] = True
        out_idx, in_idx = order[k], order[0]  # best dropped weight, best kept weight
        flipped = current.copy()
        flipped[out_idx], flipped[in_idx] = True, False
        votes[name] = flipped.reshape(value.shape)
        moved_up[name], moved_down[name] = out_idx, in_idx
    new = EdgePopupAggregator.from_config(cfg).aggregate(1, state, [votes] * 4, [1.0, 2.0, 3.0, 4.0])
    for name, value in state.items():
        magnitude = standardised(np.abs(value.astype(np.float64)).ravel())
        up, down = moved_up[name], moved_down[name]
        expected = magnitude.copy()
        expected[up] += lr  # scores are in units of their spread, so the step is lr
        expected[down] -= lr
        expected = standardised(expected)
        got = new[name].ravel().astype(np.float64)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert got[up] / got[order_of(value)[0]] > magnitude[up] / magnitude[order_of(value)[0]]


def test_edge_popup_vote_average_step_is_the_weighted_mix_of_magnitude_and_votes():
    """``vote-average``: |s| <- standardised((1 - m) * standardised(|s|) + m * lr * vote)."""
    lr, weight = 1.5, 0.25
    cfg = config(method="edge-popup", density=0.5, edge_popup_server_lr=lr, edge_popup_server_rule="vote-average",
                 edge_popup_vote_weight=weight)
    state, masks, weights = score_state(4), random_masks(3, 4), [1.0, 2.0, 3.0]
    new = EdgePopupAggregator.from_config(cfg).aggregate(1, state, masks, weights)
    votes = weighted_vote(masks, weights)
    for name, value in state.items():
        magnitude = standardised(np.abs(value.astype(np.float64))).astype(np.float64)
        expected = standardised((1 - weight) * magnitude + weight * lr * votes[name])
        assert new[name] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_edge_popup_vote_average_settles_where_the_pseudo_gradient_oscillates():
    """The same votes every round, a third of them contested (half the clients keep those
    weights): the pseudo-gradient rule keeps flipping contested weights across the top-k
    boundary, round after round; the running average converges to a fixed mask, whose
    ranking follows the votes (every unanimously kept weight above every contested one)."""
    rng = np.random.default_rng(7)
    size, clients = 300, 4
    kind = rng.permutation(np.repeat([0, 1, 2], size // 3))  # 0 all drop, 1 contested, 2 all keep
    masks = [{"w": (kind == 2) | ((kind == 1) & (c % 2 == 0))} for c in range(clients)]
    flips = {}
    for rule in ("pseudo-gradient", "vote-average"):
        cfg = config(method="edge-popup", density=0.5, edge_popup_server_rule=rule)
        aggregator = EdgePopupAggregator.from_config(cfg)
        state = aggregator.initial_state({"w": rng.normal(size=size).astype(np.float32)})
        history = []
        for server_round in range(1, 41):
            state = aggregator.aggregate(server_round, state, masks, [1.0] * clients)
            history.append(topk_mask_np(state["w"], 0.5).astype(bool))
        flips[rule] = [int((a != b).sum()) for a, b in zip(history[-10:], history[-11:-1])]
        if rule == "vote-average":
            assert state["w"][kind == 2].min() > state["w"][kind == 1].max()
    assert min(flips["pseudo-gradient"]) > 0 and sum(flips["pseudo-gradient"]) > 20, flips
    assert sum(flips["vote-average"]) == 0, flips


def test_edge_popup_vote_levels_rounds_the_running_average_to_integer_levels():
    """``vote-levels``: level <- round((1 - m) * level + m * (L - 1) * vote), clipped to
    0..L-1, and the state is the level itself (so at most L values); clients train from
    the levels standardised, whose top-k is the levels' top-k."""
    levels, weight = 8, 0.3
    cfg = config(method="edge-popup", density=0.5, edge_popup_server_rule="vote-levels", edge_popup_levels=levels,
                 edge_popup_vote_weight=weight)
    aggregator = EdgePopupAggregator.from_config(cfg)
    state = aggregator.initial_state(score_state(4))
    for value in state.values():
        level = value.astype(np.float64)
        assert np.allclose(level, np.rint(level), atol=1e-5) and level.min() >= 0 and level.max() <= levels - 1
        assert len(np.unique(value)) > 1  # the seed's ranking is kept, coarsely
    masks, weights = random_masks(3, 4), [1.0, 2.0, 3.0]
    new = aggregator.aggregate(1, state, masks, weights)
    votes = weighted_vote(masks, weights)
    for name, value in state.items():
        level = np.rint(value.astype(np.float64))
        expected = np.clip(np.rint((1 - weight) * level + weight * (levels - 1) * votes[name]), 0, levels - 1)
        assert np.array_equal(new[name], expected.astype(np.float32))
    scores = TopK(0.5, standardise=True).scores_of_state(new)
    for name, value in new.items():
        assert scores[name].std() == pytest.approx(1.0, rel=1e-5)
        assert np.array_equal(topk_mask_np(scores[name], 0.5), topk_mask_np(value, 0.5))


def test_edge_popup_vote_levels_moves_a_level_only_when_the_votes_pull_half_a_level():
    """The dead zone that makes the state cheap to send: with m = 0.3 and 16 levels a
    weight at level 10 stays for a vote share of 10/15 +- 0.1 and moves one level towards
    votes further away. Unanimous votes drive it up until it is within 1 / (2m) levels of
    the top (level 14: 0.7 * 14 + 0.3 * 15 rounds to 14), no votes down to level 1."""
    levels = 16
    cfg = config(method="edge-popup", density=0.5, edge_popup_server_rule="vote-levels", edge_popup_levels=levels,
                 edge_popup_vote_weight=0.3)
    aggregator = EdgePopupAggregator.from_config(cfg)
    shares = np.array([10 / 15, 10 / 15 + 0.1, 10 / 15 - 0.1, 10 / 15 + 0.12, 10 / 15 - 0.12])
    state = {"w": np.full(shares.size, 10.0, dtype=np.float32)}
    moved = aggregator.replay(state, {"w": shares}, 5.0)["w"]
    assert np.rint(moved).tolist() == [10, 10, 10, 11, 9]
    for share, end in ((1.0, levels - 2), (0.0, 1)):
        for _ in range(30):
            state = aggregator.replay(state, {"w": np.full(shares.size, share)}, 5.0)
        assert state["w"].tolist() == [end] * shares.size


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), lr=st.floats(0.1, 20.0), density=st.floats(0.05, 1.0))
def test_edge_popup_output_is_nonnegative_float32_of_same_shapes(seed, lr, density):
    """Whatever the votes, the new scores are finite, non-negative float32 of the state's shapes."""
    cfg = config(method="edge-popup", density=density, edge_popup_server_lr=lr)
    new = EdgePopupAggregator.from_config(cfg).aggregate(1, score_state(seed), random_masks(3, seed), [1.0, 2.0, 3.0])
    for name, shape in SHAPES.items():
        assert new[name].dtype == np.float32 and new[name].shape == shape
        assert np.all(new[name] >= 0) and np.all(np.isfinite(new[name]))


def test_topk_mask_keeps_largest():
    """Server-side topk_mask_np keeps round(density*n) largest magnitudes."""
    magnitude = np.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]])
    mask = topk_mask_np(magnitude, 0.5)
    assert mask.dtype == np.float64 and mask.shape == (2, 3)
    assert np.array_equal(mask, np.array([[0, 1, 1], [1, 0, 0]], float))


# ---------------------------------------------------------------- weighted vote


def test_weighted_vote_respects_weights():
    """weighted_vote is the weighted fraction of clients keeping each weight."""
    a = {"w": np.array([1, 0, 1, 0], bool)}
    b = {"w": np.array([1, 1, 0, 0], bool)}
    np.testing.assert_allclose(weighted_vote([a, b], [3.0, 1.0])["w"], [1.0, 0.25, 0.75, 0.0])
    np.testing.assert_allclose(weighted_vote([a, b], [1.0, 1.0])["w"], [1.0, 0.5, 0.5, 0.0])


# ---------------------------------------------------------------- plug-ins


class HalfAggregator(MaskAggregator):
    """A plug-in for the tests: every theta becomes 0.5."""

    mask_mode = "bernoulli"

    def aggregate(self, server_round, state, masks, weights):
        return {k: np.full(v.shape, 0.5, np.float32) for k, v in state.items()}


class NotAnAggregator:
    mask_mode = "bernoulli"


class WrongModeAggregator(HalfAggregator):
    mask_mode = "magnitude"


class AbstractAggregator(MaskAggregator):
    """Forgets to implement aggregate()."""


@pytest.mark.parametrize("method, cls, mode, params", [("fedpm", FedPMAggregator, "bernoulli", FedPMParams),
                                                       ("edge-popup", EdgePopupAggregator, "topk", EdgePopupParams)])
def test_load_builtin_aggregators(method, cls, mode, params):
    """Built-in names give their aggregator, holding the config's parameters of the rule."""
    cfg = config(method=method, fedpm_eps=0.05, edge_popup_server_lr=0.7, robust_aggregation="median")
    agg = get_method(method).make_aggregator(cfg)
    assert type(agg) is cls and agg.mask_mode == mode and agg.params == params.from_config(cfg)
    assert agg.params != params() and agg.vote_rule.rule == "median"


def test_load_plugin_from_this_module():
    """'module:Class' loads a MaskAggregator subclass defined in a test module."""
    cfg = config(method=f"{__name__}:HalfAggregator")
    agg = cfg.method_entry.make_aggregator(cfg)
    assert type(agg).__name__ == "HalfAggregator" and agg.config is cfg
    out = agg.aggregate(1, theta_state(0.9), random_masks(1, 0), [1.0])
    assert all(np.all(v == 0.5) for v in out.values())


def test_load_plugin_from_file_on_sys_path(tmp_path, monkeypatch):
    """A plug-in module found on sys.path loads, with its own mask_mode."""
    (tmp_path / "fedmask_test_plugin_mod.py").write_text(textwrap.dedent("""
        import numpy as np
        from fedmask import MaskAggregator

        class Plug(MaskAggregator):
            mask_mode = "topk"

            def aggregate(self, server_round, state, masks, weights):
                return {k: np.abs(v) for k, v in state.items()}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fedmask_test_plugin_mod", raising=False)
    method = get_method("fedmask_test_plugin_mod:Plug")
    agg = method.make_aggregator(config())
    assert method.mask_mode == "topk" and "recycle-every" not in method.restrictions
    assert isinstance(agg, MaskAggregator) and agg.mask_mode == "topk"
    sys.modules.pop("fedmask_test_plugin_mod", None)


@pytest.mark.parametrize("method, fragment", [
    ("fedmask_no_such_module_xyz:Agg", "fedmask_no_such_module_xyz"),
    ("fedmask.methods.base:NoSuchClass", "NoSuchClass"),
    (f"{__name__}:NotAnAggregator", "MaskAggregator"),
    ("fedmask.methods.votes:weighted_vote", "MaskAggregator"),
    (f"{__name__}:WrongModeAggregator", "mask_mode"),
    ("fedprox", "fedprox"),
])
def test_get_method_errors_are_clear_plugin_errors(method, fragment):
    """Missing module/class, non-subclass, bad mask_mode and unknown names raise PluginError naming the cause."""
    with pytest.raises(PluginError, match="method") as info:
        get_method(method)
    assert fragment in str(info.value)


def test_dense_method_has_no_aggregator():
    """FedAvg's registry entry has no mask mode, and asking it for a MaskAggregator is a clear error."""
    fedavg = get_method("fedavg")
    assert fedavg.dense and fedavg.mask_mode is None
    with pytest.raises(ValueError, match="fedavg"):
        fedavg.make_aggregator(config(method="fedavg"))


def test_abstract_plugin_is_a_clear_plugin_error():
    """A plug-in subclass that does not implement aggregate() is refused with PluginError."""
    with pytest.raises(PluginError, match="aggregate"):
        get_method(f"{__name__}:AbstractAggregator")


# ---------------------------------------------------------------- client sampling


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), rnd=st.integers(1, 1000), n=st.integers(1, 60), data=st.data())
def test_sample_partitions_distinct_sorted_in_range_and_deterministic(seed, rnd, n, data):
    """Sampling gives clients-per-round distinct sorted ids in range, the same on every call."""
    k = data.draw(st.integers(1, n))
    chosen = sample_partitions(seed, n, k, rnd)
    assert len(chosen) == k == len(set(chosen))
    assert chosen == sorted(chosen) and all(0 <= p < n for p in chosen)
    assert all(type(p) is int for p in chosen)
    assert sample_partitions(seed, n, k, rnd) == chosen


def test_sample_partitions_differs_across_rounds_and_seeds():
    """Different rounds (and seeds) pick different client sets."""
    by_round = {tuple(sample_partitions(3, 20, 5, r)) for r in range(1, 11)}
    assert len(by_round) >= 8
    assert any(sample_partitions(3, 20, 5, r) != sample_partitions(4, 20, 5, r) for r in range(1, 6))
