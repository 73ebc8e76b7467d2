"""Dataset registry, search order and the message for missing data."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from sphereconv.data import dataset_info, list_datasets, load_dataset, user_cache_dir
from sphereconv.data.discovery import search_roots
from sphereconv.data.registry import DATASETS, canonical_name
from sphereconv.errors import DatasetError, SphereconvError


def test_registry_names_infos_and_unknown_names():
    assert list_datasets() == ["cifar10", "cifar100", "fashion-mnist", "folder", "mnist"]
    expected = {"mnist": (10, 1, 28), "fashion-mnist": (10, 1, 28), "cifar10": (10, 3, 32), "cifar100": (100, 3, 32)}
    for name, (classes, channels, size) in expected.items():
        info = dataset_info(name)
        assert (info.name, info.num_classes, info.in_channels, info.image_size) == (name, classes, channels, size)
        assert len(info.class_names) == classes == len(set(info.class_names))
    assert dataset_info("CIFAR-10").class_names[0] == "airplane"
    assert canonical_name("FashionMNIST") == "fashion-mnist" and canonical_name("ImageFolder") == "folder"
    with pytest.raises(
        DatasetError, match=r"unknown dataset 'imagenet'; allowed: cifar10, cifar100, fashion-mnist, folder, mnist"
    ):
        dataset_info("imagenet")
    with pytest.raises(SphereconvError, match="unknown dataset"):
        load_dataset("svhn", "train")
    with pytest.raises(ValueError, match="split must be one of train, test; got 'val'"):
        load_dataset("mnist", "val")


def test_missing_data_message_names_every_searched_dir_and_the_fixes(tmp_path, isolated_roots, monkeypatch):
    monkeypatch.setenv("SPHERECONV_DATA", str(isolated_roots["env"]))
    with pytest.raises(DatasetError) as caught:
        load_dataset("mnist", "train", data_dir=tmp_path / "given")
    message = str(caught.value)
    assert "\n" not in message
    for root in (tmp_path / "given", isolated_roots["env"], isolated_roots["cache"], isolated_roots["system"]):
        assert str(root) in message
    for fix in ("--download", "--data-dir", "$SPHERECONV_DATA", "train-images-idx3-ubyte[.gz]", "mnist/", "MNIST/raw/"):
        assert fix in message
    assert "ossci-datasets.s3.amazonaws.com" in message


def test_missing_fashion_mnist_suggests_the_debian_package():
    with pytest.raises(DatasetError, match=r"sudo apt install dataset-fashion-mnist.*--download.*--data-dir"):
        load_dataset("fashion-mnist", "test")


def test_search_order_data_dir_env_cache_system(tmp_path, isolated_roots, formats, monkeypatch):
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(DATASETS["mnist"], split_counts={"train": 2, "test": 2}))
    monkeypatch.setenv("SPHERECONV_DATA", str(isolated_roots["env"]))
    given = tmp_path / "given"
    roots = {
        "system": isolated_roots["system"],
        "cache": isolated_roots["cache"],
        "env": isolated_roots["env"],
        "given": given,
    }
    images = formats.random_images(2, 1, 28, seed=0)[:, 0]
    for label, root in enumerate(roots.values()):  # each root's copy has its own label
        formats.write_mnist_split(root / "mnist", "test", images, np.full(2, label, np.uint8))
    assert [p for _, p in search_roots(given)] == [
        given,
        isolated_roots["env"],
        isolated_roots["cache"],
        isolated_roots["system"],
    ]
    for name in ["given", "env", "cache", "system"]:  # remove the winner each time: the next root wins
        _, y = load_dataset("mnist", "test", data_dir=given if (given / "mnist").exists() else None)
        assert y.tolist() == [list(roots).index(name)] * 2
        for path in (roots[name] / "mnist").iterdir():
            path.unlink()
        (roots[name] / "mnist").rmdir()


def test_user_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_cache_dir() == tmp_path / "sphereconv"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_cache_dir() == Path.home() / ".cache" / "sphereconv"


def test_a_root_holding_only_fashion_mnist_does_not_serve_it_as_mnist(tmp_path, formats, monkeypatch):
    # MNIST and Fashion-MNIST share file names, header and shapes; MNIST has no content checksum,
    # so a root holding Fashion-MNIST's files directly (``--data-dir`` at the dataset's own folder,
    # as the search allows) was read as MNIST in silence: clothes labelled as digits.
    small = {"train": 2, "test": 2}
    fashion_dir = tmp_path / "fashion-mnist"
    fashion_images = formats.random_images(2, 1, 28, seed=1)[:, 0]
    formats.write_mnist_split(fashion_dir, "test", fashion_images, np.array([3, 7], np.uint8))
    contents = {
        "t10k-images-idx3-ubyte": gzip.decompress((fashion_dir / "t10k-images-idx3-ubyte.gz").read_bytes()),
        "t10k-labels-idx1-ubyte": gzip.decompress((fashion_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()),
    }
    checksums = {name: hashlib.sha256(content).hexdigest() for name, content in contents.items()}
    fashion = dataclasses.replace(DATASETS["fashion-mnist"], split_counts=small, content_sha256=checksums)
    monkeypatch.setitem(DATASETS, "fashion-mnist", fashion)
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(DATASETS["mnist"], split_counts=small))

    x, y = load_dataset("fashion-mnist", "test", data_dir=fashion_dir)  # its own dataset still loads
    assert y.tolist() == [3, 7]
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz is a file of fashion-mnist, not of mnist"):
        load_dataset("mnist", "test", data_dir=fashion_dir)
    monkeypatch.setenv("SPHERECONV_DATA", str(fashion_dir))
    with pytest.raises(DatasetError, match=r"--data-dir \(or \$SPHERECONV_DATA\).*mnist/ subfolder"):
        load_dataset("mnist", "test")

    # MNIST's own files next to them, in the mnist/ subfolder searched first, are read.
    digits = formats.random_images(2, 1, 28, seed=2)[:, 0]
    formats.write_mnist_split(fashion_dir / "mnist", "test", digits, np.array([0, 9], np.uint8))
    x, y = load_dataset("mnist", "test")
    assert y.tolist() == [0, 9] and np.array_equal(x[:, 0].numpy(), digits)
