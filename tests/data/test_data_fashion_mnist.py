"""Real Fashion-MNIST from Debian's dataset-fashion-mnist package: discovery, content checksums, structure."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch

from sphereconv.data import dataset_info, discovery, load_dataset
from sphereconv.errors import DatasetError

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

pytestmark = pytest.mark.skipif(
    not (REAL_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="needs Debian's dataset-fashion-mnist package (apt install dataset-fashion-mnist)",
)


@pytest.fixture
def system_root(monkeypatch):
    monkeypatch.setattr(discovery, "SYSTEM_DATASETS_ROOT", REAL_FASHION_MNIST.parent)


def test_real_fashion_mnist_is_discovered_verified_and_complete(system_root):
    train_x, train_y = load_dataset("fashion-mnist", "train")
    test_x, test_y = load_dataset("Fashion_MNIST", "test")
    assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
    assert train_x.dtype == torch.uint8 and train_y.dtype == torch.int64
    assert train_y.shape == (60000,) and test_y.shape == (10000,)
    # Fashion-MNIST is exactly balanced: 6000 train and 1000 test images per class.
    assert train_y.bincount(minlength=10).tolist() == [6000] * 10
    assert test_y.bincount(minlength=10).tolist() == [1000] * 10
    assert int(train_y.min()) == 0 and int(train_y.max()) == 9
    assert int(train_x.max()) == 255 and int(train_x.min()) == 0
    # Real images, not noise: the mean of a trouser (class 1) differs from that of a bag (class 8).
    mean_by_class = torch.stack([train_x[train_y == c].float().mean() for c in range(10)])
    assert mean_by_class.std() > 5
    info = dataset_info("fashion-mnist")
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 28)
    assert info.class_names[9] == "Ankle boot"


def test_data_dir_may_hold_raw_idx_and_content_checksum_catches_a_changed_label(tmp_path, system_root):
    reference_x, reference_y = load_dataset("fashion-mnist", "test")
    shutil.copy(REAL_FASHION_MNIST / "t10k-images-idx3-ubyte.gz", tmp_path)
    labels = bytearray(gzip.decompress((REAL_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw_labels = tmp_path / "t10k-labels-idx1-ubyte"  # uncompressed: the content checksum still applies
    raw_labels.write_bytes(bytes(labels))
    x, y = load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert torch.equal(x, reference_x) and torch.equal(y, reference_y)

    # One label changed to another valid class: structurally perfect, only the checksum can tell.
    labels[8] = (labels[8] + 1) % 10
    raw_labels.write_bytes(bytes(labels))
    with pytest.raises(DatasetError, match=r"checksum mismatch for .*t10k-labels-idx1-ubyte.*SHA-256"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)


def test_truncated_real_gzip_is_reported(tmp_path, system_root):
    shutil.copy(REAL_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz", tmp_path)
    images = (REAL_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(images[: len(images) // 2])
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz is a damaged or truncated gzip"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)


def test_real_fashion_mnist_is_not_read_as_mnist(system_root):
    # Same file names and shapes as MNIST: only the content checksum tells the datasets apart.
    with pytest.raises(DatasetError, match=r"is a file of fashion-mnist, not of mnist"):
        load_dataset("mnist", "test", data_dir=REAL_FASHION_MNIST)
