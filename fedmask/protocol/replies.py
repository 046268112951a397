"""Arrays from clients, checked before anything trusts them.

A reply's Array is four fields a client chose: ``stype``, ``dtype``, ``shape`` and the
bytes. Flower's ``Array.numpy()`` and ``np.dtype(array.dtype)`` raise TypeError,
ValueError or EOFError on a hostile one (another stype, bytes that are no ``.npy``, an
object dtype, an unknown dtype string), and a ``.npy`` header that declares a huge shape
makes ``np.load`` allocate it. :func:`checked_numpy` reads the ``.npy`` header itself,
accepts only plain numeric or bool dtypes whose declared size is exactly the bytes that
arrived, and the declared metadata only when it agrees with the header; anything else is
:class:`BadArray`. :func:`arrived_bytes` is what the ledger counts: the data that came,
never a size computed from what a client declares.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
from flwr.app import Array

NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY
PLAIN_KINDS = "biuf"  # bool, signed and unsigned integers, floats


class BadArray(ValueError):
    """An Array that is not a plain numeric ``.npy`` whose metadata matches its bytes."""


def _npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) of a ``.npy`` blob; BadArray otherwise.

    numpy reads a header with ``ast.literal_eval`` (tens of microseconds); a run's arrays
    repeat a few headers, so a header already read is looked up by its bytes."""
    if len(data) >= 10 and data[:6] == b"\x93NUMPY" and data[6] in (1, 2, 3):
        end = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
        if end <= min(len(data), _HEADER_MOST):
            return _cached_header(bytes(data[:end]))
    return _parse_header(data)


_HEADER_MOST = 2**16  # a longer header is read, not looked up (numpy refuses those over 10,000 bytes anyway)


@functools.lru_cache(maxsize=256)
def _cached_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    return _parse_header(header)


def _parse_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise BadArray(f"unsupported .npy version {version}")
    except BadArray:
        raise
    except Exception as err:  # any parse failure is a bad array
        raise BadArray(f"not a valid .npy ({type(err).__name__}: {err})") from None
    return tuple(shape), bool(fortran), np.dtype(dtype), stream.tell()


def _plain(dtype: np.dtype) -> bool:
    return dtype.kind in PLAIN_KINDS and dtype.fields is None and dtype.subdtype is None and dtype.itemsize > 0


def checked_numpy(array: object) -> np.ndarray:
    """The array's values, or :class:`BadArray` saying what is wrong; never anything else.

    Accepted: stype numpy, a ``.npy`` header of a plain numeric or bool dtype, exactly
    ``prod(shape) * itemsize`` bytes after it, and declared ``dtype``/``shape`` fields equal
    to the header's.
    """
    if not isinstance(array, Array):
        raise BadArray(f"expected a flwr Array, got {type(array).__name__}")
    if array.stype != NUMPY_STYPE:
        raise BadArray(f"stype: expected {NUMPY_STYPE!r}, got {str(array.stype)[:40]!r}")
    data = array.data
    if not isinstance(data, bytes) or not data:
        raise BadArray("data: expected a .npy blob, got no bytes")
    shape, fortran, dtype, offset = _npy_header(data)
    if not _plain(dtype):
        raise BadArray(f"dtype: expected a plain numeric or bool dtype, got {str(dtype)[:40]!r}")
    if not all(isinstance(n, int) and n >= 0 for n in shape):
        raise BadArray(f"shape: expected non-negative sizes, got {str(shape)[:60]}")
    size = math.prod(shape)
    if size * dtype.itemsize != len(data) - offset:
        raise BadArray(f"shape {str(shape)[:60]} of {dtype} declares {size * dtype.itemsize} bytes, "
                       f"{len(data) - offset} arrived")
    if str(array.dtype) != str(dtype) or tuple(array.shape) != shape:
        raise BadArray(f"metadata dtype {str(array.dtype)[:40]!r} shape {str(tuple(array.shape))[:60]} "
                       f"disagrees with the data's {str(dtype)!r} {shape}")
    flat = np.frombuffer(data, dtype=dtype, count=size, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C").copy()


def arrived_bytes(array: object) -> int:
    """Payload bytes of an Array as they arrived: the data after a valid ``.npy`` header
    (element count x item size), else every byte of its data (0 when it has none).

    Legacy Parameters (the SecAgg+ path) carry opaque serialized tensors with no dtype:
    all their bytes count.
    """
    data = getattr(array, "data", b"")
    if not isinstance(data, bytes):
        return 0
    if getattr(array, "dtype", "") and getattr(array, "stype", None) == NUMPY_STYPE:
        try:
            _, _, _, offset = _npy_header(data)
            return len(data) - offset
        except BadArray:
            pass
    return len(data)
