"""Untrusted dataset files are bounded: gzip IDX streams, CIFAR pickles and image files.

Each hostile file here is small on disk but would, read naively, cost gigabytes of memory, a
traceback from deep inside a library, or a silently wrong label.
"""

from __future__ import annotations

import dataclasses
import gzip
import pickle
import struct
import tracemalloc
import zlib

import numpy as np
import pytest

from sphereconv.data import dataset_info, load_dataset
from sphereconv.data.cifar import read_cifar_batch, safe_load_pickle
from sphereconv.data.idx import read_idx
from sphereconv.data.image_folder import MAX_IMAGE_PIXELS
from sphereconv.data.registry import DATASETS
from sphereconv.errors import DatasetError

Image = pytest.importorskip("PIL.Image")

# Images in the test split of the shrunken MNIST spec below.
SMALL_TEST_COUNT = 4
# Peak Python allocation allowed while refusing a bomb: far below the bomb's expanded size.
PEAK_BYTES_BOUND = 16 << 20


@pytest.fixture
def small_mnist(monkeypatch):
    spec = dataclasses.replace(DATASETS["mnist"], split_counts={"train": 8, "test": SMALL_TEST_COUNT})
    monkeypatch.setitem(DATASETS, "mnist", spec)


def gzip_of_zeros_after(header: bytes, zero_mib: int) -> bytes:
    """A gzip file whose content is ``header`` then ``zero_mib`` MiB of zeros, about 1 KB per MiB.

    Gzip readers concatenate members, so one compressed MiB of zeros repeated makes a bomb cheaply.
    """
    block = gzip.compress(bytes(1 << 20), compresslevel=9)
    return gzip.compress(header) + block * zero_mib


def peak_allocation(function) -> tuple[int, BaseException | None]:
    tracemalloc.start()
    try:
        function()
        error = None
    except BaseException as exc:  # noqa: BLE001 - returned for the test to inspect
        error = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, error


def test_gzip_idx_bomb_is_refused_after_reading_only_what_the_table_implies(tmp_path, formats, small_mnist):
    directory = tmp_path / "mnist"
    formats.write_idx(directory / "t10k-labels-idx1-ubyte.gz", np.zeros(SMALL_TEST_COUNT, np.uint8), compress=True)
    # A genuine header for the 4 test images, then 1 GiB of zeros (about 1 MB on disk).
    header = struct.pack(">HBB3I", 0, 0x08, 3, SMALL_TEST_COUNT, 28, 28)
    bomb = directory / "t10k-images-idx3-ubyte.gz"
    bomb.write_bytes(gzip_of_zeros_after(header, 1024))
    assert bomb.stat().st_size < 2 << 20
    peak, error = peak_allocation(lambda: load_dataset("mnist", "test", data_dir=tmp_path))
    assert isinstance(error, DatasetError), error
    assert "t10k-images-idx3-ubyte.gz" in str(error) and "longer than its header says" in str(error)
    assert peak < PEAK_BYTES_BOUND, f"peak {peak:,} bytes"


def test_idx_header_promising_more_than_the_table_is_refused_before_reading(tmp_path, formats, small_mnist):
    directory = tmp_path / "mnist"
    formats.write_idx(directory / "t10k-labels-idx1-ubyte.gz", np.zeros(SMALL_TEST_COUNT, np.uint8), compress=True)
    header = struct.pack(">HBB3I", 0, 0x08, 3, 60000, 28, 28)
    (directory / "t10k-images-idx3-ubyte.gz").write_bytes(gzip_of_zeros_after(header, 256))
    peak, error = peak_allocation(lambda: load_dataset("mnist", "test", data_dir=tmp_path))
    assert isinstance(error, DatasetError), error
    assert "promises shape (60000, 28, 28)" in str(error) and f"{28 * 28 * SMALL_TEST_COUNT + 16:,} bytes" in str(error)
    assert peak < PEAK_BYTES_BOUND, f"peak {peak:,} bytes"


def test_read_idx_without_a_table_stops_one_byte_past_its_header(tmp_path):
    path = tmp_path / "padded-idx1-ubyte.gz"
    path.write_bytes(gzip_of_zeros_after(struct.pack(">HBBI", 0, 0x08, 1, 10) + bytes(10), 512))
    peak, error = peak_allocation(lambda: read_idx(path))
    assert isinstance(error, DatasetError) and "longer than its header says" in str(error)
    assert peak < PEAK_BYTES_BOUND, f"peak {peak:,} bytes"
    path.write_bytes(gzip.compress(struct.pack(">HBBI", 0, 0x08, 1, 3) + bytes([7, 8, 9])))
    assert read_idx(path).tolist() == [7, 8, 9]


def cifar_pickle(labels, rows: int = 4) -> bytes:
    return pickle.dumps({b"data": np.zeros((rows, 3072), np.uint8), b"labels": labels}, protocol=2)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0, 1, 2**70, 3], r"range over \[0, 1180591620717411303424\], expected \[0, 9\]"),
        ([0, 1, -(2**70), 3], r"range over \[-1180591620717411303424, 3\]"),
        ([0, 0.7, 1, 2], r"'labels'\[1\] is 0\.7, not an integer class index"),
        ([0, True, 1, 2], r"'labels'\[1\] is True, not an integer"),
        ([0, "3", 1, 2], r"'labels'\[1\] is '3', not an integer"),
        (np.array([0.0, 1.0, 2.0, 3.0]), r"float64 array of shape \(4,\), not a list of integers"),
        ({0: 1}, r"is a dict, not a list of integers"),
    ],
)
def test_cifar_labels_must_be_integers_in_range(tmp_path, labels, message):
    path = tmp_path / "test_batch"
    path.write_bytes(cifar_pickle(labels))
    with pytest.raises(DatasetError, match=message) as caught:
        read_cifar_batch(path, "labels", 10)
    assert len(str(caught.value).splitlines()) == 1 and "test_batch" in str(caught.value)


def test_cifar_labels_of_shared_nested_references_are_refused_without_expanding_them(tmp_path):
    nested = [0] * 10
    for _ in range(8):  # 10**9 integers once expanded; a few hundred bytes pickled
        nested = [nested] * 10
    path = tmp_path / "test_batch"
    path.write_bytes(cifar_pickle([nested] * 4))
    assert path.stat().st_size < 20_000
    peak, error = peak_allocation(lambda: read_cifar_batch(path, "labels", 10))
    assert isinstance(error, DatasetError), error
    assert "'labels'[0] is [[[" in str(error) and "not an integer" in str(error)
    assert len(str(error)) < 600
    assert peak < PEAK_BYTES_BOUND, f"peak {peak:,} bytes"


def test_pickle_memo_index_bomb_is_refused_before_unpickling(tmp_path):
    # PROTO 2, BININT1 1, LONG_BINPUT 10**8, STOP: 10 bytes that make an unpickler allocate a memo
    # table of 10**8 entries (0.8 GB, seconds of work).
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"\x80\x02K\x01r" + struct.pack("<I", 10**8) + b".")
    peak, error = peak_allocation(lambda: safe_load_pickle(path))
    assert isinstance(error, DatasetError), error
    assert "memo index 100000000" in str(error)
    assert peak < PEAK_BYTES_BOUND


def test_cifar_file_larger_than_the_table_allows_is_refused(tmp_path, formats):
    path = formats.write_cifar_batch(tmp_path / "data_batch_1", formats.random_images(400, 3, 32, 0), np.zeros(400))
    images, _ = read_cifar_batch(path, "labels", 10, max_images=400)
    assert images.shape == (400, 3, 32, 32)
    with pytest.raises(DatasetError, match=r"larger than the [\d,]+ bytes a file of at most 100 CIFAR images"):
        read_cifar_batch(path, "labels", 10, max_images=100)
    # A file within the byte bound that holds more images than allowed is refused too.
    with pytest.raises(DatasetError, match=r"holds 400 images, more than the 390"):
        read_cifar_batch(path, "labels", 10, max_images=390)


def test_codecs_encode_is_limited_to_latin1(tmp_path):
    path = tmp_path / "batch"
    # _codecs.encode("eJwDAAAAAAE=", "base64"): any encoding other than Latin-1 is refused.
    path.write_bytes(b"c_codecs\nencode\n(Vabc\nVbase64\ntR.")
    with pytest.raises(DatasetError, match=r"only Latin-1 text is allowed"):
        safe_load_pickle(path)


def png_declaring(path, width: int, height: int) -> None:
    """A valid PNG signature and header declaring ``width`` x ``height``, with a tiny data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [20000, 9000])
def test_image_declaring_too_many_pixels_is_a_one_line_dataset_error(tmp_path, side):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "small.png")
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / "a" / "ok.png")
    png_declaring(tmp_path / "test" / "a" / "bomb.png", side, side)
    assert side * side > MAX_IMAGE_PIXELS
    with pytest.raises(DatasetError, match=rf"bomb\.png declares more than {MAX_IMAGE_PIXELS:,} pixels") as caught:
        load_dataset("folder", "test", data_dir=tmp_path)
    assert len(str(caught.value).splitlines()) == 1
    png_declaring(tmp_path / "train" / "a" / "bomb.png", side, side)
    with pytest.raises(DatasetError, match="decompression bomb"):
        dataset_info("folder", data_dir=tmp_path)
