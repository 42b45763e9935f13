"""The IDX array format (MNIST, Fashion-MNIST), gzip-compressed or raw.

Layout: two zero bytes, a type byte, a dimension count d, then d big-endian uint32 sizes,
then the values in row-major order, big-endian. Everything is checked against the header:
a wrong magic number, an unknown type, a file shorter or longer than the header promises
all raise ValueError naming the file.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np

from mixnn_fast.data.listfile import require_file

#: IDX type byte -> numpy dtype (big-endian, as the format stores them).
IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
#: The most dimensions NumPy arrays can have (64 in NumPy 2, 32 before); the IDX header allows 255.
_MAX_NDIM = 64 if int(np.__version__.split(".")[0]) >= 2 else 32


def _read_bytes(path: str) -> bytes:
    # Decide by content, not by the ".gz" suffix: files get renamed and decompressed in place.
    with open(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise ValueError(f"{path}: damaged gzip stream ({exc})") from exc


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in the IDX file ``path`` (gzip or raw), in native byte order.

    Returns an array of the header's shape and the stored type (uint8 for Fashion-MNIST).
    Raises FileNotFoundError when the file is missing and ValueError naming the file for a
    wrong magic number, unknown type byte, or a size that disagrees with the header.
    """
    path = require_file(path, "IDX file")
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 or zero1 or type_code not in IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000TTDD: type TT in "
            f"{{{', '.join(f'{t:02x}' for t in IDX_DTYPES)}}}, DD >= 1 dimensions)"
        )
    if ndim > _MAX_NDIM:
        raise ValueError(f"{path}: IDX header declares {ndim} dimensions, more than NumPy arrays can have ({_MAX_NDIM})")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions need {header_size})")
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    dtype = IDX_DTYPES[type_code]
    # Python integers: np.prod in int64 wraps around for headers like (65536,) * 4, and a
    # wrapped size of 0 would match an empty body.
    expected = math.prod(shape) * dtype.itemsize
    found = len(raw) - header_size
    if found != expected:
        kind = "truncated" if found < expected else "has trailing bytes"
        raise ValueError(f"{path}: {kind}: header promises shape {shape} ({expected} data bytes), found {found}")
    # NumPy refuses shapes whose nonzero sides multiply past what it can index, even for an
    # empty array: (0, 2**32 - 1, 2**32 - 1) promises 0 bytes, matches an empty body, and
    # reshape would fail with a message naming no file.
    addressable = math.prod(side for side in shape if side) * dtype.itemsize
    if addressable > np.iinfo(np.intp).max:
        raise ValueError(f"{path}: header shape {shape} is too large for a NumPy array")
    array = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)
