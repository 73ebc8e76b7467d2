"""Downloads against a local HTTP server on 127.0.0.1 serving generated files, good and corrupted."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import socket
import tarfile
import threading
import tracemalloc

import numpy as np
import pytest
import torch

from sphereconv.data import download, load_dataset
from sphereconv.data.download import download_file, extract_tar
from sphereconv.data.registry import DATASETS, RemoteFile
from sphereconv.errors import DatasetError


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def leftovers(directory):
    """Every file under ``directory`` (temporary ``.part`` files included)."""
    return sorted(p.name for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def test_download_file_verifies_md5_and_renames_into_place(tmp_path, http_root):
    served, url = http_root
    payload = bytes(range(256)) * 100
    (served / "good.bin").write_bytes(payload)
    dest = tmp_path / "out" / "good.bin"
    download_file(url + "good.bin", dest, md5=md5(payload), progress=False)
    assert dest.read_bytes() == payload
    assert leftovers(dest.parent) == ["good.bin"]


def test_corrupted_download_raises_and_leaves_nothing(tmp_path, http_root):
    served, url = http_root
    (served / "bad.bin").write_bytes(b"corrupted bytes")
    dest = tmp_path / "out" / "bad.bin"
    with pytest.raises(DatasetError, match=r"failed verification and was deleted.*checksum mismatch.*MD5"):
        download_file(url + "bad.bin", dest, md5=md5(b"the real bytes"), progress=False)
    assert leftovers(dest.parent) == []


def test_content_checksum_applies_to_decompressed_bytes(tmp_path, http_root):
    served, url = http_root
    content = b"IDX content" * 50
    # Two different gzip encodings of the same content both verify (as Debian's and upstream's do).
    (served / "a.gz").write_bytes(gzip.compress(content, compresslevel=1, mtime=0))
    (served / "b.gz").write_bytes(gzip.compress(content, compresslevel=9, mtime=12345))
    assert (served / "a.gz").read_bytes() != (served / "b.gz").read_bytes()
    want = hashlib.sha256(content).hexdigest()
    for name in ("a.gz", "b.gz"):
        download_file(url + name, tmp_path / name, content_sha256=want, progress=False)
    (served / "c.gz").write_bytes(gzip.compress(content + b"!"))
    with pytest.raises(DatasetError, match="SHA-256 of its decompressed content"):
        download_file(url + "c.gz", tmp_path / "c.gz", content_sha256=want, progress=False)
    assert not (tmp_path / "c.gz").exists()


def test_served_gzip_bomb_is_refused_without_holding_its_content(tmp_path, http_root):
    # Was: the content check read the whole decompressed stream into memory (1 GiB here, 2 GiB peak).
    served, url = http_root
    one_mib_of_zeros = gzip.compress(bytes(1 << 20), compresslevel=9)
    (served / "bomb.gz").write_bytes(gzip.compress(b"IDX?") + one_mib_of_zeros * 1100)  # about 1 MB
    tracemalloc.start()
    try:
        with pytest.raises(
            DatasetError, match=r"bomb\.gz failed verification.*decompresses to more than 1,073,741,824"
        ):
            download_file(url + "bomb.gz", tmp_path / "dest" / "bomb.gz", content_sha256="0" * 64, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak:,} bytes"
    assert leftovers(tmp_path / "dest") == []


def test_download_larger_than_any_dataset_file_is_stopped(tmp_path, http_root, monkeypatch):
    # Was: read without limit, so a wrong or hostile mirror sending without end filled the disk.
    served, url = http_root
    monkeypatch.setattr(download, "MAX_DOWNLOAD_BYTES", 3 << 20)
    (served / "huge.gz").write_bytes(bytes(5 << 20))
    with pytest.raises(DatasetError, match=r"huge\.gz stopped: the server sent more than 3,145,728 bytes"):
        download_file(url + "huge.gz", tmp_path / "dest" / "huge.gz", progress=False)
    assert leftovers(tmp_path / "dest") == []
    (served / "fits.gz").write_bytes(bytes(3 << 20))
    assert download_file(url + "fits.gz", tmp_path / "dest" / "fits.gz", progress=False).stat().st_size == 3 << 20


def test_http_error_is_a_dataset_error_naming_the_url(tmp_path, http_root):
    _, url = http_root
    with pytest.raises(DatasetError, match=r"could not download http://127\.0\.0\.1:\d+/missing\.gz.*404"):
        download_file(url + "missing.gz", tmp_path / "missing.gz", progress=False)
    assert leftovers(tmp_path) == []


def _reply_once(reply: bytes) -> str:
    """A server on 127.0.0.1 that answers one request with the raw bytes ``reply``; returns its URL."""
    server = socket.create_server(("127.0.0.1", 0))

    def answer():
        with server:
            connection, _ = server.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(reply)

    threading.Thread(target=answer, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}/"


def test_malformed_mirror_url_or_non_http_reply_is_a_dataset_error(tmp_path):
    # Were http.client.InvalidURL / BadStatusLine tracebacks (HTTPException is not an OSError).
    with pytest.raises(DatasetError, match=r"could not download http://127\.0\.0\.1:notaport/.*InvalidURL.*notaport"):
        load_dataset("mnist", "test", tmp_path, download=True, mirror="http://127.0.0.1:notaport/", progress=False)
    url = _reply_once(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    with pytest.raises(DatasetError, match=r"could not download .*/f\.gz: BadStatusLine"):
        download_file(url + "f.gz", tmp_path / "f.gz", md5="0" * 32, progress=False)
    assert leftovers(tmp_path) == []


def _serve_mnist(served, formats, n_train=8, n_test=4):
    rng = np.random.default_rng(11)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data[split] = (formats.random_images(n, 1, 28, seed=n)[:, 0], rng.integers(0, 10, n).astype(np.uint8))
        formats.write_mnist_split(served, split, *data[split])
    return data


@pytest.fixture
def served_mnist(http_root, formats, monkeypatch):
    """Generated MNIST files on the server, with the registry's MD5s and sizes set to match them."""
    served, url = http_root
    data = _serve_mnist(served, formats)
    spec = DATASETS["mnist"]
    downloads = tuple(RemoteFile(r.filename, md5((served / r.filename).read_bytes())) for r in spec.downloads)
    monkeypatch.setitem(
        DATASETS, "mnist", dataclasses.replace(spec, downloads=downloads, split_counts={"train": 8, "test": 4})
    )
    return served, url, data


def test_load_dataset_downloads_into_the_cache_then_finds_it_offline(served_mnist, isolated_roots):
    _, url, data = served_mnist
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("mnist", "train")
    x, y = load_dataset("mnist", "train", download=True, mirror=url, progress=False)
    assert torch.equal(x[:, 0], torch.from_numpy(data["train"][0])) and y.tolist() == data["train"][1].tolist()
    cached = isolated_roots["cache"] / "mnist"
    assert leftovers(cached) == sorted(r.filename for r in DATASETS["mnist"].downloads)
    x, y = load_dataset("mnist", "test")  # no download needed any more
    assert y.tolist() == data["test"][1].tolist()


def test_mirror_from_environment_and_download_into_data_dir(served_mnist, tmp_path, monkeypatch):
    _, url, data = served_mnist
    monkeypatch.setenv("SPHERECONV_MIRROR", url)
    _, y = load_dataset("mnist", "test", data_dir=tmp_path / "mine", download=True, progress=False)
    assert y.tolist() == data["test"][1].tolist()
    assert (tmp_path / "mine" / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file()


def test_corrupted_server_file_raises_and_leaves_no_partial_file(served_mnist, isolated_roots):
    served, url, _ = served_mnist
    labels = served / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-5])  # truncated on the server
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz failed verification.*MD5"):
        load_dataset("mnist", "train", download=True, mirror=url, progress=False)
    assert "train-labels-idx1-ubyte.gz" not in leftovers(isolated_roots["cache"])
    assert not [name for name in leftovers(isolated_roots["cache"]) if name.endswith(".part")]


def test_fashion_mnist_download_is_verified_by_content(http_root, formats, monkeypatch, tmp_path):
    served, url = http_root
    data = _serve_mnist(served, formats)
    spec = DATASETS["fashion-mnist"]
    content_sha256 = {
        r.filename[:-3]: hashlib.sha256(gzip.decompress((served / r.filename).read_bytes())).hexdigest()
        for r in spec.downloads
    }
    monkeypatch.setitem(
        DATASETS,
        "fashion-mnist",
        dataclasses.replace(spec, content_sha256=content_sha256, split_counts={"train": 8, "test": 4}),
    )
    _, y = load_dataset("fashion-mnist", "train", data_dir=tmp_path / "ok", download=True, mirror=url, progress=False)
    assert y.tolist() == data["train"][1].tolist()
    # Same structure, one pixel changed: only the content checksum notices.
    images = data["test"][0].copy()
    images[0, 0, 0] ^= 1
    formats.write_idx(served / "t10k-images-idx3-ubyte.gz", images, compress=True)
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz failed verification.*SHA-256"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path / "bad", download=True, mirror=url, progress=False)
    assert not (tmp_path / "bad" / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").exists()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def test_cifar_archive_download_and_extraction(http_root, formats, monkeypatch, tmp_path):
    served, url = http_root
    batches, written = {}, []
    rng = np.random.default_rng(5)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images, labels = formats.random_images(2, 3, 32, len(batches)), rng.integers(0, 10, 2)
        path = formats.write_cifar_batch(tmp_path / "src" / name, images, labels)
        batches[f"cifar-10-batches-py/{name}"] = path.read_bytes()
        written.append((images, labels))
    archive = _tar_gz(batches)
    (served / "cifar-10-python.tar.gz").write_bytes(archive)
    spec = DATASETS["cifar10"]
    monkeypatch.setitem(
        DATASETS,
        "cifar10",
        dataclasses.replace(
            spec,
            downloads=(RemoteFile("cifar-10-python.tar.gz", md5(archive), extract=True),),
            split_counts={"train": 10, "test": 2},
        ),
    )
    x, y = load_dataset("cifar10", "train", data_dir=tmp_path / "data", download=True, mirror=url, progress=False)
    assert x.shape == (10, 3, 32, 32) and y.shape == (10,)
    # The five training batches, extracted intact and concatenated in order.
    assert torch.equal(x, torch.from_numpy(np.concatenate([images for images, _ in written[:5]])))
    assert y.tolist() == np.concatenate([labels for _, labels in written[:5]]).tolist()
    assert leftovers(tmp_path / "data" / "cifar-10-batches-py") == sorted(n.split("/")[1] for n in batches)

    (served / "cifar-10-python.tar.gz").write_bytes(archive[:-100])
    with pytest.raises(DatasetError, match="failed verification"):
        load_dataset("cifar10", "test", data_dir=tmp_path / "fresh", download=True, mirror=url, progress=False)
    assert leftovers(tmp_path / "fresh") == []


def test_archive_members_escaping_the_directory_are_refused(tmp_path):
    for name in ("../evil.txt", "/tmp/evil.txt", "other-dir/file"):
        archive = tmp_path / "bad.tar.gz"
        archive.write_bytes(_tar_gz({"cifar-10-batches-py/ok": b"fine", name: b"evil"}))
        with pytest.raises(DatasetError, match="refused: member"):
            extract_tar(archive, tmp_path / "out", "cifar-10-batches-py")
        assert leftovers(tmp_path / "out") == []
    assert not (tmp_path / "evil.txt").exists()
