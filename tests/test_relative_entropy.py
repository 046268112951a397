"""The relative-entropy uplink (issue 27): a FedPM upload that costs about KL(q || theta).

The codec (fedmask.wire.relative, inside the mask upload's frame as codec 3): the decoded
sample is the client's bit for bit; over many keys each weight's mean is q (debiased) or
moves gamma(C, t) of the way (not); the codec follows its exact law on a small block, and
that law is biased; the size is within its stated overhead of the KL coded; q == theta
costs the header; extreme values stay finite; tampered, replayed or misdirected bytes are
refused; the decoder draws only the chosen candidates; a FedPM run with it trains.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fedmask.wire import relative
from fedmask.wire.frame import Layout, WireError
from fedmask.wire.masks import FRAME, HEADER_BYTES, decode_masks, encode_relative

FP = b"runprint"


def problem(n: int, kl_per_weight: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """q, theta like FedPM's: theta on vote levels (half of them at 0.01/0.99), q near it."""
    rng = np.random.default_rng(seed)
    theta = rng.choice([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], n)
    saturated = rng.random(n) < 0.5
    theta[saturated] = rng.choice([0.01, 0.99], int(saturated.sum()))
    q = 1 / (1 + np.exp(-(np.log(theta / (1 - theta)) + rng.normal(0, 1, n))))
    scale = np.sqrt(kl_per_weight * n / relative.kl_bits(q, theta).sum())  # KL is about quadratic in q - theta
    return np.clip(theta + scale * (q - theta), 0.001, 0.999), theta


def coded(q: np.ndarray, theta: np.ndarray, bind: tuple[int, int] = (1, 2), **params) -> tuple[np.ndarray, dict]:
    """(blob, decoded sample) through the mask frame, two tensors."""
    half = q.size // 2
    layout = Layout((("a", (half,)), ("b", (q.size - half,))))
    qs, thetas = {"a": q[:half], "b": q[half:]}, {"a": theta[:half], "b": theta[half:]}
    blob = encode_relative(qs, layout, FP, thetas, bind, **params)
    return blob, decode_masks(blob, layout, FP, thetas, bind=bind)


def sample(q: np.ndarray, theta: np.ndarray, key: int, block_bits: int = 8, extra_bits: int = 0,
           debias: bool = True) -> tuple[bytes, np.ndarray]:
    payload, y, _ = relative.encode(q, theta, relative.key_words((FP, 0, key)), block_bits, extra_bits, debias, 0)
    return payload, y


def test_the_decoded_mask_is_the_clients_sample_bit_for_bit():
    q, theta = problem(3000, seed=1)
    blob, got = coded(q, theta, (4, 7))
    payload, y, _ = relative.encode(q, theta, relative.key_words((FP, 4, 7)), 8, 0, True, 0)
    assert blob[HEADER_BYTES:].tobytes() == payload
    assert np.array_equal(np.concatenate([got["a"], got["b"]]), y) and got["a"].dtype == bool


def test_same_key_same_bytes_other_round_or_client_other_candidates():
    q, theta = problem(800, seed=2)
    assert np.array_equal(coded(q, theta, (1, 2))[0], coded(q, theta, (1, 2))[0])
    assert not np.array_equal(coded(q, theta, (1, 2))[1]["a"], coded(q, theta, (1, 3))[1]["a"])
    assert not np.array_equal(coded(q, theta, (1, 2))[1]["a"], coded(q, theta, (2, 2))[1]["a"])


def test_size_is_within_the_stated_overhead_of_the_kl_coded():
    """ceil(KL / C) indices of C + t bits, a 5-byte head and a byte's padding, after the frame's 28."""
    q, theta = problem(20_000, kl_per_weight=0.03, seed=3)
    for block_bits, extra_bits, debias in ((8, 0, True), (6, 1, False), (4, 2, True)):
        target, blocks = relative.plan(q, theta, block_bits, extra_bits, debias)
        kl = relative.kl_bits(target, theta).sum()
        blob, _ = coded(q, theta, block_bits=block_bits, extra_bits=extra_bits, debias=debias)
        index_bits = block_bits + extra_bits
        assert blocks == math.ceil(kl / block_bits)
        assert 8 * blob.size <= index_bits / block_bits * kl + index_bits + 8 * (HEADER_BYTES + 5) + 7
        cross_entropy = -np.sum(q * np.log2(theta) + (1 - q) * np.log2(1 - theta))
        assert 8 * blob.size < cross_entropy / 5  # what coding the sample against theta costs


def test_q_equal_to_theta_costs_the_header_and_samples_theta():
    rng = np.random.default_rng(4)
    theta = rng.choice([0.01, 0.3, 0.99], 50_000)
    blob, got = coded(theta.copy(), theta)
    assert blob.size == HEADER_BYTES + 5
    y = np.concatenate([got["a"], got["b"]])
    for level in (0.01, 0.3, 0.99):  # y ~ Bernoulli(theta): within 5 sigma
        at = theta == level
        assert abs(y[at].mean() - level) < 5 * np.sqrt(level * (1 - level) / at.sum())


@pytest.mark.parametrize("q, theta", [([0.0, 1.0, 1e-300, 1 - 1e-16, 0.5, 0.5], [0.01, 0.99, 0.99, 0.01, 0.5, 0.5]),
                                      ([1.0] * 40, [0.01] * 40), ([0.5, 0.5], [0.0, 1.0]), ([0.3, 0.3], [0.3, 0.3])])
def test_extreme_probabilities_stay_finite_and_decode(q, theta):
    q, theta = np.array(q, float), np.array(theta, float)
    for debias in (True, False):
        blob, got = coded(q, theta, debias=debias)
        assert blob.size <= HEADER_BYTES + 5 + 3 * q.size + 8 and all(m.dtype == bool for m in got.values())


def test_tampered_replayed_or_misdirected_uploads_are_refused_naming_the_field():
    q, theta = problem(1000, seed=5)
    layout = Layout((("a", (500,)), ("b", (500,))))
    thetas = {"a": theta[:500], "b": theta[500:]}
    blob = encode_relative({"a": q[:500], "b": q[500:]}, layout, FP, thetas, (3, 1), block_bits=4, extra_bits=2)
    fields = set()
    for bit in range(8 * blob.size):
        bad = blob.copy()
        bad[bit // 8] ^= np.uint8(1 << (bit % 8))
        with pytest.raises(WireError) as err:
            decode_masks(bad, layout, FP, thetas, bind=(3, 1))
        fields.add(err.value.field)
    assert {"magic", "crc32", "fingerprint"} <= fields
    for bind in ((4, 1), (3, 2)):  # another round (a replay), another client
        with pytest.raises(WireError, match="crc32"):
            decode_masks(blob, layout, FP, thetas, bind=bind)
    with pytest.raises(WireError, match="crc32"):  # coded against another broadcast
        decode_masks(blob, layout, FP, {k: np.clip(v + 0.01, 0, 1) for k, v in thetas.items()}, bind=(3, 1))
    with pytest.raises(WireError, match="the round and the client"):
        decode_masks(blob, layout, FP, thetas)
    for cut in (blob[:-1], np.concatenate([blob, np.zeros(1, np.uint8)])):
        with pytest.raises(WireError, match="length|crc32"):
            decode_masks(cut, layout, FP, thetas, bind=(3, 1))


def test_a_wellformed_payload_with_a_bad_field_is_refused_after_the_crc():
    """A payload whose CRC is right (as only a client that knows the key can make) but whose
    index bits, blocks or padding are impossible is still refused, by field."""
    q, theta = problem(600, seed=6)
    words = relative.key_words((FP, 0, 1))
    payload, _, _ = relative.encode(q, theta, words, 4, 2, True, 0)
    index_bits, blocks = payload[0], int.from_bytes(payload[1:5], "little")
    assert (index_bits * blocks) % 8  # the last byte has padding
    cases = {"index bits": bytes([30]) + payload[1:],
             "blocks": payload[:1] + (10**6).to_bytes(4, "little") + payload[5:],
             "padding": payload[:-1] + bytes([payload[-1] | 1]), "length": payload[:-1]}
    for field, bad in cases.items():
        with pytest.raises(WireError) as err:
            relative.read(bad, theta, words, FRAME)
        assert err.value.field == field


def test_the_decoder_draws_only_the_chosen_candidates(monkeypatch):
    q, theta = problem(3000, seed=7)
    blob, _ = coded(q, theta, block_bits=4, extra_bits=6, debias=False)
    drawn: list[int] = []
    real = relative.Philox

    class Counting:
        def __init__(self, **kw):
            self.generator = real(**kw)

        def advance(self, steps):
            self.generator.advance(steps)

        def random_raw(self, count):
            drawn.append(count)
            return self.generator.random_raw(count)

    monkeypatch.setattr(relative, "Philox", Counting)
    layout = Layout((("a", (1500,)), ("b", (1500,))))
    decode_masks(blob, layout, FP, {"a": theta[:1500], "b": theta[1500:]}, bind=(1, 2))
    blocks = int.from_bytes(blob[HEADER_BYTES + 1:HEADER_BYTES + 5].tobytes(), "little")
    assert 4 * sum(drawn) < 3000 + 3000 + blocks * 16 + 64  # the order, one padded candidate a block
    assert 4 * sum(drawn) < 3000 * 2 ** 10 / 100  # what the encoder drew: 2**(C+t) per weight


# ---------------------------------------------------------------- the sample's law


def exact_law(q: np.ndarray, theta: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact law of one block's sample with K = 2**index_bits candidates from theta_hat and
    a choice proportional to w = q(y)/theta_hat(y): P(y) = K q(y) E[1 / (w(y) + S)], S a sum of
    K - 1 weights, with E[1/(a+S)] = int_0^inf exp(-a s) phi(s)**(K-1) ds, phi(s) = E exp(-s w(Y))."""
    q = np.clip(q, relative.Q_CLIP, 1 - relative.Q_CLIP)
    t = relative.quantised_theta(theta) / 65536.0
    n, K = q.size, 2**index_bits
    ys = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(bool)
    log_q, log_t = np.where(ys, np.log(q), np.log1p(-q)).sum(1), np.where(ys, np.log(t), np.log1p(-t)).sum(1)
    w = np.exp(log_q - log_t)
    u = np.linspace(np.log(1e-12 / (K * w.max())), np.log(60.0 / w.min() + 60.0), 8001)
    s = np.exp(u)
    log_phi = np.logaddexp.reduce(log_t[None, :] - s[:, None] * w[None, :], axis=1)
    integrand = np.exp(u[None, :] - s[None, :] * w[:, None] + (K - 1) * log_phi[None, :])
    pmf = K * np.exp(log_q) * np.trapezoid(integrand, u, axis=1)
    return ys, pmf


def test_the_exact_law_formula_against_every_candidate_list():
    q, theta = np.array([0.8, 0.1]), np.array([0.3, 0.6])
    th = relative.quantised_theta(theta) / 65536
    outcomes = [np.array(y, bool) for y in itertools.product([0, 1], repeat=2)]
    prob = lambda p, y: np.prod(np.where(y, p, 1 - p))  # noqa: E731
    truth = np.zeros(4)
    for candidates in itertools.product(range(4), repeat=4):  # K = 4 candidates, each one of 4 outcomes
        w = np.array([prob(q, outcomes[c]) / prob(th, outcomes[c]) for c in candidates])
        chance = np.prod([prob(th, outcomes[c]) for c in candidates])
        for j, c in enumerate(candidates):
            truth[c] += chance * w[j] / w.sum()
    ys, pmf = exact_law(q, theta, 2)
    assert np.allclose(pmf, truth[[int(y[0]) * 2 + int(y[1]) for y in ys]], atol=1e-9)


def test_the_codec_follows_its_exact_law_which_is_not_q():
    """One block of 3 weights with 1.8 bits of KL and K = 4: the decoded samples over 3000 keys
    follow the exact law (chi-square, p > 0.001), whose total variation from q's law is
    above 0.1: too few candidates bias the sample (the stated cost of minimal random coding)."""
    q, theta = np.array([0.8, 0.25, 0.45]), np.array([0.3, 0.5, 0.1])
    assert 1 < relative.kl_bits(q, theta).sum() <= 2
    counts = np.zeros(8)
    for key in range(3000):
        payload, y = sample(q, theta, key, 2, 0, False)
        assert int.from_bytes(payload[1:5], "little") == 1  # one block
        counts[int(y[0]) + 2 * int(y[1]) + 4 * int(y[2])] += 1
    ys, pmf = exact_law(q, theta, 2)
    pmf = pmf[np.argsort(ys @ [1, 2, 4])]
    assert ((counts - 3000 * pmf) ** 2 / (3000 * pmf)).sum() < 24.3  # 7 degrees of freedom, p = 0.001
    law_q = np.array([np.prod(np.where([i & 1, i & 2, i & 4], q, 1 - q)) for i in range(8)])
    assert 0.5 * np.abs(pmf - law_q).sum() > 0.1


def test_each_weights_mean_moves_gamma_of_the_way_or_all_of_it_debiased():
    """2000 weights, about 50 bits of KL (C = 6, t = 1), samples over 300 keys: without
    debiasing each weight's mean moves GAMMA[6, 1] of the way from theta to q (regression
    slope within 0.05); debiased, all the way (slope within 0.05 of 1), and no weight's
    count of ones is off q at the 0.1% family-wise level (exact binomial, Bonferroni)."""
    q, theta = problem(2000, kl_per_weight=0.025, seed=8)
    th = relative.quantised_theta(theta) / 65536
    keys = 300
    for debias, slope_wanted in ((False, relative.GAMMA[6, 1]), (True, 1.0)):
        ones = np.sum([sample(q, theta, key, 6, 1, debias)[1] for key in range(keys)], axis=0)
        slope = ((q - th) * (ones / keys - th)).sum() / ((q - th) ** 2).sum()
        assert abs(slope - slope_wanted) < 0.05, (debias, slope)
    k = np.arange(keys + 1)
    lg = np.vectorize(math.lgamma)
    log_pmf = (lg(keys + 1) - lg(k + 1) - lg(keys - k + 1))[None, :] + k * np.log(q[:, None]) + \
        (keys - k) * np.log1p(-q[:, None])
    cdf = np.cumsum(np.exp(log_pmf), axis=1)
    below = cdf[np.arange(q.size), ones]
    above = 1 - np.concatenate([np.zeros((q.size, 1)), cdf], axis=1)[np.arange(q.size), ones]
    assert np.minimum(1.0, 2 * np.minimum(below, above)).min() > 0.001 / q.size


# ---------------------------------------------------------------- in a run


def test_a_fedpm_run_with_relative_entropy_trains_for_a_fraction_of_the_bytes(tmp_path):
    import fedmask

    base = {"num-rounds": 3, "num-clients": 4, "clients-per-round": 4}
    entropy = fedmask.simulate("configs/quickstart.toml", engine="inprocess", out=tmp_path / "e",
                               **{**base, "uplink-codec": "entropy"})
    coded_run = fedmask.simulate("configs/quickstart.toml", engine="inprocess", out=tmp_path / "r",
                                 **{**base, "uplink-codec": "relative-entropy"})
    for before, now in zip(entropy.rounds, coded_run.rounds):
        assert now["uplink_payload_bytes"] < before["uplink_payload_bytes"] / 5
        assert now["failures"] == 0 and now["clients"] == 4
    assert coded_run.rounds[-1]["accuracy"] > 0.5


def test_relative_entropy_is_refused_for_masks_that_are_not_samples():
    from fedmask.config import ConfigError, resolve

    with pytest.raises(ConfigError, match="uplink-codec"):
        resolve({"method": "edge-popup", "uplink-codec": "relative-entropy"})
    with pytest.raises(ConfigError, match="rec-block-bits"):
        resolve({"uplink-codec": "relative-entropy", "rec-block-bits": 5})
    resolve({"uplink-codec": "relative-entropy", "rec-block-bits": 5, "rec-debias": False})


def test_auto_codes_fedpm_with_relative_entropy_and_the_other_masks_with_entropy():
    """uplink-codec = 'auto' (the default) resolves per mask mode: FedPM's uploads are samples
    of probabilities, the top-k masks are not; the rec-* keys are checked under 'auto' too."""
    from fedmask.config import ConfigError, resolve
    from fedmask.methods import mode_of

    assert resolve({}).uplink_codec == "auto"
    assert mode_of("bernoulli").uplink_codec("auto") == "relative-entropy"
    assert mode_of("topk").uplink_codec("auto") == "entropy"
    assert mode_of("bernoulli").uplink_codec("entropy") == "entropy"
    resolve({"method": "edge-popup"})  # 'auto' is not refused where relative-entropy is
    with pytest.raises(ConfigError, match="rec-block-bits"):
        resolve({"rec-block-bits": 5})


# ---------------------------------------------------------------- the downlink relays the uploads


@pytest.mark.parametrize("overrides", [{}, {"clients-per-round": 4},
                                       {"fault-corrupt-rate": 0.2, "robust-aggregation": "trimmed"}])
def test_nodes_rebuild_the_state_from_the_relayed_uploads_bit_for_bit(tmp_path, overrides):
    """With relative-entropy uploads the lossless downlink sends a node that holds an earlier
    state the uploads of every round since (when that is shortest): the node decodes each
    against the state it holds and aggregates them as the server did, which the digest of
    every step checks (a node that diverged fails its round). Rejected uploads are not
    relayed; partial participation chains several rounds."""
    import fedmask

    run = fedmask.simulate("configs/quickstart.toml", engine="inprocess", out=tmp_path / "r",
                           **{"num-rounds": 5, "uplink-codec": "relative-entropy", **overrides})
    kinds = [row.get("downlink_kinds") or {} for row in run.rounds]
    assert sum(k.get("relay", 0) for k in kinds) >= 10
    assert all(f["kind"] != "client-error" for row in run.rounds for f in row["failure_details"])
    if "fault-corrupt-rate" in overrides:
        assert any(f["kind"] == "rejected" for row in run.rounds for f in row["failure_details"])
    entropy = fedmask.simulate("configs/quickstart.toml", engine="inprocess", out=tmp_path / "e",
                               **{"num-rounds": 5, "uplink-codec": "entropy", **overrides})
    assert sum(r["downlink_payload_bytes"] for r in run.rounds[1:]) < \
        sum(r["downlink_payload_bytes"] for r in entropy.rounds[1:]) / 4


def test_a_tampered_relay_is_refused():
    from fedmask.downlink import Held, receive
    from fedmask.wire.lossless import encode_relay, replay_blob, state_digest

    layout = Layout((("w", (8,)),))
    state = {"w": np.full(8, 0.5, np.float32)}
    step = encode_relay(1, b"\0" * 8, [(0, 1.0, b"not an upload")], 1.0)
    blob = replay_blob([step], FP, (0, state_digest(state, layout)), (1, b"\0" * 8))
    held = Held(0, state_digest(state, layout), state)
    calls = []

    def rebuild(s, r, uploads):
        calls.append(uploads)
        return s

    with pytest.raises(WireError, match="digest"):  # rebuilt, but not the state the step names
        receive(blob, layout, FP, held, lambda: state, None, lambda s: {}, rebuild)
    assert calls == [[(0, 1.0, b"not an upload")]]
    bad = blob.copy()
    bad[-3] ^= 1
    with pytest.raises(WireError, match="crc32"):
        receive(bad, layout, FP, held, lambda: state, None, lambda s: {}, rebuild)
    with pytest.raises(WireError, match="relay"):  # a node that cannot aggregate uploads (a plug-in's run)
        receive(blob, layout, FP, held, lambda: state, None, lambda s: {}, None)
