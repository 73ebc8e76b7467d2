"""IDX reader and the MNIST-format datasets on small generated files with genuine IDX headers."""

from __future__ import annotations

import dataclasses
import gzip

import numpy as np
import pytest
import torch

from sphereconv.data import load_dataset
from sphereconv.data.idx import parse_idx, read_idx
from sphereconv.data.registry import DATASETS
from sphereconv.errors import DatasetError


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip_uint8_and_int32(tmp_path, formats, compress):
    images = formats.random_images(5, 1, 28, seed=0)[:, 0]
    path = formats.write_idx(tmp_path / "images", images, compress=compress)
    assert np.array_equal(read_idx(path), images)
    values = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 1000003
    path = formats.write_idx(tmp_path / "values", values, compress=compress)
    decoded = read_idx(path)
    assert decoded.dtype == np.int32 and np.array_equal(decoded, values)


def test_idx_header_is_big_endian(tmp_path, formats):
    path = formats.write_idx(tmp_path / "labels", np.array([7, 1, 2], dtype=np.uint8))
    raw = path.read_bytes()
    assert raw[:8] == bytes([0, 0, 0x08, 1, 0, 0, 0, 3])
    assert read_idx(path).tolist() == [7, 1, 2]


def test_truncated_idx_raises_naming_the_file(tmp_path, formats):
    path = formats.write_idx(tmp_path / "train-images-idx3-ubyte", formats.random_images(4, 1, 28, 1)[:, 0])
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte is truncated.*shape \(4, 28, 28\)"):
        read_idx(path)
    path.write_bytes(path.read_bytes()[:6])
    with pytest.raises(DatasetError, match="truncated inside its IDX header"):
        read_idx(path)


def test_truncated_gzip_stream_raises(tmp_path, formats):
    path = formats.write_idx(tmp_path / "x.gz", formats.random_images(20, 1, 28, 2)[:, 0], compress=True)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DatasetError, match=r"x\.gz is a damaged or truncated gzip"):
        read_idx(path)


def test_not_an_idx_file_is_rejected():
    with pytest.raises(DatasetError, match="is not an IDX file"):
        parse_idx(b"<html>404 not found</html>", "page.html")
    with pytest.raises(DatasetError, match="longer than its header"):
        parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 2, 3]), "padded")


def test_header_whose_size_overflows_int64_is_not_taken_as_empty():
    # dims 65536**4 = 2**64: an int64 product wrapped to 0, so a bare header "matched" and reshape raised ValueError.
    header = bytes([0, 0, 8, 4]) + (65536).to_bytes(4, "big") * 4
    with pytest.raises(DatasetError, match=r"bare\.idx is truncated: .*\(65536, 65536, 65536, 65536\)"):
        parse_idx(header, "bare.idx")


@pytest.fixture
def small_mnist(monkeypatch):
    """Shrink MNIST's expected split sizes so generated files pass the structural checks."""
    spec = dataclasses.replace(DATASETS["mnist"], split_counts={"train": 12, "test": 6})
    monkeypatch.setitem(DATASETS, "mnist", spec)
    return spec


def test_mnist_loads_from_data_dir_raw_or_gzip(tmp_path, formats, small_mnist):
    rng = np.random.default_rng(3)
    images = formats.random_images(12, 1, 28, seed=3)[:, 0]
    labels = rng.integers(0, 10, 12)
    formats.write_mnist_split(tmp_path / "mnist", "train", images, labels, compress=True)
    formats.write_mnist_split(tmp_path / "flat", "train", images, labels, compress=False)
    for data_dir in (tmp_path, tmp_path / "flat"):  # root of datasets, or the dataset directory itself
        x, y = load_dataset("mnist", "train", data_dir=data_dir)
        assert x.shape == (12, 1, 28, 28) and x.dtype == torch.uint8
        assert torch.equal(x[:, 0], torch.from_numpy(images))
        assert y.dtype == torch.int64 and y.tolist() == labels.tolist()


def test_mnist_structural_checks(tmp_path, formats, small_mnist):
    images = formats.random_images(6, 1, 28, seed=4)[:, 0]
    formats.write_mnist_split(tmp_path, "test", images[:5], np.zeros(5, np.uint8))
    with pytest.raises(DatasetError, match=r"shape \(5, 28, 28\), expected uint8 \(6, 28, 28\)"):
        load_dataset("mnist", "test", data_dir=tmp_path)
    formats.write_mnist_split(tmp_path, "test", images, np.array([0, 1, 2, 3, 4, 10], np.uint8))
    with pytest.raises(DatasetError, match=r"labels range over \[0, 10\], expected \[0, 9\]"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_mnist_with_wrong_image_count_is_not_silently_used(tmp_path, formats):
    # With the real expected sizes (10000 test images) a 6-image file is incomplete.
    formats.write_mnist_split(tmp_path, "test", formats.random_images(6, 1, 28, 5)[:, 0], np.zeros(6, np.uint8))
    with pytest.raises(DatasetError, match=r"expected uint8 \(10000, 28, 28\).*delete it and download it again"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_gzip_detected_by_content_not_name(tmp_path, formats, small_mnist):
    images = formats.random_images(6, 1, 28, seed=6)[:, 0]
    formats.write_mnist_split(tmp_path, "test", images, np.arange(6, dtype=np.uint8), compress=False)
    raw = tmp_path / "t10k-images-idx3-ubyte"
    raw.write_bytes(gzip.compress(raw.read_bytes()))  # gzip content under the raw name
    x, _ = load_dataset("mnist", "test", data_dir=tmp_path)
    assert torch.equal(x[:, 0], torch.from_numpy(images))
