"""The grouped section model of the entropy-coded uplink (fedmask.wire.masks, format 4).

A ``ContextPrior`` carries, next to the 0/1 (or soft) probabilities the side model codes
against, a small integer per weight both ends know (edge-popup's ``vote-levels``: the
weight's level and whether it is in the global top-k). The grouped model sends each
context's count of ones and codes the bits of a context with probability k / n: here its
round trips, its bytes rebuilt from the module docstring, its length against the ideal
``sum n H(k/n) + log2(n + 1)``, when the encoder picks it, the CRC over the contexts, the
ways a grouped section is refused, and a run whose uploads it shortens.
"""

from __future__ import annotations

import json
import math
import zlib

import constriction
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clients.received as received_module
from clients.client_app import app as client_app
from engines.inprocess import InProcessGrid
from fedmask.config import resolve
from fedmask.methods.biprop import Biprop
from fedmask.methods.edge_popup import TopK
from fedmask.wire import masks as codec
from fedmask.wire.frame import Layout, WireError
from fedmask.wire.masks import READABLE_FORMATS, ContextPrior, code_lengths, decode_masks, encode_masks
from server.server_app import run_server

# the format's header, sections and byte model, as the entropy codec's spec tests read them
from tests.test_entropy_codec import FP, HEADER, SECTION, SPEC_HEADER, SPEC_SECTION, byte_table, parse_sections

PACKED, SIDE, FREQUENCY, GROUPED = 0, 1, 2, 3
# What a grouped section may cost above its ideal length (bits): the coder ends on a whole
# 32-bit word and may need one more, and its probabilities are quantised (under 10^-4 bits
# a byte symbol and 10^-3 bits a count; measured: 24-30 bits over these tensors).
OVERHEAD_BITS = 48
OVERHEAD_RATE = 1e-4


def spec_crc(payload: bytes, prior, layout: Layout) -> int:
    """The spec's CRC32: over the payload, seeded with a CRC32 of the prior's float64 values
    (layout order) when a section is side, continued over the contexts as little-endian
    int32 (layout order) when a section is grouped."""
    models, offset = set(), 0
    for _ in layout.shapes:
        model, _, length = SPEC_SECTION.unpack_from(payload, offset)
        models.add(model)
        offset += SECTION + length
    seed = 0
    if SIDE in models:
        for name, _ in layout.shapes:
            seed = zlib.crc32(np.asarray(prior[name], dtype=np.float64).tobytes(), seed)
    if GROUPED in models:  # (a prior without contexts adds nothing)
        for name, _ in layout.shapes:
            if name in getattr(prior, "contexts", {}):
                seed = zlib.crc32(np.asarray(prior.contexts[name], dtype="<i4").ravel().tobytes(), seed)
    return zlib.crc32(payload, seed)


def reseal(blob: np.ndarray, payload: bytes, prior, layout: Layout) -> np.ndarray:
    """The blob's header with the CRC recomputed over ``payload``: only the section checks can catch a change."""
    fields = list(SPEC_HEADER.unpack(blob[:HEADER].tobytes()))
    fields[-1] = spec_crc(payload, prior, layout)
    return np.frombuffer(SPEC_HEADER.pack(*fields) + payload, dtype=np.uint8).copy()


def rejected(blob, layout, prior, formats=(4,)) -> WireError:
    with pytest.raises(WireError) as info:
        decode_masks(blob, layout, FP, prior, formats=formats)
    assert info.value.field in str(info.value) and "expected" in str(info.value)
    return info.value


def ideal_bits(mask: np.ndarray, contexts: np.ndarray) -> float:
    """sum over the distinct contexts of n H(k/n) + log2(n + 1), computed independently."""
    total = 0.0
    for value in np.unique(contexts):
        group = mask.ravel()[contexts.ravel() == value]
        n, k = group.size, int(group.sum())
        for count in (k, n - k):
            if count:
                total -= count * math.log2(count / n)
        total += math.log2(n + 1)
    return total


def levels_case(rng: np.random.Generator, shape: tuple[int, ...], levels: int, density: float = 0.5,
                flip_scale: float = 4.0):
    """A vote-levels broadcast (integer levels) and a client mask that flips the global
    top-k more often near its boundary level, as a client's does; its prior from TopK."""
    state = rng.integers(0, levels, shape).astype(np.float32)
    prior = TopK(density, True).prior({"w": state})
    top = prior["w"].astype(bool)
    boundary = np.abs(state[top]).min() if top.any() else 0
    flips = rng.random(shape) < 0.5 * np.exp(-np.abs(state - boundary) / flip_scale)
    return state, prior, top ^ flips


# ---------------------------------------------------------------- the mode's side information


def test_vote_levels_prior_carries_level_and_top_k_contexts():
    """TopK under vote-levels (and Biprop, its subclass): the 0/1 top-k as before, plus per
    weight 2 * (rank of its level among the tensor's levels) + (1 if in the top-k); other
    rules a plain prior, which offers no grouped model."""
    rng = np.random.default_rng(0)
    state = {"a": rng.choice([0.0, 3.0, 7.0, 63.0], (40, 30)).astype(np.float32),
             "b": rng.integers(0, 64, 500).astype(np.float32)}
    for mode in (TopK(0.5, True), Biprop(0.5, True)):
        prior = mode.prior(state)
        assert isinstance(prior, ContextPrior)
        for name, value in state.items():
            top = prior[name].astype(bool)
            assert np.array_equal(prior[name], TopK(0.5).prior(state)[name])
            rank = np.searchsorted(np.unique(value), value).ravel()
            assert np.array_equal(prior.contexts[name], 2 * rank + top.ravel())
        # the level decides the top-k everywhere but at the boundary level: one context more than levels
        assert np.unique(prior.contexts["a"]).size == 4 + 1
    assert not isinstance(TopK(0.5).prior(state), ContextPrior)


# ---------------------------------------------------------------- round trips

CONTEXT_KINDS = ("levels", "sparse-values", "single", "constant-groups", "too-many")


def draw_contexts(rng: np.random.Generator, size: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(contexts, mask) of one tensor."""
    if kind == "single":
        contexts = np.full(size, 7)
    elif kind == "sparse-values":  # a few far-apart values: groups of every size, some of one weight
        contexts = rng.choice([0, 5, 1000, 2**20], size, p=[0.6, 0.3, 0.09, 0.01])
    elif kind == "too-many":  # more than SIDE_GROUPS_MAX distinct: no grouped model
        contexts = np.arange(size) if size > codec.SIDE_GROUPS_MAX else rng.integers(0, 8, size)
    else:
        contexts = rng.integers(0, 128, size)
    rate = rng.choice([0.0, 0.01, 0.3, 0.5, 1.0], size=int(contexts.max()) + 1 if contexts.max() < 4096 else 1)
    share = rate[contexts] if rate.size > 1 else np.full(size, rate[0])
    if kind == "constant-groups":  # every group all ones or all zeros: nothing but counts coded
        share = (contexts % 2).astype(float)
    return contexts, rng.random(size) < share


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 6000), min_size=1, max_size=3), kind=st.sampled_from(CONTEXT_KINDS),
       seed=st.integers(0, 2**32 - 1))
def test_grouped_round_trip(sizes, kind, seed):
    """decode(encode(m)) == m for any contexts: one group, sparse values, all-ones and
    all-zeros groups, more than SIDE_GROUPS_MAX values (then never a grouped section); a
    grouped section names its number of groups; the CRC is the spec's."""
    rng = np.random.default_rng(seed)
    layout = Layout(tuple((f"t{i}", (n,)) for i, n in enumerate(sizes)))
    probs, contexts, masks = {}, {}, {}
    for name, (n,) in layout.shapes:
        contexts[name], masks[name] = draw_contexts(rng, n, kind)
        probs[name] = (rng.random(n) < 0.5).astype(np.float64)
    prior = ContextPrior(probs, contexts)
    blob = encode_masks(masks, layout, FP, "entropy", prior)
    assert SPEC_HEADER.unpack(blob[:HEADER].tobytes())[1] == 4
    assert SPEC_HEADER.unpack(blob[:HEADER].tobytes())[-1] == spec_crc(blob[HEADER:].tobytes(), prior, layout)
    for (model, param, _, _), (name, _) in zip(parse_sections(blob), layout.shapes):
        if model == GROUPED:  # never for more than SIDE_GROUPS_MAX contexts
            assert param == np.unique(contexts[name]).size <= codec.SIDE_GROUPS_MAX
    decoded = decode_masks(blob, layout, FP, prior)
    for name, _ in layout.shapes:
        assert decoded[name].dtype == bool and np.array_equal(decoded[name], masks[name])


@pytest.mark.parametrize("size, ones", [(70_000, 0), (70_000, 70_000), (70_000, 65_537), (70_000, 3),
                                        (65_541, 65_535), (65_540, 65_535), (200_000, 131_071)])
def test_a_group_of_at_least_2_16_weights_codes_its_count_in_two_symbols(size, ones):
    """One context over n >= 2**16 weights: the count is k >> 16, then k & 0xFFFF; every
    count from 0 to n round trips, all-zero and all-one groups included."""
    rng = np.random.default_rng(size + ones)
    mask = np.zeros(size, dtype=bool)
    mask[rng.choice(size, ones, replace=False)] = True
    contexts = np.zeros(size, dtype=np.int64)
    contexts[:5] = 1  # and a small group next to it
    prior = ContextPrior({"w": np.full(size, 0.5)}, {"w": contexts})
    layout = Layout((("w", (size,)),))
    bits = {m: b for m, _, b in codec.section_candidates(mask, prior["w"], contexts=contexts)}
    big = size - 5
    split_cost = math.log2((big >> 16) + 1) + 16 if big >= 1 << 16 else math.log2(big + 1)
    assert bits[GROUPED] == pytest.approx(ideal_bits(mask, contexts) - math.log2(big + 1) + split_cost)
    blob = encode_masks({"w": mask}, layout, FP, "entropy", prior)
    if parse_sections(blob)[0][0] == GROUPED:
        assert np.array_equal(decode_masks(blob, layout, FP, prior)["w"], mask)
    single = ContextPrior({"w": np.full(size, 0.5)}, {"w": np.zeros(size, np.int64)})
    payload = grouped_reference(mask, np.zeros(size, np.int64))
    blob = reseal(encode_masks({"w": mask}, layout, FP, "entropy", single),
                  SPEC_SECTION.pack(GROUPED, 1, len(payload)) + payload, single, layout)
    assert np.array_equal(decode_masks(blob, layout, FP, single)["w"], mask)


# ---------------------------------------------------------------- the bytes, from the spec

RUN_BYTES_MIN = 32


def grouped_reference(mask: np.ndarray, contexts: np.ndarray) -> bytes:
    """A grouped section's coded bytes, from the module docstring with constriction: the
    counts (uniform over 0..n; for n >= 2**16 k >> 16 then k & 0xFFFF), then for every
    group with 0 < k < n, groups by increasing context and weight order within, whole bytes
    of the groups of at least 32 bytes group by group with probability k / n, then every
    other bit one by one."""
    model = constriction.stream.model
    encoder = constriction.stream.queue.RangeEncoder()
    values = np.unique(contexts)
    groups = [mask[contexts == value] for value in values]
    for group in groups:
        n, k = group.size, int(group.sum())
        if n >= 1 << 16:
            encoder.encode(np.array([k >> 16, k & 0xFFFF], np.int32), model.Uniform(),
                           np.array([(n >> 16) + 1, 1 << 16], np.int32))
        else:
            encoder.encode(np.array([k], np.int32), model.Uniform(), np.array([n + 1], np.int32))
    tail_bits, tail_probs = [], []
    for group in groups:
        n, k = group.size, int(group.sum())
        whole = n - n % 8 if n >= 8 * RUN_BYTES_MIN else 0
        if 0 < k < n:
            if whole:
                encoder.encode(np.packbits(group[:whole]).astype(np.int32),
                               model.Categorical(byte_table(k / n), perfect=False))
            tail_bits.append(group[whole:])
            tail_probs.append(np.full(n - whole, k / n))
    if tail_bits and sum(t.size for t in tail_bits):
        encoder.encode(np.concatenate(tail_bits).astype(np.int32), model.Bernoulli(perfect=False),
                       np.concatenate(tail_probs))
    return encoder.get_compressed().astype("<u4").tobytes()


def test_grouped_section_bytes_are_the_specs():
    """The encoder's grouped section equals the docstring's coding rebuilt here, and decodes."""
    rng = np.random.default_rng(1)
    state, prior, mask = levels_case(rng, (300, 100), 64)
    mask[state == 0] = False  # an all-zeros group
    mask[state == 63] = True  # an all-ones group
    layout = Layout((("w", (300, 100)),))
    blob = encode_masks({"w": mask}, layout, FP, "entropy", prior)
    [(model, param, length, data)] = parse_sections(blob)
    contexts = prior.contexts["w"]
    assert (model, param) == (GROUPED, np.unique(contexts).size)
    assert data == grouped_reference(mask.ravel(), contexts) and length == len(data)
    assert np.array_equal(decode_masks(blob, layout, FP, prior)["w"], mask)


# ---------------------------------------------------------------- lengths and choice


@pytest.mark.parametrize("shape, levels, flip_scale", [((300, 784), 64, 4.0), ((100, 300), 64, 8.0),
                                                       ((2000,), 16, 2.0), ((50_000,), 3, 1.0)])
def test_encoder_picks_grouped_when_shorter_within_stated_overhead_of_ideal(shape, levels, flip_scale):
    """A vote-levels mask whose flips depend on the level: the grouped model is chosen,
    shorter than the side model's one flip rate, and its section is within OVERHEAD_BITS
    (+ 0.1%) of sum n H(k/n) + log2(n + 1) over the contexts, computed independently."""
    rng = np.random.default_rng(math.prod(shape))
    _, prior, mask = levels_case(rng, shape, levels, flip_scale=flip_scale)
    layout = Layout((("w", shape),))
    blob = encode_masks({"w": mask}, layout, FP, "entropy", prior)
    [(model, _, length, _)] = parse_sections(blob)
    assert model == GROUPED
    ideal = ideal_bits(mask, prior.contexts["w"])
    assert code_lengths({"w": mask}, layout, "entropy", prior)["ideal_bits"] == pytest.approx(ideal, rel=1e-9)
    measured: dict[str, float] = {}  # what the server measures while decoding
    decode_masks(blob, layout, FP, prior, measured)
    assert measured["ideal_bits"] == pytest.approx(ideal, rel=1e-9)
    assert ideal <= 8 * length <= ideal * (1 + OVERHEAD_RATE) + OVERHEAD_BITS
    side_only = encode_masks({"w": mask}, layout, FP, "entropy", dict(prior))  # the same prior, no contexts
    assert [s[0] for s in parse_sections(side_only)] == [SIDE]
    assert blob.size < side_only.size


def test_side_model_kept_when_contexts_say_nothing_more():
    """Flips independent of the level: the counts cost more than they save, the side
    model (one flip rate) is kept, and the upload is what a plain prior gives."""
    rng = np.random.default_rng(3)
    state = rng.integers(0, 64, 20_000).astype(np.float32)
    prior = TopK(0.5, True).prior({"w": state})
    mask = prior["w"].astype(bool) ^ (rng.random(20_000) < 0.02)
    layout = Layout((("w", (20_000,)),))
    blob = encode_masks({"w": mask}, layout, FP, "entropy", prior)
    assert [s[0] for s in parse_sections(blob)] == [SIDE]
    assert np.array_equal(blob, encode_masks({"w": mask}, layout, FP, "entropy", dict(prior)))


# ---------------------------------------------------------------- refusals


def grouped_blob(seed: int = 4):
    rng = np.random.default_rng(seed)
    layout = Layout((("a", (200, 100)), ("b", (3000,))))
    state_a, prior_a, mask_a = levels_case(rng, (200, 100), 64)
    state_b, prior_b, mask_b = levels_case(rng, (3000,), 64)
    prior = ContextPrior({"a": prior_a["w"], "b": prior_b["w"]},
                         {"a": prior_a.contexts["w"], "b": prior_b.contexts["w"]})
    masks = {"a": mask_a, "b": mask_b}
    blob = encode_masks(masks, layout, FP, "entropy", prior)
    assert [s[0] for s in parse_sections(blob)] == [GROUPED, GROUPED]
    return blob, layout, masks, prior, {"a": state_a, "b": state_b}


@settings(max_examples=60, deadline=None)
@given(byte=st.integers(0, 2**16), bit=st.integers(0, 7))
def test_a_flipped_bit_in_a_count_or_stream_is_refused(byte, bit):
    """Any bit flipped in a grouped section (its header, its counts, its coded bits) is
    refused by the CRC."""
    blob, layout, _, prior, _ = grouped_blob()
    position = HEADER + byte % (blob.size - HEADER)
    blob[position] ^= np.uint8(1 << bit)
    assert rejected(blob, layout, prior).field == "crc32"


def test_decoding_against_other_levels_is_refused():
    """The same top-k but other levels (so other contexts): refused by the CRC, which
    covers the contexts; so is a prior without contexts (or, under a CRC computed without
    them, refused naming them); contexts of another size are refused naming them."""
    blob, layout, masks, prior, _ = grouped_blob()
    assert all(np.array_equal(decode_masks(blob, layout, FP, prior)[n], masks[n]) for n in masks)
    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        other = ContextPrior(dict(prior), {**prior.contexts, name: rng.permutation(prior.contexts[name])})
        assert rejected(blob, layout, other).field == "crc32"
    plain = dict(prior)
    assert rejected(blob, layout, plain).field == "crc32"
    err = rejected(reseal(blob, blob[HEADER:].tobytes(), plain, layout), layout, plain)  # a CRC without contexts
    assert err.field == "section 'a' side information" and "contexts" in str(err)
    short = ContextPrior(dict(prior), {**prior.contexts, "b": prior.contexts["b"][:-1]})
    assert rejected(blob, layout, short).field == "side information 'b'"


def tampered(blob: np.ndarray, prior, layout: Layout, index: int, **fields) -> np.ndarray:
    sections = [list(s) for s in parse_sections(blob)]
    for key, value in fields.items():
        sections[index][("model", "param", "length", "data").index(key)] = value
    payload = b"".join(SPEC_SECTION.pack(m, p, n) + d for m, p, n, d in sections)
    return reseal(blob, payload, prior, layout)


def test_a_count_beyond_its_group_is_refused_even_with_a_valid_crc():
    """A count coded above its group's size (possible in two symbols: k >> 16 at its
    largest, then 0xFFFF) is refused naming the group, not decoded."""
    size = 70_000
    layout = Layout((("w", (size,)),))
    prior = ContextPrior({"w": np.full(size, 0.5)}, {"w": np.zeros(size, np.int64)})
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(np.array([size >> 16, 0xFFFF], np.int32), constriction.stream.model.Uniform(),
                   np.array([(size >> 16) + 1, 1 << 16], np.int32))
    data = encoder.get_compressed().astype("<u4").tobytes()
    blob = encode_masks({"w": np.zeros(size, bool)}, layout, FP, "entropy", prior)
    err = rejected(reseal(blob, SPEC_SECTION.pack(GROUPED, 1, len(data)) + data, prior, layout), layout, prior)
    assert err.field == "section 'w' ones of group 0" and "70000" in str(err)


def test_a_group_count_that_is_not_the_contexts_is_refused():
    blob, layout, _, prior, _ = grouped_blob()
    groups = parse_sections(blob)[1][1]
    for param in (groups - 1, groups + 1, 0, 2**32 - 1):
        err = rejected(tampered(blob, prior, layout, 1, param=param), layout, prior)
        assert err.field == "section 'b' groups"


def test_more_contexts_than_side_groups_max_cannot_decode_a_grouped_section():
    """A grouped section against contexts of more than SIDE_GROUPS_MAX values (which the
    encoder never codes against) is refused, not decoded."""
    blob, layout, _, prior, _ = grouped_blob()
    many = ContextPrior(dict(prior), {**prior.contexts, "a": np.arange(20_000)})
    err = rejected(reseal(blob, blob[HEADER:].tobytes(), many, layout), layout, many)
    assert err.field == "section 'a' side information" and "at most 4096 distinct contexts" in str(err)


def test_format_3_uploads_decode_and_know_no_grouped_model():
    """An upload without grouped sections is format 3's bytes under another version byte:
    read as format 3 (an earlier checkpoint's recycling log) it decodes; a grouped section
    in a format-3 upload is an unknown model there."""
    blob, layout, masks, prior, state = grouped_blob()
    plain = encode_masks(masks, layout, FP, "entropy", dict(prior))
    assert {s[0] for s in parse_sections(plain)} == {SIDE}
    old = plain.copy()
    old[4] = 3
    assert 3 in READABLE_FORMATS
    decoded = decode_masks(old, layout, FP, prior, formats=READABLE_FORMATS)
    assert all(np.array_equal(decoded[n], masks[n]) for n in masks)
    assert rejected(old, layout, prior).field == "format version"
    grouped = blob.copy()
    grouped[4] = 3
    fields = list(SPEC_HEADER.unpack(grouped[:HEADER].tobytes()))
    fields[-1] = zlib.crc32(grouped[HEADER:].tobytes())  # format 3's CRC: model 3 is not coded against the broadcast
    grouped = np.frombuffer(SPEC_HEADER.pack(*fields) + grouped[HEADER:].tobytes(), dtype=np.uint8).copy()
    assert rejected(grouped, layout, prior, READABLE_FORMATS).field == "section 'a' model"


# ---------------------------------------------------------------- a run


def _run(tmp_path, name: str, monkeypatch, plain_prior: bool) -> list[dict]:
    monkeypatch.setattr(received_module, "_BROADCASTS", {})  # each run derives its own priors
    monkeypatch.setattr(received_module, "_RECEIVED", {})
    if plain_prior:  # the previous model: the same 0/1 top-k, no contexts
        original = TopK.prior
        monkeypatch.setattr(TopK, "prior", lambda self, state: dict(original(self, state)))
    config = resolve({"method": "edge-popup", "dataset": "digits", "model": "mlp", "density": 0.5,
                      "num-clients": 4, "clients-per-round": 4, "num-rounds": 3,
                      "edge-popup-server-rule": "vote-levels", "uplink-codec": "entropy"})
    run_server(InProcessGrid(client_app, config.num_clients), config, tmp_path / name)
    monkeypatch.undo()
    return [json.loads(line) for line in (tmp_path / name / "rounds.jsonl").read_text().splitlines()]


def test_vote_levels_run_uploads_fewer_bytes_with_the_grouped_model(tmp_path, monkeypatch):
    """Edge-popup vote-levels on digits, 3 rounds, in process: the same accuracy every
    round (the code is lossless; training is unchanged), and fewer uplink bytes every round
    than coding against the top-k with one flip rate per tensor."""
    before = _run(tmp_path, "side", monkeypatch, plain_prior=True)
    after = _run(tmp_path, "grouped", monkeypatch, plain_prior=False)
    assert [r["accuracy"] for r in after] == [r["accuracy"] for r in before]
    for old, new in zip(before, after):
        assert new["uplink_payload_bytes"] < old["uplink_payload_bytes"]
        assert new["uplink_ideal_bpp"] <= new["uplink_bpp"] <= new["uplink_ideal_bpp"] * 1.02 + 0.01
