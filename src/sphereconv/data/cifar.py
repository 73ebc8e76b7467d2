"""Reader for the CIFAR-10 / CIFAR-100 "python version" files (Liu et al. 2017, Sec. 5 experiments).

Each batch file is a pickled dict with ``b"data"``, a uint8 array of shape ``(N, 3072)`` holding
the 1024 red, then green, then blue values of each 32x32 image in row-major order, and the labels in
``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100) (format description at
https://www.cs.toronto.edu/~kriz/cifar.html).

Pickle can run arbitrary code while loading, so these files are read with :class:`SafeUnpickler`,
which resolves only the handful of globals a pickled numpy array needs and refuses everything else
with :class:`~sphereconv.errors.DatasetError`.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError

# CIFAR images: 3 channels of 32x32 pixels stored as one row of 3072 bytes.
CIFAR_CHANNELS = 3
CIFAR_SIDE = 32
CIFAR_ROW_BYTES = CIFAR_CHANNELS * CIFAR_SIDE * CIFAR_SIDE


def _numpy_core():
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return multiarray, numeric


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickled dict of numpy arrays, lists, bytes and ints may reference."""
    multiarray, numeric = _numpy_core()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 pickles bytes at protocol < 3 as _codecs.encode(str, "latin1"); it only encodes text.
        ("_codecs", "encode"): codecs.encode,
    }
    # numpy 1.x pickles name numpy.core, numpy 2.x numpy._core; protocol 5 uses _frombuffer.
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds only builtin containers, numbers, strings/bytes and numpy arrays.

    Any other global (a function, a class, ``os.system``, ``builtins.eval``...) raises
    :class:`DatasetError` naming it, before anything is called.
    """

    def __init__(self, file, *, source: str | Path = "<pickle>"):
        super().__init__(file, encoding="bytes")
        self.source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DatasetError(
                f"{self.source} refused: the pickle references {module}.{name}, which a dataset file never "
                f"needs (allowed: {', '.join(sorted(f'{m}.{n}' for m, n in self._allowed))}); it may carry code, "
                "do not load it"
            ) from None


def safe_load_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` with :class:`SafeUnpickler`; damaged files raise :class:`DatasetError`."""
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read dataset file {path}: {exc}") from exc
    try:
        return SafeUnpickler(io.BytesIO(content), source=path).load()
    except DatasetError:
        raise
    except Exception as exc:  # pickle raises many types for damaged input (EOFError, UnpicklingError, ValueError...)
        raise DatasetError(
            f"{path} is not a readable CIFAR pickle ({type(exc).__name__}: {exc}); the file is truncated or damaged: "
            "delete it and download it again"
        ) from exc


def _entry(batch: dict, key: str, path: str | Path) -> Any:
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    found = ", ".join(repr(k) for k in batch)
    raise DatasetError(f"{path} has no {key!r} entry (found {found}); it is not a CIFAR batch file of this dataset")


def read_cifar_batch(path: str | Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR batch file into ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``.

    ``label_key`` is ``"labels"`` (CIFAR-10) or ``"fine_labels"`` (CIFAR-100); labels must lie in
    ``[0, num_classes)``. Anything else raises :class:`DatasetError` naming the file.
    """
    batch = safe_load_pickle(path)
    if not isinstance(batch, dict):
        raise DatasetError(f"{path} holds a {type(batch).__name__}, not a CIFAR batch dict")
    data = _entry(batch, "data", path)
    labels = _entry(batch, label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_ROW_BYTES:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DatasetError(
            f"{path}: 'data' must be a uint8 array of shape (N, {CIFAR_ROW_BYTES}); got {dtype} {shape}; "
            "the file is damaged: delete it and download it again"
        )
    try:
        label_array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: {label_key!r} is not a list of integers ({exc})") from exc
    if label_array.shape != (data.shape[0],):
        raise DatasetError(
            f"{path}: {data.shape[0]} images but {label_array.size} labels in {label_key!r}; the file is damaged: "
            "delete it and download it again"
        )
    if label_array.size and (label_array.min() < 0 or label_array.max() >= num_classes):
        raise DatasetError(
            f"{path}: labels in {label_key!r} range over [{label_array.min()}, {label_array.max()}], expected "
            f"[0, {num_classes - 1}]; is this the right dataset?"
        )
    images = data.reshape(-1, CIFAR_CHANNELS, CIFAR_SIDE, CIFAR_SIDE)
    return images, label_array


def read_cifar(paths: list[Path] | tuple[Path, ...], label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and concatenate several CIFAR batch files (e.g. ``data_batch_1`` ... ``data_batch_5``)."""
    parts = [read_cifar_batch(p, label_key, num_classes) for p in paths]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return images, labels
