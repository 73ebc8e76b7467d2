"""Fixtures for the data tests: isolated search roots, writers of genuine on-disk formats, an HTTP server."""

from __future__ import annotations

import functools
import gzip
import http.server
import pickle
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from sphereconv.data import discovery

# IDX type code of unsigned bytes and of big-endian int32 (format description of MNIST).
IDX_UBYTE = 0x08
IDX_INT32 = 0x0C


@pytest.fixture(autouse=True)
def isolated_roots(tmp_path_factory, monkeypatch):
    """Point every search root at empty temporary directories; returns them by name."""
    base = tmp_path_factory.mktemp("roots")
    roots = {"cache": base / "xdg-cache", "system": base / "system", "env": base / "env"}
    for path in roots.values():
        path.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(roots["cache"]))
    monkeypatch.delenv("SPHERECONV_DATA", raising=False)
    monkeypatch.delenv("SPHERECONV_MIRROR", raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(discovery, "SYSTEM_DATASETS_ROOT", roots["system"])
    roots["cache"] = roots["cache"] / "sphereconv"
    return roots


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> Path:
    """Write ``array`` as an IDX file: 0x0000, type code, ndim, big-endian dims, big-endian values."""
    code = {np.dtype(np.uint8): IDX_UBYTE, np.dtype(np.int32): IDX_INT32}[array.dtype]
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_mnist_split(directory: Path, split: str, images: np.ndarray, labels: np.ndarray, *, compress: bool = True):
    """Write one split in the MNIST file naming (``train-``/``t10k-``), gzip-compressed by default."""
    prefix = "train" if split == "train" else "t10k"
    suffix = ".gz" if compress else ""
    write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, compress=compress)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels.astype(np.uint8), compress=compress)


def write_cifar_batch(
    path: Path, images: np.ndarray, labels: np.ndarray, *, label_key: bytes = b"labels", protocol: int = 2
) -> Path:
    """Write a CIFAR batch pickle: rows of 3072 bytes (R, G, B planes of 32x32) plus labels."""
    batch = {
        b"batch_label": b"generated batch",
        b"data": images.reshape(images.shape[0], -1).astype(np.uint8),
        label_key: [int(v) for v in labels],
        b"filenames": [f"img{i}.png".encode() for i in range(len(labels))],
    }
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [int(v) // 5 for v in labels]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    return path


def random_images(n: int, channels: int, side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, channels, side, side), dtype=np.uint8)


@pytest.fixture
def formats():
    """The writers above, for tests."""

    class Formats:
        pass

    ns = Formats()
    ns.write_idx = write_idx
    ns.write_mnist_split = write_mnist_split
    ns.write_cifar_batch = write_cifar_batch
    ns.random_images = random_images
    return ns


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass


@pytest.fixture
def http_root(tmp_path):
    """A directory served over HTTP on 127.0.0.1 (ephemeral port); yields ``(directory, base_url)``."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
