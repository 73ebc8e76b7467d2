"""Reader for the IDX format of MNIST and Fashion-MNIST (the digit data of Liu et al. 2017, Sec. 5).

An IDX file is a 4-byte header ``0x00 0x00 <type code> <number of dimensions>``, then one big-endian
uint32 per dimension, then the values in row-major order, big-endian (format description at
http://yann.lecun.com/exdb/mnist/). Files may be gzip-compressed; the compression is detected from
the content, not the file name. A file whose length does not match its header raises
:class:`~sphereconv.errors.DatasetError` (it is truncated or padded), never a silently short array.
Reading is bounded by the header (and by the dataset table, when the caller gives it): a gzip file
is decompressed no further than one byte past the size its header promises.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .checksums import MAX_CONTENT_BYTES, open_content, read_at_most

# Type codes of the IDX header and the big-endian numpy dtype each stands for.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# Bytes before the dimension sizes: two zero bytes, the type code, the number of dimensions.
IDX_MAGIC_BYTES = 4
# Each dimension size is a big-endian uint32.
IDX_DIM_BYTES = 4


def parse_idx(content: bytes, source: str | Path = "<bytes>") -> np.ndarray:
    """Decode the (decompressed) bytes of an IDX file into a native-endian numpy array.

    Raises :class:`DatasetError` naming ``source`` for a bad magic number, an unknown type code or
    a length that does not match the header.
    """
    if len(content) < IDX_MAGIC_BYTES:
        raise DatasetError(f"{source} is not an IDX file: only {len(content)} bytes; delete it and download it again")
    zero, type_code, ndim = struct.unpack(">HBB", content[:IDX_MAGIC_BYTES])
    if zero != 0 or type_code not in IDX_DTYPES or ndim == 0:
        raise DatasetError(
            f"{source} is not an IDX file (magic bytes {content[:IDX_MAGIC_BYTES].hex()}, expected 0000 followed by "
            f"a type code in {sorted(hex(c) for c in IDX_DTYPES)} and a dimension count); "
            "delete it and download it again"
        )
    header_bytes = IDX_MAGIC_BYTES + IDX_DIM_BYTES * ndim
    if len(content) < header_bytes:
        raise DatasetError(f"{source} is truncated inside its IDX header; delete it and download it again")
    dims = struct.unpack(f">{ndim}I", content[IDX_MAGIC_BYTES:header_bytes])
    dtype = IDX_DTYPES[type_code]
    # math.prod: exact; numpy's int64 product wraps (65536**4 == 0 would match a bare header).
    expected = header_bytes + math.prod(dims) * dtype.itemsize
    if len(content) != expected:
        state = "truncated" if len(content) < expected else "longer than its header says"
        raise DatasetError(
            f"{source} is {state}: its IDX header promises shape {tuple(dims)} ({expected} bytes), the file has "
            f"{len(content)} bytes; delete it and download it again (or reinstall the package that provided it)"
        )
    values = np.frombuffer(content, dtype=dtype, offset=header_bytes).reshape(dims)
    return values.astype(dtype.newbyteorder("="), copy=True)


def read_idx_content(path: str | Path, max_bytes: int = MAX_CONTENT_BYTES) -> bytes:
    """The (decompressed) bytes of an IDX file, reading no more than its header promises, plus one.

    The header is read first; a file whose header promises more than ``max_bytes`` (the size the
    dataset table allows) raises :class:`DatasetError` at once, and of a longer stream only one byte
    past the promised size is read (enough for :func:`parse_idx` to call it too long). So a small
    gzip file holding gigabytes of zeros is never decompressed in full.
    """
    with open_content(path) as stream:
        head = read_at_most(stream, IDX_MAGIC_BYTES)
        if len(head) < IDX_MAGIC_BYTES:
            return head  # parse_idx names the problem
        zero, type_code, ndim = struct.unpack(">HBB", head)
        if zero != 0 or type_code not in IDX_DTYPES or ndim == 0:
            return head
        head += read_at_most(stream, IDX_DIM_BYTES * ndim)
        if len(head) < IDX_MAGIC_BYTES + IDX_DIM_BYTES * ndim:
            return head
        dims = struct.unpack(f">{ndim}I", head[IDX_MAGIC_BYTES:])
        expected = len(head) + math.prod(dims) * IDX_DTYPES[type_code].itemsize
        if expected > max_bytes:
            raise DatasetError(
                f"{path}: its IDX header promises shape {tuple(dims)} ({expected:,} bytes), more than the "
                f"{max_bytes:,} bytes this dataset file can hold; delete it and download it again"
            )
        return head + read_at_most(stream, expected - len(head) + 1)


def read_idx(path: str | Path, max_bytes: int = MAX_CONTENT_BYTES) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) of at most ``max_bytes`` into a numpy array.

    See :func:`read_idx_content` and :func:`parse_idx`.
    """
    return parse_idx(read_idx_content(path, max_bytes), path)
