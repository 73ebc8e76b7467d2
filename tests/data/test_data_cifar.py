"""CIFAR-10/100 python-pickle readers on small generated files in the genuine format, and the safe unpickler."""

from __future__ import annotations

import dataclasses
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from sphereconv.data import load_dataset
from sphereconv.data.cifar import read_cifar_batch, safe_load_pickle
from sphereconv.data.registry import DATASETS
from sphereconv.errors import DatasetError

TRAIN_PER_BATCH = 3
TEST_COUNT = 4


@pytest.fixture
def small_cifar(monkeypatch):
    for name in ("cifar10", "cifar100"):
        spec = dataclasses.replace(DATASETS[name], split_counts={"train": 5 * TRAIN_PER_BATCH, "test": TEST_COUNT})
        monkeypatch.setitem(DATASETS, name, spec)


def write_cifar10(root, formats, protocol=2):
    directory = root / "cifar-10-batches-py"
    rng = np.random.default_rng(0)
    parts = []
    for i in range(1, 6):
        images, labels = formats.random_images(TRAIN_PER_BATCH, 3, 32, seed=i), rng.integers(0, 10, TRAIN_PER_BATCH)
        formats.write_cifar_batch(directory / f"data_batch_{i}", images, labels, protocol=protocol)
        parts.append((images, labels))
    test = formats.random_images(TEST_COUNT, 3, 32, seed=9), rng.integers(0, 10, TEST_COUNT)
    formats.write_cifar_batch(directory / "test_batch", *test, protocol=protocol)
    train = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return directory, train, test


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_batches_concatenate_in_order(tmp_path, formats, small_cifar, protocol):
    _, (train_x, train_y), (test_x, test_y) = write_cifar10(tmp_path, formats, protocol)
    x, y = load_dataset("cifar10", "train", data_dir=tmp_path)
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(train_x)) and y.tolist() == train_y.tolist()
    x, y = load_dataset("cifar-10", "test", data_dir=tmp_path / "cifar-10-batches-py")
    assert torch.equal(x, torch.from_numpy(test_x)) and y.tolist() == test_y.tolist()


def test_cifar_row_layout_is_red_green_blue_planes(tmp_path):
    row = np.zeros((1, 3072), np.uint8)
    row[0, :1024] = 10  # red plane
    row[0, 1024:2048] = 20  # green plane
    row[0, 2048 + 33] = 255  # blue, row 1, column 1
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": row, b"labels": [3]}, protocol=2))
    images, labels = read_cifar_batch(path, "labels", 10)
    assert images.shape == (1, 3, 32, 32) and labels.tolist() == [3]
    assert (images[0, 0] == 10).all() and (images[0, 1] == 20).all()
    assert images[0, 2, 1, 1] == 255 and images[0, 2].sum() == 255


def test_cifar100_uses_fine_labels(tmp_path, formats, small_cifar):
    directory = tmp_path / "cifar-100-python"
    fine = np.array([99, 0, 42, 57])
    formats.write_cifar_batch(directory / "test", formats.random_images(4, 3, 32, 1), fine, label_key=b"fine_labels")
    _, y = load_dataset("cifar100", "test", data_dir=tmp_path)
    assert y.tolist() == fine.tolist()


def test_truncated_pickle_raises_naming_the_file(tmp_path, formats, small_cifar):
    directory, _, _ = write_cifar10(tmp_path, formats)
    batch = directory / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:2000])
    with pytest.raises(DatasetError, match=r"data_batch_3 is not a readable CIFAR pickle.*truncated or damaged"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


def test_corrupted_cifar_contents_are_rejected(tmp_path, small_cifar):
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    cases = {
        "wrong row size": ({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}, r"shape \(N, 3072\)"),
        "labels missing": ({b"data": np.zeros((4, 3072), np.uint8)}, r"no 'labels' entry"),
        "label count": ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, r"4 images but 3 labels"),
        "label range": ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, r"range over \[0, 10\]"),
        "not a dict": ([1, 2, 3], r"holds a list, not a CIFAR batch dict"),
    }
    for content, message in cases.values():
        (directory / "test_batch").write_bytes(pickle.dumps(content, protocol=2))
        with pytest.raises(DatasetError, match=message):
            load_dataset("cifar10", "test", data_dir=tmp_path)


def test_incomplete_cifar_split_is_rejected(tmp_path, formats):
    # Real expected size: 10000 test images; a 4-image test_batch is incomplete.
    directory = tmp_path / "cifar-10-batches-py"
    formats.write_cifar_batch(directory / "test_batch", formats.random_images(4, 3, 32, 2), np.zeros(4))
    with pytest.raises(DatasetError, match=r"holds 4 images, expected 10000"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


class _RunsCommand:
    """Pickles into a call of os.system: what a hostile "dataset" file would contain."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_carrying_code_is_refused_before_running_it(tmp_path):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "data_batch_1"
    hostile.write_bytes(pickle.dumps({b"data": _RunsCommand(marker), b"labels": [0]}, protocol=2))
    # Sanity check of the test itself: the plain unpickler would run the command.
    pickle.loads(hostile.read_bytes())
    assert marker.exists()
    marker.unlink()
    with pytest.raises(DatasetError, match=r"refused: the pickle references (posix|nt|os)\.system"):
        safe_load_pickle(hostile)
    assert not marker.exists()


@pytest.mark.parametrize("target", [("builtins", "eval"), ("subprocess", "Popen"), ("numpy", "load")])
def test_other_globals_are_refused(tmp_path, target):
    module, name = target
    path = tmp_path / "batch"
    # A protocol-0 pickle calling module.name('x'): GLOBAL, MARK, string, TUPLE, REDUCE.
    path.write_bytes(f"c{module}\n{name}\n(S'x'\ntR.".encode())
    with pytest.raises(DatasetError, match=rf"references {module}\.{name}"):
        safe_load_pickle(path)


class _DtypeWithState:
    """Pickles as ``numpy.dtype(descr)`` followed by BUILD with ``state``, as numpy writes a dtype."""

    def __init__(self, descr, state):
        self.descr, self.state = descr, state

    def __reduce__(self):
        return (np.dtype, (self.descr, False, True), self.state)


class _ArrayWithDtype:
    """Pickles as numpy writes an array (``_reconstruct`` then BUILD), with the given dtype object."""

    def __init__(self, dtype, rows: int):
        self.dtype, self.rows = dtype, rows

    def __reduce__(self):
        state = (1, (self.rows, 3072), self.dtype, False, bytes(range(256)) * (self.rows * 12))
        return (_numpy_reconstruct(), (np.ndarray, (0,), b"b"), state)


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def test_a_damaged_dtype_state_never_reaches_numpy(tmp_path):
    # Was a segmentation fault: numpy.dtype.__setstate__ trusts its state, and this one (a few bytes
    # changed in a uint8 array's dtype, found by mutating a genuine batch file) made numpy crash.
    path = tmp_path / "test_batch"
    data = _ArrayWithDtype(_DtypeWithState("u1", (3, "|", 20046, -1, -1, 0)), rows=2)
    path.write_bytes(pickle.dumps({b"data": data, b"labels": [0, 9]}, protocol=4))
    script = (
        "import sys, numpy as np\n"
        "from sphereconv.data.cifar import read_cifar_batch\n"
        "x, y = read_cifar_batch(sys.argv[1], 'labels', 10, 10)\n"
        "assert np.array_equal(x.reshape(2, -1), np.frombuffer(bytes(range(256)) * 24, np.uint8).reshape(2, -1))\n"
        "print('read', x.dtype, y.tolist())\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-500:]}"
    assert run.stdout.strip() == "read uint8 [0, 9]"


@pytest.mark.parametrize(
    "descr, state",
    [
        ("O", (3, "|", None, None, None, -1, -1, 63)),
        ("u1,u1", (3, "|", None, None, None, -1, -1, 0)),
        ("u1", (3, "?", None, None, None, -1, -1, 0)),
        ("u1", {"flags": 63}),
    ],
)
def test_dtypes_other_than_plain_numbers_are_refused(tmp_path, descr, state):
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": _ArrayWithDtype(_DtypeWithState(descr, state), 2)}, protocol=4))
    with pytest.raises(DatasetError, match=r"test_batch is not a readable CIFAR pickle .*numpy dtype"):
        safe_load_pickle(path)


def python2_cifar_pickle(rows: np.ndarray, labels: list[int]) -> bytes:
    """The bytes Python 2's cPickle wrote (protocol 2) for {'data': rows, 'labels': labels}, as in the
    published CIFAR files: every str (keys, dtype code, byte order, pixels) a BINSTRING."""

    def short(text: bytes) -> bytes:
        return b"U" + bytes([len(text)]) + text

    raw = rows.tobytes()
    dims = b"".join(b"J" + struct.pack("<i", d) for d in rows.shape)
    return b"".join(
        [
            b"\x80\x02}q\x00(" + short(b"data"),
            b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85" + short(b"b") + b"\x87R",
            b"(K\x01" + dims + b"\x86cnumpy\ndtype\nq\x03" + short(b"u1") + b"K\x00K\x01\x87R",
            b"(K\x03" + short(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",
            b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tb",
            short(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"eu.",
        ]
    )


def test_python2_pickles_like_the_published_files_still_load(tmp_path):
    rows = np.random.default_rng(3).integers(0, 256, (3, 3072), dtype=np.uint8)
    path = tmp_path / "data_batch_1"
    path.write_bytes(python2_cifar_pickle(rows, [1, 2, 9]))
    assert np.array_equal(pickle.loads(path.read_bytes(), encoding="bytes")[b"data"], rows)  # the format is right
    images, labels = read_cifar_batch(path, "labels", 10, 10)
    assert np.array_equal(images.reshape(3, -1), rows) and labels.tolist() == [1, 2, 9]
