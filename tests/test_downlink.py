"""Tests for fedmask.wire.state: the broadcast state codecs (float32, float16, quantized).

Accuracy per codec, the sizes the quantized codec reaches, determinism, and how a damaged
or foreign broadcast is refused.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmask.wire.frame import Layout, WireError
from fedmask.wire.state import decode_state, encode_state

# From the format spec (module docstring of fedmask.wire.state), little-endian.
# magic "FMSQ" | format u8 | bits u8 | reserved u16 | layout fingerprint 8s | crc32 u32
SPEC_HEADER = struct.Struct("<4sBBH8sI")
HEADER = SPEC_HEADER.size  # 20
SPEC_SECTION = struct.Struct("<ffBII")  # lo f32 | hi f32 | model u8 | values u32 | coded bytes u32
SECTION = SPEC_SECTION.size  # 17
BITS = (2, 4, 8, 12, 16)
F32_EPS = float(np.finfo(np.float32).eps)


def layout_of(*shapes: tuple[int, ...]) -> Layout:
    return Layout(tuple((f"layer{i}.weight", tuple(s)) for i, s in enumerate(shapes)))


def random_state(layout: Layout, seed: int = 0, scale: float = 1.0, offset: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (offset + scale * rng.normal(size=shape)).astype(np.float32) for name, shape in layout.shapes}


def theta_state(n: int, seed: int = 0) -> tuple[Layout, dict[str, np.ndarray]]:
    """FedPM's broadcast: theta = sigmoid(scores), scores ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    layout = layout_of((n,))
    return layout, {"layer0.weight": (1 / (1 + np.exp(-rng.normal(size=n)))).astype(np.float32)}


def quantized(state, layout, bits=8) -> np.ndarray:
    encoded = encode_state(state, layout, "quantized", bits)
    assert list(encoded) == ["state"] and encoded["state"].dtype == np.uint8 and encoded["state"].ndim == 1
    return encoded["state"]


def parse(blob: np.ndarray) -> tuple[tuple, list[tuple[float, float, int, int, bytes]]]:
    raw = blob.tobytes()
    header = SPEC_HEADER.unpack_from(raw, 0)
    sections, offset = [], HEADER
    while offset < len(raw):
        lo, hi, model, _, length = SPEC_SECTION.unpack_from(raw, offset)
        offset += SECTION
        sections.append((lo, hi, model, length, raw[offset : offset + length]))
        offset += length
    assert offset == len(raw)
    return header, sections


def reseal(raw: bytes) -> np.ndarray:
    """``raw`` with the CRC recomputed over the header before it and whatever payload follows."""
    crc = zlib.crc32(raw[HEADER:], zlib.crc32(raw[: HEADER - 4]))
    return np.frombuffer(raw[: HEADER - 4] + struct.pack("<I", crc) + raw[HEADER:], np.uint8).copy()


def refused(arrays, layout) -> WireError:
    with pytest.raises(WireError) as info:
        decode_state(arrays, layout)
    assert "broadcast rejected" in str(info.value)
    return info.value


shapes = st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=2).map(tuple), min_size=1, max_size=3)


# ---------------------------------------------------------------- 5. accuracy


@settings(max_examples=40, deadline=None)
@given(shapes=shapes, seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1e-6, 1.0, 1e4]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_float32_is_exact(shapes, seed, scale, dtype):
    layout = layout_of(*shapes)
    state = {k: v.astype(dtype) for k, v in random_state(layout, seed, scale).items()}
    encoded = encode_state(state, layout, "float32")
    assert sorted(encoded) == sorted(state) and all(a.dtype == np.float32 for a in encoded.values())
    decoded = decode_state(encoded, layout)
    for name, shape in layout.shapes:
        assert decoded[name].dtype == np.float32 and decoded[name].shape == shape
        assert np.array_equal(decoded[name], state[name].astype(np.float32))


@settings(max_examples=40, deadline=None)
@given(shapes=shapes, seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 8e3]))
def test_float16_error_within_half_precision(shapes, seed, scale):
    """float16: the value rounded to half precision: |err| <= |x| 2**-11 (normal) or 2**-25
    (subnormal). Values stay below float16's max (65504); see the overflow test below."""
    layout = layout_of(*shapes)
    state = random_state(layout, seed, scale)
    encoded = encode_state(state, layout, "float16")
    assert all(a.dtype == np.float16 for a in encoded.values())
    decoded = decode_state(encoded, layout)
    for name, shape in layout.shapes:
        x, y = state[name].astype(np.float64), decoded[name].astype(np.float64)
        assert decoded[name].dtype == np.float32 and decoded[name].shape == shape
        assert np.array_equal(decoded[name], state[name].astype(np.float16).astype(np.float32))
        assert np.all(np.abs(y - x) <= np.maximum(np.abs(x) * 2.0**-11, 2.0**-25))


@settings(max_examples=60, deadline=None)
@given(shapes=shapes, seed=st.integers(0, 2**32 - 1), bits=st.sampled_from(BITS),
       scale=st.sampled_from([1e-4, 1.0, 1e3]), offset=st.sampled_from([0.0, 5.0, -1e3]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_quantized_error_within_half_a_level(shapes, seed, bits, scale, offset, dtype):
    """|err| <= (max - min) / (2**bits - 1) / 2 (+ float32 rounding); values stay in [min, max];
    at most 2**bits distinct values per tensor."""
    layout = layout_of(*shapes)
    state = {k: v.astype(dtype) for k, v in random_state(layout, seed, scale, offset).items()}
    blob = quantized(state, layout, bits)
    decoded = decode_state({"state": blob}, layout)
    assert list(decoded) == [name for name, _ in layout.shapes]
    for name, shape in layout.shapes:
        x, y = state[name].astype(np.float64), decoded[name].astype(np.float64)
        assert decoded[name].dtype == np.float32 and decoded[name].shape == shape
        lo, hi = x.min(), x.max()
        tiny = 4 * F32_EPS * max(abs(lo), abs(hi)) + 1e-30
        assert np.abs(y - x).max() <= (hi - lo) / (2**bits - 1) / 2 + tiny
        assert y.min() >= lo - tiny and y.max() <= hi + tiny
        assert np.unique(y).size <= min(2**bits, y.size)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("value", [0.0, -3.25, 0.1, 1e30])
def test_constant_tensors_decode_exactly(bits, value):
    layout = layout_of((50,), (3, 4), (1,))
    state = {name: np.full(shape, value, dtype=np.float32) for name, shape in layout.shapes}
    decoded = decode_state({"state": quantized(state, layout, bits)}, layout)
    for name, _ in layout.shapes:
        assert np.array_equal(decoded[name], state[name])


@pytest.mark.parametrize("bits", BITS)
def test_extremes_are_exact(bits):
    """min and max are levels 0 and 2**bits - 1: they come back exactly."""
    layout = layout_of((500,))
    state = random_state(layout, 1, 2.0, 1.0)
    x = state["layer0.weight"]
    y = decode_state({"state": quantized(state, layout, bits)}, layout)["layer0.weight"]
    assert y[x.argmin()] == x.min() and y[x.argmax()] == x.max()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_float16_out_of_range_is_not_broadcast_as_inf():
    """Values past float16's range saturate at +-65504 instead of arriving as inf."""
    layout = layout_of((4,))
    state = {"layer0.weight": np.array([1.0, -70000.0, 70000.0, 65504.0], dtype=np.float32)}
    try:
        decoded = decode_state(encode_state(state, layout, "float16"), layout)
    except ValueError:
        return
    assert np.all(np.isfinite(decoded["layer0.weight"]))


# ---------------------------------------------------------------- 5. sizes and wire format


def test_quantized_8_bit_theta_under_8_bpp():
    """100k theta values at 8 bits: under 8 bits per parameter, headers included."""
    layout, state = theta_state(100_000)
    blob = quantized(state, layout, 8)
    assert 8 * blob.size / 100_000 < 8.0
    assert parse(blob)[1][0][2] == 1  # the range-coded model beat the raw bytes


def test_quantized_4_bit_theta_under_4_5_bpp():
    layout, state = theta_state(100_000)
    blob = quantized(state, layout, 4)
    assert 8 * blob.size / 100_000 < 4.5


@settings(max_examples=40, deadline=None)
@given(shapes=shapes, seed=st.integers(0, 2**32 - 1), bits=st.sampled_from(BITS),
       spread=st.sampled_from(["normal", "uniform", "sparse"]))
def test_quantized_wire_format_and_raw_fallback_bound(shapes, seed, bits, spread):
    """Spec header and sections; each section is never bigger than the raw level indices."""
    layout = layout_of(*shapes)
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in layout.shapes:
        if spread == "normal":
            state[name] = rng.normal(size=shape).astype(np.float32)
        elif spread == "uniform":
            state[name] = rng.random(shape).astype(np.float32)
        else:
            state[name] = (rng.random(shape) < 0.05).astype(np.float32) * rng.normal(size=shape).astype(np.float32)
    blob = quantized(state, layout, bits)
    (magic, version, got_bits, reserved, _fingerprint, crc), sections = parse(blob)
    assert (magic, version, got_bits, reserved) == (b"FMSQ", 1, bits, 0)
    assert crc == zlib.crc32(blob[HEADER:].tobytes(), zlib.crc32(blob[: HEADER - 4].tobytes()))
    assert len(sections) == len(layout.shapes)
    per_level = 1 if bits <= 8 else 2
    for (lo, hi, model, length, data), (name, shape) in zip(sections, layout.shapes):
        size = math.prod(shape)
        assert lo == np.float32(state[name].min()) and hi == np.float32(state[name].max())
        assert model in (0, 1) and length == len(data)
        assert length <= size * per_level
        if model == 0:
            assert length == size * per_level
            levels = np.frombuffer(data, dtype=np.uint8 if bits <= 8 else "<u2")
            assert levels.max() <= 2**bits - 1
        else:
            counts = np.frombuffer(data[: 4 * 2**bits], dtype="<u4")
            assert counts.sum() == size and (len(data) - 4 * 2**bits) % 4 == 0
    assert blob.size <= HEADER + sum(SECTION + math.prod(s) * per_level for _, s in layout.shapes)


@pytest.mark.parametrize("bits", BITS)
def test_encoding_is_deterministic(bits):
    """The same state gives the same bytes, whatever was encoded in between (every codec)."""
    layout = layout_of((300,), (20, 20))
    state, other = random_state(layout, 3), random_state(layout, 4)
    for codec in ("float32", "float16", "quantized"):
        first = encode_state(state, layout, codec, bits)
        encode_state(other, layout, codec, bits)
        second = encode_state(state, layout, codec, bits)
        assert first.keys() == second.keys()
        assert all(first[k].dtype == second[k].dtype and np.array_equal(first[k], second[k]) for k in first)


def test_unknown_codec_refused_by_encoder():
    layout = layout_of((3,))
    with pytest.raises(ValueError, match="downlink-codec"):
        encode_state(random_state(layout), layout, "bfloat16")


# ---------------------------------------------------------------- 6. safety


def small_blob(bits: int = 4, seed: int = 0) -> tuple[np.ndarray, Layout, dict]:
    """A raw section and a range-coded one."""
    layout = layout_of((10,), (2000,))
    state = random_state(layout, seed)
    blob = quantized(state, layout, bits)
    return blob, layout, state


def test_small_blob_has_raw_and_coded_sections():
    assert [s[2] for s in parse(small_blob()[0])[1]] == [0, 1]


@pytest.mark.parametrize("bits", [4, 12])
def test_every_truncation_refused(bits):
    blob, layout, _ = small_blob(bits)
    for cut in range(blob.size):
        refused({"state": blob[:cut].copy()}, layout)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), bits=st.sampled_from([4, 8, 12]))
def test_bit_flip_in_payload_crc_magic_or_version_refused(data, bits):
    """Bytes 0-4 (magic, version), 8-11 (crc) and the whole payload are covered."""
    blob, layout, _ = small_blob(bits)
    index = data.draw(st.sampled_from([0, 1, 2, 3, 4, 8, 9, 10, 11]) | st.integers(HEADER, blob.size - 1))
    blob[index] ^= np.uint8(1 << data.draw(st.integers(0, 7)))
    refused({"state": blob}, layout)


@pytest.mark.parametrize("bit", range(16))
def test_nonzero_reserved_field_is_refused_even_with_a_valid_crc(bit):
    """A broadcast whose reserved u16 is not 0 is refused by the reserved-field check.

    The CRC is recomputed after the flip (``reseal``), so the CRC check passes and the
    refusal can only come from the header check on ``reserved``.
    """
    blob, layout, _ = small_blob()
    decode_state({"state": blob}, layout)  # the untouched blob decodes
    blob[6 + bit // 8] ^= np.uint8(1 << (bit % 8))
    resealed = reseal(blob.tobytes())
    assert SPEC_HEADER.unpack_from(resealed.tobytes())[3] == 1 << bit
    err = refused({"state": resealed}, layout)
    assert "header" in str(err) and "reserved 0" in str(err) and "crc32" not in str(err)


@pytest.mark.parametrize("bits, flip", [(4, 0), (12, 0), (2, 0)])
def test_bit_flip_in_bits_field_refused(bits, flip):
    blob, layout, state = small_blob(bits)
    blob[5] ^= np.uint8(1 << flip)
    try:
        decoded = decode_state({"state": blob}, layout)
    except WireError:
        return
    error = max(float(np.abs(decoded[k] - state[k]).max()) for k in state)
    pytest.fail(f"flipped bits field decoded silently, max error {error:.3g}")


@pytest.mark.parametrize("change", ["missing", "extra", "renamed", "transposed", "flattened"])
@pytest.mark.parametrize("codec", ["float32", "float16"])
def test_float_arrays_of_other_tensors_or_shapes_refused(change, codec):
    layout = layout_of((3, 4), (5,))
    arrays = encode_state(random_state(layout), layout, codec)
    if change == "missing":
        del arrays["layer1.weight"]
    elif change == "extra":
        arrays["layer2.weight"] = np.zeros(2, dtype=np.float32)
    elif change == "renamed":
        arrays["layer9.weight"] = arrays.pop("layer1.weight")
    elif change == "transposed":
        arrays["layer0.weight"] = arrays["layer0.weight"].T.copy()
    else:
        arrays["layer0.weight"] = arrays["layer0.weight"].ravel()
    err = refused(arrays, layout)
    assert "tensors" in str(err)


def test_state_array_of_another_dtype_is_not_taken_for_quantized():
    """A lone 'state' array that is not uint8 is a float tensor list, refused by name."""
    layout = layout_of((4,))
    err = refused({"state": quantized(random_state(layout), layout).astype(np.float32)}, layout)
    assert "tensors" in str(err)


def test_quantized_blob_for_more_tensors_refused():
    """A blob with a section more than the layout has is refused as 'length'."""
    blob, layout, _ = small_blob()
    message = str(refused({"state": blob}, layout_of((10,))))
    assert "length" in message or "layout fingerprint" in message


@pytest.mark.parametrize("size", [9, 11])
def test_raw_tensor_of_another_size_refused(size):
    """A raw-coded tensor carries one index per value: another layout size is refused."""
    blob, _, _ = small_blob(4)
    err = refused({"state": blob}, layout_of((size,), (2000,)))
    assert "layer0.weight" in str(err) or "layout fingerprint" in str(err)


SEALED_DAMAGE = ["truncated section header", "second section missing", "truncated coded data",
                 "zero histogram", "model 7", "raw level above top", "lo above hi", "nan lo"]


def damaged(kind: str) -> tuple[np.ndarray, Layout]:
    """A broadcast whose payload is wrong but whose CRC was recomputed over it (a faulty or
    hostile sender): only the section checks can catch it."""
    blob, layout, _ = small_blob(4)
    raw = bytearray(blob.tobytes())
    (_, _, _, raw_len, _), (_, _, _, coded_len, _) = parse(blob)[1]
    first, second = HEADER, HEADER + SECTION + raw_len  # offsets of the two section headers
    if kind == "truncated section header":
        raw = raw[: second + 5]
    elif kind == "second section missing":
        raw = raw[:second]
    elif kind == "truncated coded data":
        raw = raw[:-3]
    elif kind == "zero histogram":
        raw[second + SECTION : second + SECTION + 64] = bytes(64)
    elif kind == "model 7":
        raw[second + 8] = 7
    elif kind == "raw level above top":
        raw[first + SECTION] = 255
    elif kind == "lo above hi":
        struct.pack_into("<ff", raw, first, 5.0, -5.0)
    else:
        struct.pack_into("<f", raw, first, float("nan"))
    return reseal(bytes(raw)), layout


@pytest.mark.parametrize("kind", SEALED_DAMAGE)
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_damaged_sections_with_valid_crc_refused(kind):
    blob, layout = damaged(kind)
    refused({"state": blob}, layout)


@pytest.mark.parametrize("size", [1999, 1000])
def test_quantized_blob_for_another_layout_refused(size):
    blob, layout, _ = small_blob(4)
    other = layout_of((10,), (size,))
    refused({"state": blob}, other)
