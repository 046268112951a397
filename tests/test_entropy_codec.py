"""Tests for the entropy-coded uplink (codec 2) of fedmask.wire.masks.

The packbits codec and the generic header checks live in test_codec.py; here: round trips
under every model, the sizes the encoder promises, which model it picks, the 9-byte section
headers, and every way a codec-2 upload is refused (or, for a wrong prior, is not).
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmask.core.masking import topk_mask_np
from fedmask.methods.edge_popup import TopK
from fedmask.methods.fedpm import Bernoulli
from fedmask.wire.frame import Layout, WireError
from fedmask.wire.masks import READABLE_FORMATS, code_lengths, decode_masks, encode_masks, section_candidates

# From the format spec (module docstring of fedmask.wire.masks), little-endian.
SPEC_HEADER = struct.Struct("<4sBBHQ8sI")  # magic | format | codec | reserved | bit count | fingerprint | crc32
HEADER = SPEC_HEADER.size  # 28
SPEC_SECTION = struct.Struct("<BII")  # model | param | coded bytes
SECTION = SPEC_SECTION.size  # 9
PACKED, SIDE, FREQUENCY = 0, 1, 2
SLACK = 8  # bytes the packed fallback may be exceeded by, over all tensors (rounding of sections)

FP = b"\x01\x23\x45\x67\x89\xab\xcd\xef"


def layout_of(*sizes: int, shapes: list[tuple[int, ...]] | None = None) -> Layout:
    shapes = shapes or [(n,) for n in sizes]
    return Layout(tuple((f"t{i:02d}", tuple(s)) for i, s in enumerate(shapes)))


def parse_sections(blob: np.ndarray) -> list[tuple[int, int, int, bytes]]:
    """(model, param, coded bytes, data) of every section, read with the spec's struct."""
    payload = blob[HEADER:].tobytes()
    out, offset = [], 0
    while offset < len(payload):
        model, param, length = SPEC_SECTION.unpack_from(payload, offset)
        offset += SECTION
        out.append((model, param, length, payload[offset : offset + length]))
        offset += length
    assert offset == len(payload), "sections must tile the payload exactly"
    return out


def spec_crc(payload: bytes, prior=None, layout: Layout | None = None) -> int:
    """The spec's CRC32: over the payload, seeded with a CRC32 of the prior's float64 values
    (layout order) when a section header reads 'side'."""
    offset, side = 0, False
    for _ in range(len(layout.shapes) if layout else 0):
        if offset + SECTION > len(payload):
            break
        model, _, length = SPEC_SECTION.unpack_from(payload, offset)
        side |= model == SIDE
        offset += SECTION + length
    seed = 0
    if side and prior is not None:
        for name, _ in layout.shapes:
            seed = zlib.crc32(np.asarray(prior[name], dtype=np.float64).tobytes(), seed)
    return zlib.crc32(payload, seed)


def reseal(blob: np.ndarray | bytes, payload: bytes | None = None, prior=None,
           layout: Layout | None = None) -> np.ndarray:
    """The blob's header (CRC recomputed, against ``prior``) over ``payload`` (default: its own)."""
    raw = bytes(blob) if isinstance(blob, bytes) else blob.tobytes()
    payload = raw[HEADER:] if payload is None else payload
    fields = list(SPEC_HEADER.unpack(raw[:HEADER]))
    fields[-1] = spec_crc(payload, prior, layout)
    return np.frombuffer(SPEC_HEADER.pack(*fields) + payload, dtype=np.uint8).copy()


def packbits_size(layout: Layout) -> int:
    return HEADER + (layout.num_params + 7) // 8


def rejected(blob, layout, prior=None, fingerprint=FP) -> WireError:
    with pytest.raises(WireError) as info:
        decode_masks(blob, layout, fingerprint, prior)
    err = info.value
    assert err.field in str(err) and "expected" in str(err)
    return err


def assert_same_masks(decoded: dict, masks: dict, layout: Layout) -> None:
    assert list(decoded) == [name for name, _ in layout.shapes]
    for name, shape in layout.shapes:
        assert decoded[name].dtype == bool and decoded[name].shape == shape
        assert np.array_equal(decoded[name], np.asarray(masks[name], dtype=bool))


def entropy(f: float) -> float:
    return 0.0 if f in (0.0, 1.0) else -(f * math.log2(f) + (1 - f) * math.log2(1 - f))


# ---------------------------------------------------------------- a mixed reference blob


def mixed_case(seed: int = 0):
    """Three tensors that code as side (theta), frequency (sparse) and packed (random)."""
    rng = np.random.default_rng(seed)
    layout = layout_of(shapes=[(20, 30), (400,), (64,)])
    theta = {"t00": rng.choice([0.02, 0.98], (20, 30)), "t01": rng.uniform(0.01, 0.99, 400),
             "t02": rng.uniform(0.01, 0.99, 64)}
    masks = {"t00": rng.random((20, 30)) < theta["t00"],  # follows its prior: side
             "t01": rng.random(400) < 0.01,  # unrelated to a soft prior but sparse: frequency
             "t02": rng.random(64) < 0.5}  # unrelated and dense: packed
    return layout, masks, theta


def mixed_blob(seed: int = 0):
    layout, masks, prior = mixed_case(seed)
    return encode_masks(masks, layout, FP, "entropy", prior), layout, masks, prior


def test_mixed_blob_uses_all_three_models():
    """The reference blob exercises every model, so the safety tests below cover each one."""
    blob, layout, masks, prior = mixed_blob()
    models = [s[0] for s in parse_sections(blob)]
    assert models == [SIDE, FREQUENCY, PACKED]
    assert_same_masks(decode_masks(blob, layout, FP, prior), masks, layout)


# ---------------------------------------------------------------- 1. round trips

sizes = st.lists(st.integers(1, 5000), min_size=1, max_size=4)
PRIOR_KINDS = ("theta-sampled", "theta-unrelated", "topk", "none")


def draw_case(rng: np.random.Generator, layout: Layout, kind: str):
    masks, prior = {}, {}
    for name, shape in layout.shapes:
        if kind.startswith("theta"):
            spread = rng.choice(["uniform", "extreme", "beta"])
            if spread == "uniform":
                theta = rng.uniform(0.01, 0.99, shape)
            elif spread == "extreme":
                theta = rng.choice([0.01, 0.99], shape)
            else:
                theta = np.clip(rng.beta(0.2, 0.2, shape), 0.01, 0.99)
            prior[name] = Bernoulli().prior({name: theta})[name]
            density = rng.choice([0.0, 0.01, 0.5, 0.97, 1.0])
            masks[name] = rng.random(shape) < (theta if kind == "theta-sampled" else density)
        elif kind == "topk":
            density = float(rng.uniform(0.01, 0.99))
            prior[name] = TopK(density).prior({name: rng.normal(size=shape)})[name]
            flips = rng.random(shape) < rng.choice([0.0, 0.001, 0.01, 0.1, 0.5])
            masks[name] = prior[name].astype(bool) ^ flips
        else:
            masks[name] = rng.random(shape) < rng.choice([0.0, 0.001, 0.05, 0.5, 0.99, 1.0])
    return masks, (None if kind == "none" else prior)


@settings(max_examples=80, deadline=None)
@given(sizes=sizes, two_d=st.booleans(), kind=st.sampled_from(PRIOR_KINDS), seed=st.integers(0, 2**32 - 1))
def test_entropy_round_trip(sizes, two_d, kind, seed):
    """decode(encode(m)) == m under every prior kind; header and sections are well formed."""
    shapes = [(1, n) if two_d and i % 2 else (n,) for i, n in enumerate(sizes)]
    layout = layout_of(shapes=shapes)
    rng = np.random.default_rng(seed)
    masks, prior = draw_case(rng, layout, kind)
    blob = encode_masks(masks, layout, FP, "entropy", prior)

    assert blob.dtype == np.uint8 and blob.ndim == 1
    magic, version, codec, reserved, count, fp, crc = SPEC_HEADER.unpack(blob[:HEADER].tobytes())
    assert (magic, version, codec, reserved, count, fp) == (b"FMSK", 4, 2, 0, layout.num_params, FP)
    assert crc == spec_crc(blob[HEADER:].tobytes(), prior, layout)

    sections = parse_sections(blob)
    assert len(sections) == len(layout.shapes)
    for (model, param, length, _), (name, shape) in zip(sections, layout.shapes):
        size = math.prod(shape)
        assert model in ((PACKED, FREQUENCY) if prior is None else (PACKED, SIDE, FREQUENCY))
        assert length <= (size + 7) // 8  # never more than the tensor's packed bits
        if model == PACKED:
            assert length == (size + 7) // 8 and param == 0
        else:
            assert length % 4 == 0
        if model == FREQUENCY:
            assert param == int(masks[name].sum())

    # 2. size: never more than packbits + a section header per tensor + slack
    assert blob.size <= packbits_size(layout) + SECTION * len(layout.shapes) + SLACK

    assert_same_masks(decode_masks(blob, layout, FP, prior), masks, layout)
    # a prior the side model did not use is not needed to decode
    if prior is not None and SIDE not in [s[0] for s in sections]:
        assert_same_masks(decode_masks(blob, layout, FP, None), masks, layout)


@settings(max_examples=40, deadline=None)
@given(sizes=sizes, kind=st.sampled_from(PRIOR_KINDS), seed=st.integers(0, 2**32 - 1))
def test_encoding_is_deterministic(sizes, kind, seed):
    """The same masks and prior give the same bytes, whatever was encoded in between."""
    layout = layout_of(*sizes)
    masks, prior = draw_case(np.random.default_rng(seed), layout, kind)
    first = encode_masks(masks, layout, FP, "entropy", prior)
    other_masks, other_prior = draw_case(np.random.default_rng(seed + 1), layout, kind)
    encode_masks(other_masks, layout, FP, "entropy", other_prior)
    assert np.array_equal(first, encode_masks(masks, layout, FP, "entropy", prior))
    assert np.array_equal(encode_masks(masks, layout, FP, "packbits"), encode_masks(masks, layout, FP, "packbits"))


# ---------------------------------------------------------------- 2. sizes


def test_theta_sampled_mask_codes_at_its_ideal_length():
    """100k params, theta at 0.01/0.99: coded size ~ ideal bits (= -sum log2 p) and << 1 bpp."""
    rng = np.random.default_rng(1)
    layout = layout_of(60_000, 40_000)
    theta = {name: rng.choice([0.01, 0.99], shape) for name, shape in layout.shapes}
    masks = {name: rng.random(shape) < theta[name] for name, shape in layout.shapes}
    blob = encode_masks(masks, layout, FP, "entropy", theta)
    assert [s[0] for s in parse_sections(blob)] == [SIDE, SIDE]

    ideal = code_lengths(masks, layout, "entropy", theta)["ideal_bits"]
    # independently: no theta is exactly 0 or 1, so the flip rate is 0 and p is theta itself
    expected = sum(-np.log2(np.where(masks[n], theta[n], 1 - theta[n])).sum() for n, _ in layout.shapes)
    assert ideal == pytest.approx(expected, rel=1e-9)

    payload = blob.size - HEADER
    assert abs(payload - ideal / 8) <= 0.01 * ideal / 8 + SECTION * 2 + 8
    bpp = 8 * blob.size / layout.num_params
    assert bpp < 0.15  # H(0.01) = 0.081
    assert_same_masks(decode_masks(blob, layout, FP, theta), masks, layout)


def test_topk_mask_with_one_percent_flips_costs_under_015_bpp():
    """Edge-popup: mask = top-k prior with 1% flips -> side model, < 0.15 bits per parameter."""
    rng = np.random.default_rng(2)
    layout = layout_of(70_000, 30_000)
    scores = {name: rng.normal(size=shape) for name, shape in layout.shapes}
    prior = TopK(0.3).prior(scores)
    masks = {name: prior[name].astype(bool) ^ (rng.random(shape) < 0.01) for name, shape in layout.shapes}
    blob = encode_masks(masks, layout, FP, "entropy", prior)
    assert [s[0] for s in parse_sections(blob)] == [SIDE, SIDE]
    assert 8 * blob.size / layout.num_params < 0.15
    assert blob.size < packbits_size(layout) / 6
    assert_same_masks(decode_masks(blob, layout, FP, prior), masks, layout)


@pytest.mark.parametrize("density", [0.0, 0.003, 0.1, 0.5, 1.0])
def test_formula_bits_is_fedpm_formula(density):
    """formula_bits == N*H(f) + log2(N), f the fraction of ones over all tensors."""
    rng = np.random.default_rng(3)
    layout = layout_of(shapes=[(30, 40), (500,), (7,)])
    masks = {name: rng.random(shape) < density for name, shape in layout.shapes}
    n = 1200 + 500 + 7
    f = float(np.concatenate([m.ravel() for m in masks.values()]).mean())
    for codec in ("packbits", "entropy"):
        lengths = code_lengths(masks, layout, codec, None)
        assert lengths["formula_bits"] == pytest.approx(n * entropy(f) + math.log2(n), rel=1e-12, abs=1e-9)
    assert code_lengths(masks, layout, "packbits", None)["ideal_bits"] == n


@settings(max_examples=30, deadline=None)
@given(sizes=sizes, kind=st.sampled_from(PRIOR_KINDS), seed=st.integers(0, 2**32 - 1))
def test_ideal_bits_is_the_chosen_candidate(sizes, kind, seed):
    """ideal_bits sums, per tensor, the candidate the encoder actually wrote (its model id)."""
    layout = layout_of(*sizes)
    masks, prior = draw_case(np.random.default_rng(seed), layout, kind)
    blob = encode_masks(masks, layout, FP, "entropy", prior)
    total = 0.0
    for (model, param, _, _), (name, _) in zip(parse_sections(blob), layout.shapes):
        bits = masks[name].ravel()
        cands = {m: (p, b) for m, p, b in section_candidates(bits, None if prior is None else prior[name])}
        assert cands[model][0] == param
        assert cands[PACKED][1] == 8 * ((bits.size + 7) // 8)
        total += cands[model][1]
    assert code_lengths(masks, layout, "entropy", prior)["ideal_bits"] == pytest.approx(total)


# ---------------------------------------------------------------- 3. model choice and section headers


def test_all_zero_mask_uses_frequency_model_and_is_tiny():
    layout = layout_of(5000, 3000, 17)
    masks = {name: np.zeros(shape, bool) for name, shape in layout.shapes}
    blob = encode_masks(masks, layout, FP, "entropy", None)
    sections = parse_sections(blob)
    # 17 bits: 3 bytes packed cannot be beaten by 8 bytes of coder slack
    assert [(m, p) for m, p, _, _ in sections] == [(FREQUENCY, 0), (FREQUENCY, 0), (PACKED, 0)]
    assert all(length <= 8 for m, _, length, _ in sections if m == FREQUENCY)
    assert blob.size <= HEADER + 3 * SECTION + 8 + 8 + 3
    assert_same_masks(decode_masks(blob, layout, FP), masks, layout)


def test_all_one_mask_uses_frequency_model_with_param_size():
    layout = layout_of(4000)
    masks = {"t00": np.ones(4000, bool)}
    blob = encode_masks(masks, layout, FP, "entropy", None)
    [(model, param, length, _)] = parse_sections(blob)
    assert (model, param) == (FREQUENCY, 4000) and length <= 8
    assert_same_masks(decode_masks(blob, layout, FP), masks, layout)


def test_dense_random_mask_without_prior_falls_back_to_packed():
    """Density 0.5, no prior: every section is the packed bits; size == packbits + 9 per tensor."""
    rng = np.random.default_rng(4)
    layout = layout_of(shapes=[(40, 50), (8000,), (16,)])  # sizes multiple of 8: no extra rounding
    masks = {name: rng.random(shape) < 0.5 for name, shape in layout.shapes}
    blob = encode_masks(masks, layout, FP, "entropy", None)
    assert blob.size == packbits_size(layout) + SECTION * len(layout.shapes)
    for (model, param, length, data), (name, shape) in zip(parse_sections(blob), layout.shapes):
        assert (model, param, length) == (PACKED, 0, math.prod(shape) // 8)
        assert data == np.packbits(masks[name].ravel()).tobytes()


def test_soft_prior_unrelated_to_the_mask_is_not_used():
    """A dense mask unrelated to a uniform theta costs more under the side model: packed wins."""
    rng = np.random.default_rng(5)
    layout = layout_of(10_000)
    prior = {"t00": rng.uniform(0.01, 0.99, 10_000)}
    masks = {"t00": rng.random(10_000) < 0.5}
    blob = encode_masks(masks, layout, FP, "entropy", prior)
    [(model, _, length, _)] = parse_sections(blob)
    assert (model, length) == (PACKED, 1250)
    assert_same_masks(decode_masks(blob, layout, FP, None), masks, layout)


@pytest.mark.parametrize("flips", [0, 1, 37])
def test_side_section_header_holds_flip_rate(flips):
    """A top-k prior: model 1, param = round((flips + 1/2) / (n + 1) * 2**32), at least 1."""
    rng = np.random.default_rng(6)
    n = 3000
    layout = layout_of(n)
    prior = TopK(0.2).prior({"t00": rng.normal(size=n)})
    mask = prior["t00"].astype(bool)
    mask[rng.choice(n, flips, replace=False)] ^= True
    blob = encode_masks({"t00": mask}, layout, FP, "entropy", prior)
    [(model, param, length, data)] = parse_sections(blob)
    assert model == SIDE
    assert param == max(1, round((flips + 0.5) / (n + 1) * 2**32))
    # the spec: each bit is coded with p(1) = prior (1 - 2 f) + f, f = param / 2**32
    f = param / 2**32
    p_one = prior["t00"] * (1 - 2 * f) + f
    ideal = -np.log2(np.where(mask, p_one, 1 - p_one)).sum()
    side = [c for c in section_candidates(mask, prior["t00"]) if c[0] == SIDE]
    assert side == [(SIDE, param, pytest.approx(ideal, rel=1e-6))]
    assert length == len(data) == blob.size - HEADER - SECTION and length % 4 == 0
    assert_same_masks(decode_masks(blob, layout, FP, prior), {"t00": mask}, layout)


def test_topk_prior_is_topk_of_magnitude():
    """TopK(d).prior(scores) == topk_mask_np(|scores|, d) per tensor; 0/1 float64."""
    rng = np.random.default_rng(7)
    scores = {"a": rng.normal(size=(30, 20)), "b": rng.normal(size=999).astype(np.float32), "c": np.array([-2.0])}
    for density in (0.01, 0.3, 0.5, 1.0):
        prior = TopK(density).prior(scores)
        assert set(prior) == set(scores)
        for name, s in scores.items():
            expected = topk_mask_np(np.abs(s), density)
            assert prior[name].dtype == np.float64 and prior[name].shape == s.shape
            assert np.array_equal(prior[name], expected)
            assert prior[name].sum() == max(1, round(density * s.size))
            kept = np.abs(s)[prior[name] == 1.0]
            dropped = np.abs(s)[prior[name] == 0.0]
            assert dropped.size == 0 or kept.min() >= dropped.max()


def test_bernoulli_prior_is_theta_as_float64_copy():
    theta = {"a": np.random.default_rng(8).random((4, 5)).astype(np.float32)}
    prior = Bernoulli().prior(theta)
    assert prior["a"].dtype == np.float64 and np.array_equal(prior["a"], theta["a"].astype(np.float64))
    assert not np.shares_memory(prior["a"], theta["a"])


# ---------------------------------------------------------------- 4. safety


def test_every_truncation_is_refused():
    """Cutting a codec-2 blob anywhere (header or any section) raises WireError."""
    blob, layout, _, prior = mixed_blob()
    for cut in range(blob.size):
        err = rejected(blob[:cut].copy(), layout, prior)
        assert err.field == ("length" if cut < HEADER else "crc32")


@settings(max_examples=150, deadline=None)
@given(bit=st.integers(0, 8 * mixed_blob()[0].size - 1), seed=st.integers(0, 3))
def test_every_single_bit_flip_is_refused(bit, seed):
    """One flipped bit anywhere (header, section header, coded stream) -> WireError."""
    blob, layout, _, prior = mixed_blob(seed)
    if bit >= 8 * blob.size:
        bit %= 8 * blob.size
    blob[bit // 8] ^= np.uint8(1 << (bit % 8))
    err = rejected(blob, layout, prior)
    if bit // 8 >= HEADER:
        assert err.field == "crc32"


@pytest.mark.parametrize("version", [2, 3])
def test_an_upload_whose_format_byte_reads_an_older_version_is_refused(version):
    """The CRC does not cover the header: a version-4 upload whose format byte reads 2 or 3
    (one flipped bit turned 3 into 2 before format 4, found by the bit-flip property test
    above) is refused; older formats are only accepted from the server's own recycling log."""
    blob, layout, _, prior = mixed_blob(0)
    blob[4] = np.uint8(version)
    assert rejected(blob, layout, prior).field == "format version"


@pytest.mark.parametrize("kind", ["bernoulli", "topk"])
def test_decoding_with_another_prior_is_refused(kind):
    rng = np.random.default_rng(9)
    layout = layout_of(2000, 1000)
    if kind == "bernoulli":
        prior = {name: rng.uniform(0.01, 0.99, shape) for name, shape in layout.shapes}
        other = {name: rng.uniform(0.01, 0.99, shape) for name, shape in layout.shapes}
        masks = {name: rng.random(shape) < prior[name] for name, shape in layout.shapes}
    else:
        prior = TopK(0.3).prior({n: rng.normal(size=s) for n, s in layout.shapes})
        other = TopK(0.3).prior({n: rng.normal(size=s) for n, s in layout.shapes})
        # the client kept the broadcast top-k exactly. (With flipped bits the range decoder
        # sometimes trips over the mismatch and raises 'stream', but only by chance: ~1 in 5.)
        masks = {name: prior[name].astype(bool) for name, _ in layout.shapes}
    blob = encode_masks(masks, layout, FP, "entropy", prior)
    assert [s[0] for s in parse_sections(blob)] == [SIDE, SIDE]
    try:
        decoded = decode_masks(blob, layout, FP, other)
    except WireError:
        return  # the fixed behaviour
    # what happens today: a mask of the right shape that is not the one that was sent
    assert not all(np.array_equal(decoded[n], masks[n]) for n, _ in layout.shapes)
    pytest.fail("a blob coded against one prior decoded silently with another")


def test_prior_of_the_wrong_size_is_refused():
    """A prior tensor of another size than the layout's cannot decode a side section."""
    blob, layout, _, prior = mixed_blob()
    for size in (599, 601, 1):
        bad = dict(prior, t00=np.full(size, 0.5))
        err = rejected(blob, layout, bad)
        assert "t00" in err.field


@pytest.mark.parametrize("prior", [None, "other tensors"])
def test_missing_prior_for_side_section_names_side_information(prior):
    blob, layout, _, full = mixed_blob()
    prior = None if prior is None else {"t01": full["t01"], "t02": full["t02"]}
    err = rejected(blob, layout, prior)
    assert "side information" in err.field and "side information" in str(err) and "t00" in err.field


SMALL = layout_of(shapes=[(37,), (5, 40)])
SMALL_PRIOR = {"t00": np.random.default_rng(10).random(37),
               "t01": (np.random.default_rng(11).random((5, 40)) < 0.5).astype(np.float64)}
SMALL_HEADER = SPEC_HEADER.pack(b"FMSK", 1, 2, 0, SMALL.num_params, FP, 0)


@st.composite
def plausible_payloads(draw):
    """Section headers with plausible fields (sometimes lying) over random coded bytes."""
    out = b""
    for _, shape in SMALL.shapes:
        size = math.prod(shape)
        model = draw(st.one_of(st.sampled_from([PACKED, SIDE, FREQUENCY]), st.integers(0, 255)))
        param = draw(st.one_of(st.integers(0, size + 1), st.integers(0, 2**32 - 1)))
        n = draw(st.one_of(st.just((size + 7) // 8), st.integers(0, 8).map(lambda k: 4 * k), st.integers(0, 40)))
        data = draw(st.binary(min_size=n, max_size=n))
        length = draw(st.one_of(st.just(n), st.integers(0, 60)))
        out += SPEC_SECTION.pack(model, param, length) + data
    cut = draw(st.integers(0, len(out)))
    return out if draw(st.booleans()) else out[:cut]


@settings(max_examples=300, deadline=None)
@given(payload=st.one_of(st.binary(max_size=120), plausible_payloads()), with_prior=st.booleans())
def test_random_payload_behind_valid_header_and_crc_only_raises_mask_codec_error(payload, with_prior):
    """Right codec, bit count, fingerprint and CRC over random bytes: WireError or a mask
    of exactly the layout's shape, never another exception."""
    blob = reseal(SMALL_HEADER, payload, SMALL_PRIOR if with_prior else None, SMALL)
    try:
        decoded = decode_masks(blob, SMALL, FP, SMALL_PRIOR if with_prior else None)
    except WireError:
        return
    assert list(decoded) == [name for name, _ in SMALL.shapes]
    for name, shape in SMALL.shapes:
        assert decoded[name].dtype == bool and decoded[name].shape == shape


def tamper(blob: np.ndarray, index: int, **changes) -> np.ndarray:
    """Rewrite fields of section ``index`` (model, param, length; data=...; cut=n bytes off the
    end) and recompute the CRC, so only the section checks can catch it."""
    sections = [list(s) for s in parse_sections(blob)]
    fields = dict(zip(("model", "param", "length", "data"), sections[index]))
    fields.update({k: v for k, v in changes.items() if k != "cut"})
    sections[index] = [fields["model"], fields["param"], fields["length"], fields["data"]]
    payload = b"".join(SPEC_SECTION.pack(m, p, n) + d for m, p, n, d in sections)
    payload = payload[: len(payload) - changes.get("cut", 0)]
    layout, _, prior = mixed_case(0)
    return reseal(blob, payload, prior, layout)


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("model", [4, 7, 255])
def test_unknown_model_id_refused(index, model):
    blob, layout, _, prior = mixed_blob()
    err = rejected(tamper(blob, index, model=model), layout, prior)
    assert "model" in err.field and f"t0{index}" in err.field


def test_frequency_param_beyond_size_refused():
    blob, layout, _, prior = mixed_blob()
    assert parse_sections(blob)[1][0] == FREQUENCY
    for param in (401, 2**32 - 1):
        err = rejected(tamper(blob, 1, param=param), layout, prior)
        assert "t01" in err.field and "ones" in err.field


@pytest.mark.parametrize("index", [0, 1, 2])
def test_coded_length_past_the_end_refused(index):
    blob, layout, _, prior = mixed_blob()
    remaining = blob.size - HEADER
    for length in (remaining, 2**32 - 1):
        err = rejected(tamper(blob, index, length=length), layout, prior)
        assert f"t0{index}" in err.field and "length" in err.field


@pytest.mark.parametrize("delta", [-1, 1])
def test_packed_section_of_the_wrong_length_refused(delta):
    """A packed section one byte short or long (length field and data agreeing) is refused."""
    blob, layout, _, prior = mixed_blob()
    model, _, length, data = parse_sections(blob)[2]
    assert model == PACKED and length == 8
    data = data[:-1] if delta < 0 else data + b"\x00"
    err = rejected(tamper(blob, 2, length=length + delta, data=data), layout, prior)
    assert "t02" in err.field and "length" in err.field


def test_coded_section_not_whole_words_refused():
    blob, layout, _, prior = mixed_blob()
    _, _, length, data = parse_sections(blob)[1]
    err = rejected(tamper(blob, 1, length=length - 1, data=data[:-1]), layout, prior)
    assert "t01" in err.field and "whole 32-bit words" in str(err) and f"{length - 1} bytes" in str(err)


def test_missing_section_and_trailing_bytes_refused():
    blob, layout, _, prior = mixed_blob()
    last = SECTION + parse_sections(blob)[2][2]
    assert "t02" in rejected(reseal(blob, blob[HEADER:-last].tobytes(), prior, layout), layout, prior).field
    assert rejected(reseal(blob, blob[HEADER:].tobytes() + b"\x00", prior, layout), layout, prior).field == "length"


def test_entropy_blob_longer_than_packed_bound_refused():
    """More than packed + 9/tensor + 64 bytes cannot be an honest codec-2 upload."""
    blob, layout, _, prior = mixed_blob()
    limit = packbits_size(layout) + SECTION * 3 + 64
    padded = reseal(blob, blob[HEADER:].tobytes() + bytes(limit + 1 - blob.size))
    assert padded.size == limit + 1
    err = rejected(padded, layout, prior)
    assert err.field == "length" and str(limit) in str(err)


def byte_table(prob: float) -> np.ndarray:
    """Format 3's probability of each byte of eight bits that are 1 with probability prob,
    from the module docstring: the product over its bits, first bit most significant, of
    prob or 1 - prob, multiplied in that order."""
    table = np.empty(256)
    for byte in range(256):
        product = 1.0
        for shift in range(7, -1, -1):
            product *= prob if (byte >> shift) & 1 else 1.0 - prob
        table[byte] = product
    return table


def reference_run(encoder, bits: np.ndarray, prob: float) -> None:
    """Format 3's coding of a frequency section: whole bytes of np.packbits as symbols
    (:func:`byte_table`), then the rest bit by bit."""
    import constriction

    whole = bits.size - bits.size % 8
    if whole:
        encoder.encode(np.packbits(bits[:whole]).astype(np.int32),
                       constriction.stream.model.Categorical(byte_table(prob), perfect=False))
    if whole < bits.size:
        encoder.encode(bits[whole:].astype(np.int32), constriction.stream.model.Bernoulli(prob, perfect=False))


@pytest.mark.parametrize("distinct", [3, 4096, 4097])
def test_side_section_is_coded_group_by_group_when_the_prior_has_few_values(distinct):
    """The format-3 side model, rebuilt here with constriction from the module docstring:
    with at most SIDE_GROUPS_MAX (4096) distinct prior values, the weights grouped by value
    (groups by increasing value, weight order within); each group of at least RUN_BYTES_MIN
    (32) bytes codes its whole bytes as symbols (:func:`byte_table`), then every other bit
    follows bit by bit with its group's probability; above 4096 values, bit by bit. The
    section's bytes must equal that reference coding, and decode back to the mask."""
    import constriction

    from fedmask.wire import masks as codec

    assert (codec.SIDE_GROUPS_MAX, codec.RUN_BYTES_MIN) == (4096, 32)
    rng = np.random.default_rng(distinct)
    levels = np.linspace(0.02, 0.98, distinct)
    theta = rng.permutation(np.repeat(levels, max(3, 6003 // distinct)))  # every value used; 2001 a group for 3
    mask = rng.random(theta.size) < theta
    layout = Layout((("w", (theta.size,)),))
    blob = encode_masks({"w": mask}, layout, FP, "entropy", {"w": theta})
    [(model, param, _, data)] = parse_sections(blob)
    assert (model, param) == (SIDE, 0)  # a soft prior: no flip rate
    encoder = constriction.stream.queue.RangeEncoder()
    if distinct <= 4096:
        tail_bits, tail_probs = [], []
        for value in np.unique(theta):
            group = mask[theta == value]
            whole = group.size - group.size % 8 if group.size >= 8 * 32 else 0
            if whole:
                encoder.encode(np.packbits(group[:whole]).astype(np.int32),
                               constriction.stream.model.Categorical(byte_table(float(value)), perfect=False))
            tail_bits.append(group[whole:])
            tail_probs.append(np.full(group.size - whole, value))
        encoder.encode(np.concatenate(tail_bits).astype(np.int32), constriction.stream.model.Bernoulli(perfect=False),
                       np.concatenate(tail_probs))
    else:
        encoder.encode(mask.astype(np.int32), constriction.stream.model.Bernoulli(perfect=False), theta)
    assert data == encoder.get_compressed().astype("<u4").tobytes()
    assert np.array_equal(decode_masks(blob, layout, FP, {"w": theta})["w"], mask)


@pytest.mark.parametrize("size", [4000, 1003])
def test_frequency_section_is_coded_eight_bits_a_symbol(size):
    """Format 3's frequency model: without a prior, a sparse mask is coded as one run with
    probability ones / size (:func:`reference_run`: whole bytes, then the last size % 8
    bits one by one); the section's bytes equal that reference and decode back."""
    import constriction

    rng = np.random.default_rng(size)
    mask = np.zeros(size, dtype=bool)
    mask[rng.choice(size, max(1, size // 20), replace=False)] = True
    layout = Layout((("w", (size,)),))
    blob = encode_masks({"w": mask}, layout, FP, "entropy", None)
    [(model, param, _, data)] = parse_sections(blob)
    assert (model, param) == (FREQUENCY, int(mask.sum()))
    encoder = constriction.stream.queue.RangeEncoder()
    reference_run(encoder, mask, int(mask.sum()) / size)
    assert data == encoder.get_compressed().astype("<u4").tobytes()
    assert np.array_equal(decode_masks(blob, layout, FP, None)["w"], mask)


def test_format_2_uploads_from_earlier_checkpoints_still_decode():
    """A format-2 upload (what earlier versions wrote into checkpoints' recycling logs):
    built here from format 2's spec (a side section group by group, one coder symbol per
    bit; a frequency section bit by bit) with a version-2 header, it decodes to its mask
    when format 2 is asked for (as the recycling log's reader does); as an upload (the
    default), and versions 1 and 5 always, it is refused naming the format version."""
    import constriction

    rng = np.random.default_rng(2)
    layout = Layout((("a", (2003,)), ("b", (1001,))))
    theta = rng.permutation(np.repeat([0.1, 0.5, 0.9], 668))[:2003]
    masks = {"a": rng.random(2003) < theta, "b": rng.random(1001) < 0.05}
    prior = {"a": theta, "b": np.full(1001, 0.5)}
    encoder = constriction.stream.queue.RangeEncoder()
    for value in np.unique(theta):
        encoder.encode(masks["a"][theta == value].astype(np.int32),
                       constriction.stream.model.Bernoulli(float(value), perfect=False))
    side = encoder.get_compressed().astype("<u4").tobytes()
    ones = int(masks["b"].sum())
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(masks["b"].astype(np.int32), constriction.stream.model.Bernoulli(ones / 1001, perfect=False))
    frequency = encoder.get_compressed().astype("<u4").tobytes()
    payload = (SPEC_SECTION.pack(SIDE, 0, len(side)) + side
               + SPEC_SECTION.pack(FREQUENCY, ones, len(frequency)) + frequency)
    header = SPEC_HEADER.pack(b"FMSK", 2, 2, 0, layout.num_params, FP, 0)
    blob = reseal(header + payload, prior=prior, layout=layout)
    assert_same_masks(decode_masks(blob, layout, FP, prior, formats=READABLE_FORMATS), masks, layout)
    assert rejected(blob, layout, prior).field == "format version"  # an upload must be format 4
    for version in (1, 5):
        other = reseal(SPEC_HEADER.pack(b"FMSK", version, 2, 0, layout.num_params, FP, 0) + payload, prior=prior,
                       layout=layout)
        assert rejected(other, layout, prior).field == "format version"
