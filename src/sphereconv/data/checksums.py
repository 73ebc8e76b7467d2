"""Integrity checks for dataset files.

Two kinds of checksum are used, because distributions repackage the same data:

- the SHA-256 of the *decompressed content* of a file, which is what a dataset file means and does
  not depend on how it was compressed (Debian's ``dataset-fashion-mnist`` ships gzip files whose
  bytes differ from upstream's while their content is identical);
- the MD5 of a downloaded file's *bytes*, where that is what the publisher gives (the MNIST gzip
  files, the CIFAR archives).

Files that have neither are validated structurally by their readers (magic numbers, counts, shapes).
Every mismatch raises :class:`~sphereconv.errors.DatasetError` naming the file and what to do.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import zlib
from collections.abc import Iterator
from pathlib import Path

from ..errors import DatasetError

# First two bytes of every gzip stream (RFC 1952, Section 2.3.1).
GZIP_MAGIC = b"\x1f\x8b"
# Read files in 1 MiB blocks when hashing them.
HASH_BLOCK_BYTES = 1 << 20
# Most decompressed bytes read from one dataset file when no tighter bound is known: above the
# largest MNIST-family file (EMNIST ByClass training images, 0.55 GB), far below a gzip bomb's
# gigabytes.
MAX_CONTENT_BYTES = 1 << 30


def file_md5(path: str | Path) -> str:
    """Hex MD5 of the bytes of ``path``."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def open_content(path: str | Path) -> Iterator[io.BufferedIOBase]:
    """A binary stream of the content of ``path``: gunzipped when it starts with the gzip magic, else raw.

    A damaged gzip stream met while reading raises :class:`DatasetError` naming the file, as does
    a file that cannot be opened.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            if handle.read(len(GZIP_MAGIC)) != GZIP_MAGIC:
                handle.seek(0)
                yield handle
                return
            handle.seek(0)
            with gzip.GzipFile(fileobj=handle) as stream:
                yield stream
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DatasetError(
            f"{path} is a damaged or truncated gzip file ({exc}); delete it and download it again "
            "(or reinstall the package that provided it)"
        ) from exc
    except OSError as exc:
        raise DatasetError(f"cannot read dataset file {path}: {exc}") from exc


def read_at_most(stream: io.BufferedIOBase, limit: int) -> bytes:
    """Up to ``limit`` bytes of ``stream``, read in blocks (never a single allocation of ``limit``)."""
    blocks = []
    remaining = limit
    while remaining > 0:
        block = stream.read(min(HASH_BLOCK_BYTES, remaining))
        if not block:
            break
        blocks.append(block)
        remaining -= len(block)
    return b"".join(blocks)


def _too_large(path: str | Path, max_bytes: int) -> DatasetError:
    return DatasetError(
        f"{path} decompresses to more than {max_bytes:,} bytes, more than this dataset file can hold; "
        "delete it and download it again"
    )


def read_content(path: str | Path, max_bytes: int = MAX_CONTENT_BYTES) -> bytes:
    """The decompressed content of ``path`` (see :func:`open_content`), at most ``max_bytes`` of it.

    Content longer than ``max_bytes`` raises :class:`DatasetError` after reading ``max_bytes + 1``
    bytes, so a small gzip file that expands to gigabytes is never decompressed in full.
    """
    with open_content(path) as stream:
        content = read_at_most(stream, max_bytes + 1)
    if len(content) > max_bytes:
        raise _too_large(path, max_bytes)
    return content


def verify_content(path: str | Path, content: bytes, expected_sha256: str | None) -> None:
    """Raise :class:`DatasetError` unless ``sha256(content) == expected_sha256`` (``None``: no check)."""
    if expected_sha256 is None:
        return
    actual = sha256_hex(content)
    if actual != expected_sha256:
        _raise_mismatch(path, actual, expected_sha256)


def _raise_mismatch(path: str | Path, actual: str, expected_sha256: str) -> None:
    raise DatasetError(
        f"checksum mismatch for {path}: SHA-256 of its decompressed content is {actual}, expected "
        f"{expected_sha256}; the file is corrupt or not the expected dataset file: delete it and download "
        "it again (or reinstall the package that provided it)"
    )


def verify_content_of_file(path: str | Path, expected_sha256: str | None, max_bytes: int = MAX_CONTENT_BYTES) -> None:
    """:func:`verify_content` of the decompressed content of ``path``, hashed as it is read.

    Never holds more than one block in memory; content longer than ``max_bytes`` raises
    :class:`DatasetError` as in :func:`read_content`.
    """
    if expected_sha256 is None:
        return
    digest = hashlib.sha256()
    size = 0
    with open_content(path) as stream:
        for block in iter(lambda: stream.read(HASH_BLOCK_BYTES), b""):
            size += len(block)
            if size > max_bytes:
                raise _too_large(path, max_bytes)
            digest.update(block)
    if digest.hexdigest() != expected_sha256:
        _raise_mismatch(path, digest.hexdigest(), expected_sha256)


def verify_md5(path: str | Path, expected_md5: str | None) -> None:
    """Raise :class:`DatasetError` unless the MD5 of the bytes of ``path`` equals ``expected_md5``."""
    if expected_md5 is None:
        return
    actual = file_md5(path)
    if actual != expected_md5:
        raise DatasetError(f"checksum mismatch for {path}: MD5 is {actual}, expected {expected_md5}")
