"""Tests for fedmask.wire.masks: the mask wire format and every way an upload is refused."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmask.wire.frame import Layout, WireError
from fedmask.wire.masks import decode_masks, encode_masks

# From the format spec: magic 4s | format u8 | codec u8 | reserved u16 | bit count u64 |
# fingerprint 8s | crc32 u32, little-endian.
SPEC_HEADER = "<4sBBHQ8sI"
HEADER = 4 + 1 + 1 + 2 + 8 + 8 + 4  # = 28

LAYOUT = Layout.from_arrays({"a.weight": np.zeros((5, 3)), "a.bias": np.zeros(5), "b.weight": np.zeros((2, 2, 3))})
FP = LAYOUT.fingerprint(0, "mlp", "signed-kaiming-constant")
NUM_BITS = 15 + 5 + 12  # 32 bits -> 4 payload bytes


def random_masks(layout: Layout, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.random(shape) < 0.5 for name, shape in layout.shapes}


def valid_blob(seed: int = 0) -> np.ndarray:
    return encode_masks(random_masks(LAYOUT, seed), LAYOUT, FP)


def rejected(blob, layout=LAYOUT, fingerprint=FP) -> WireError:
    with pytest.raises(WireError) as info:
        decode_masks(blob, layout, fingerprint)
    err = info.value
    assert err.field in str(err) and "expected" in str(err)
    return err


# ---------------------------------------------------------------- round trip and format


layouts = st.lists(
    st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4
).map(lambda shapes: Layout(tuple((f"t{i:02d}", s) for i, s in enumerate(shapes))))


@settings(max_examples=60, deadline=None)
@given(layout=layouts, seed=st.integers(0, 2**32 - 1), p=st.sampled_from([0.0, 0.3, 0.5, 1.0]))
def test_round_trip_and_wire_format(layout, seed, p):
    """decode(encode(m)) == m; blob = 28-byte spec header + packbits of all bits in layout order."""
    rng = np.random.default_rng(seed)
    masks = {name: rng.random(shape) < p for name, shape in layout.shapes}
    fp = layout.fingerprint(seed, "mlp", "kaiming-normal")
    blob = encode_masks(masks, layout, fp)
    bits = sum(math.prod(s) for _, s in layout.shapes)
    assert blob.dtype == np.uint8 and blob.ndim == 1
    assert blob.size == HEADER + math.ceil(bits / 8)
    magic, version, codec, reserved, count, got_fp, crc = struct.unpack(SPEC_HEADER, blob[:HEADER].tobytes())
    payload = np.packbits(np.concatenate([masks[name].ravel() for name, _ in layout.shapes]))
    assert (magic, version, codec, reserved, count, got_fp) == (b"FMSK", 4, 1, 0, bits, fp)
    assert np.array_equal(blob[HEADER:], payload)
    assert crc == zlib.crc32(payload.tobytes())
    decoded = decode_masks(blob, layout, fp)
    assert list(decoded) == [name for name, _ in layout.shapes]
    for name, shape in layout.shapes:
        assert decoded[name].dtype == bool and decoded[name].shape == shape
        assert np.array_equal(decoded[name], masks[name])


def test_layout_sorts_names_and_counts_params():
    """Layout.from_arrays orders tensors by name and counts all their elements."""
    assert [n for n, _ in LAYOUT.shapes] == ["a.bias", "a.weight", "b.weight"]
    assert LAYOUT.num_params == NUM_BITS


def test_fingerprint_differs_for_seed_model_init_and_layout():
    """The fingerprint changes with seed, model, init and tensor shapes (same bit count too)."""
    base = LAYOUT.fingerprint(0, "mlp", "x")
    same_bits = Layout((("a.bias", (5,)), ("a.weight", (3, 5)), ("b.weight", (2, 2, 3))))
    others = [LAYOUT.fingerprint(1, "mlp", "x"), LAYOUT.fingerprint(0, "conv2", "x"),
              LAYOUT.fingerprint(0, "mlp", "y"), same_bits.fingerprint(0, "mlp", "x")]
    assert len(base) == 8
    assert all(o != base for o in others)
    assert LAYOUT.fingerprint(0, "mlp", "x") == base


def test_encode_refuses_masks_of_other_tensors():
    """encode_masks refuses a dict whose tensor names are not the layout's."""
    masks = random_masks(LAYOUT)
    masks["extra"] = np.zeros(2, bool)
    with pytest.raises(ValueError):
        encode_masks(masks, LAYOUT, FP)


# ---------------------------------------------------------------- rejections by field


@pytest.mark.parametrize("blob", [[0] * 32, bytes(32)])
def test_non_array_rejected_as_type(blob):
    """A list or bytes is refused with field 'type'."""
    assert rejected(blob).field == "type"


@pytest.mark.parametrize("dtype", [np.float32, np.int8, np.uint16, bool])
def test_wrong_dtype_rejected(dtype):
    """A non-uint8 array (even with the same values) is refused with field 'dtype'."""
    assert rejected(valid_blob().astype(dtype)).field == "dtype"


def test_two_dimensional_rejected_as_shape():
    """A 2-D uint8 array is refused with field 'shape'."""
    assert rejected(valid_blob().reshape(1, -1)).field == "shape"


@pytest.mark.parametrize("size", [0, 1, HEADER - 1])
def test_shorter_than_header_rejected_as_length(size):
    """Fewer bytes than a header is refused with field 'length'."""
    assert rejected(valid_blob()[:size]).field == "length"


@pytest.mark.parametrize("offset, value, field", [(0, ord("X"), "magic"), (3, 0, "magic"),
                                                  (4, 1, "format version"), (4, 0, "format version"),
                                                  (5, 9, "codec"), (5, 0, "codec")])
def test_bad_header_fields_rejected(offset, value, field):
    """Bad magic, format version or codec id is refused with that field."""
    blob = valid_blob()
    blob[offset] = value
    assert rejected(blob).field == field


def test_mask_of_another_layout_rejected_as_bit_count():
    """A mask encoded for a layout with another number of params is refused as 'bit count'."""
    other = Layout((("a.bias", (6,)), ("a.weight", (5, 3)), ("b.weight", (2, 2, 3))))
    blob = encode_masks(random_masks(other), other, other.fingerprint(0, "mlp", "signed-kaiming-constant"))
    err = rejected(blob)
    assert err.field == "bit count" and str(NUM_BITS) in str(err)


@pytest.mark.parametrize("source", ["seed", "layout"])
def test_mask_of_another_model_rejected_as_fingerprint(source):
    """Same bit count but another seed (or another shape layout) is refused as 'fingerprint'."""
    if source == "seed":
        blob = encode_masks(random_masks(LAYOUT), LAYOUT, LAYOUT.fingerprint(1, "mlp", "signed-kaiming-constant"))
    else:
        other = Layout((("a.bias", (5,)), ("a.weight", (3, 5)), ("b.weight", (12,))))
        blob = encode_masks(random_masks(other), other, other.fingerprint(0, "mlp", "signed-kaiming-constant"))
    assert rejected(blob).field == "fingerprint"


@pytest.mark.parametrize("change", ["truncated", "extra"])
def test_truncated_or_padded_payload_rejected_as_length(change):
    """A payload one byte short or one byte long is refused with field 'length'."""
    blob = valid_blob()
    blob = blob[:-1] if change == "truncated" else np.append(blob, np.uint8(0))
    err = rejected(blob)
    assert err.field == "length" and str(HEADER + NUM_BITS // 8) in str(err)


@settings(max_examples=100, deadline=None)
@given(bit=st.integers(0, 8 * math.ceil(NUM_BITS / 8) - 1), seed=st.integers(0, 1000))
def test_every_single_bit_flip_in_payload_rejected_as_crc(bit, seed):
    """CRC32 catches any single flipped bit of the payload (padding bits included)."""
    blob = valid_blob(seed)
    blob[HEADER + bit // 8] ^= np.uint8(1 << (bit % 8))
    assert rejected(blob).field == "crc32"


def test_every_single_bit_flip_in_crc_field_rejected_as_crc():
    """A flipped bit in the stored CRC itself is refused as 'crc32'."""
    for bit in range(32):
        blob = valid_blob()
        blob[HEADER - 4 + bit // 8] ^= np.uint8(1 << (bit % 8))
        assert rejected(blob).field == "crc32"


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_changed_byte_is_refused(data):
    """Changing any byte of a valid blob, header included, raises WireError."""
    blob = valid_blob(data.draw(st.integers(0, 50)))
    index = data.draw(st.integers(0, blob.size - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != blob[index]))
    blob[index] = value
    rejected(blob)


@settings(max_examples=200, deadline=None)
@given(raw=st.one_of(
    st.binary(max_size=80),
    st.binary(max_size=60).map(lambda b: b"FMSK" + b),  # get past the magic check
    st.binary(max_size=60).map(lambda b: b"FMSK\x01\x01" + b),  # and version/codec
    st.binary(min_size=4, max_size=12).map(lambda b: b"FMSK\x01\x01\x00\x00"
                                            + NUM_BITS.to_bytes(8, "little") + FP + b),
))
def test_random_bytes_never_decode(raw):
    """Random byte strings (even behind a plausible header) raise WireError, nothing else."""
    try:
        decode_masks(np.frombuffer(raw, dtype=np.uint8).copy(), LAYOUT, FP)
    except WireError:
        return
    pytest.fail("random bytes decoded as a mask")


@settings(max_examples=100, deadline=None)
@given(tail=st.binary(min_size=4, max_size=4))
def test_valid_header_with_random_payload_refused(tail):
    """A correct header on a payload that is not the one it was made for is refused."""
    blob = valid_blob()
    payload = np.frombuffer(tail, dtype=np.uint8)
    if np.array_equal(payload, blob[HEADER:]):
        return
    blob[HEADER:] = payload
    assert rejected(blob).field == "crc32"


def test_non_contiguous_valid_blob_decodes():
    """A valid blob seen through a strided (non-contiguous) view still decodes."""
    blob = valid_blob()
    strided = np.repeat(blob, 2)[::2]
    assert np.array_equal(strided, blob) and not strided.flags.c_contiguous
    decoded = decode_masks(strided, LAYOUT, FP)
    assert all(np.array_equal(decoded[k], v) for k, v in random_masks(LAYOUT).items())
