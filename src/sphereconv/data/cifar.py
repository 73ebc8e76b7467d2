"""Reader for the CIFAR-10 / CIFAR-100 "python version" files (Liu et al. 2017, Sec. 5 experiments).

Each batch file is a pickled dict with ``b"data"``, a uint8 array of shape ``(N, 3072)`` holding
the 1024 red, then green, then blue values of each 32x32 image in row-major order, and the labels in
``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100) (format description at
https://www.cs.toronto.edu/~kriz/cifar.html).

Pickle can run arbitrary code while loading, so these files are read with :class:`SafeUnpickler`,
which resolves only the handful of globals a pickled numpy array needs and refuses everything else
with :class:`~sphereconv.errors.DatasetError`. The files are untrusted, so the work they can cause is
bounded by what the dataset table implies (at most ``max_images`` images of 3072 bytes per file):
the bytes read, the number of pickle opcodes, the memo indices (a 10-byte pickle can otherwise make
the unpickler allocate gigabytes) and the labels, which must be exactly one integer in
``[0, num_classes)`` per image (a nested structure of shared references never reaches numpy).
"""

from __future__ import annotations

import codecs
import io
import pickle
import pickletools
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import DatasetError, short_repr
from .checksums import read_at_most

# CIFAR images: 3 channels of 32x32 pixels stored as one row of 3072 bytes.
CIFAR_CHANNELS = 3
CIFAR_SIDE = 32
CIFAR_ROW_BYTES = CIFAR_CHANNELS * CIFAR_SIDE * CIFAR_SIDE
# Most images one batch file may hold when the caller gives no bound: 50000, the largest CIFAR
# split (CIFAR-100's train file).
MAX_CIFAR_IMAGES = 50000
# Bytes per image a batch file may hold besides the pixels (label, coarse label, file name: about 32
# in the published files), and bytes per file besides all images (batch label, dict, array header).
CIFAR_EXTRA_BYTES_PER_IMAGE = 256
CIFAR_EXTRA_BYTES_PER_FILE = 1 << 20
# Pickle opcodes per image a batch file may use (a label, a coarse label and a file name take two
# or three each), and per file besides (the dict, the array and its dtype).
CIFAR_OPCODES_PER_IMAGE = 16
CIFAR_OPCODES_PER_FILE = 1000
# Longest detail of a low-level error quoted in a message.
MAX_DETAIL_CHARS = 200
# Latin-1 is the only encoding a pickled numpy array or bytes object needs (_codecs.encode).
_LATIN1 = ("latin1", "latin-1", "iso-8859-1", "iso8859-1")
# Kinds of numpy dtype a dataset array may have: bool, signed and unsigned integers, floats, complex.
_PLAIN_DTYPE_KINDS = "biufc"
# Byte orders in the state of a pickled dtype (its second item, in every version of the format).
_BYTE_ORDERS = ("<", ">", "|", "=")
# Pickle opcodes that store the top of the stack in the memo under an index given in the stream.
_INDEXED_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")


def _numpy_core():
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return multiarray, numeric


def _encode_latin1(text: str, encoding: str = "latin1") -> bytes:
    """``codecs.encode`` restricted to Latin-1 text, the one use a pickled array or bytes object makes of it."""
    if not isinstance(text, str) or not isinstance(encoding, str) or encoding.lower() not in _LATIN1:
        raise pickle.UnpicklingError(
            f"_codecs.encode of {type(text).__name__} with encoding {short_repr(encoding)}; "
            "only Latin-1 text is allowed"
        )
    return codecs.encode(text, "latin1")


def _plain_dtype(descr: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """``numpy.dtype`` restricted to plain numbers (a type code such as ``"u1"``; ``align``/``copy`` ignored).

    Objects, records, sub-arrays and strings are refused: no dataset array needs them.
    """
    if isinstance(descr, bytes):  # a Python 2 pickle (the published CIFAR files) read with encoding="bytes"
        descr = descr.decode("latin1")
    try:
        dtype = np.dtype(descr) if isinstance(descr, str) else None
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype.kind not in _PLAIN_DTYPE_KINDS or dtype.subdtype is not None or dtype.names is not None:
        raise pickle.UnpicklingError(
            f"numpy dtype {short_repr(descr)}; only plain numbers ({_PLAIN_DTYPE_KINDS} kinds) are allowed"
        )
    return dtype


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickled dict of numpy arrays, lists, bytes and ints may reference."""
    multiarray, numeric = _numpy_core()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _plain_dtype,
        # Python 3 pickles bytes at protocol < 3 as _codecs.encode(str, "latin1"); it only encodes text.
        ("_codecs", "encode"): _encode_latin1,
    }
    # numpy 1.x pickles name numpy.core, numpy 2.x numpy._core; protocol 5 uses _frombuffer.
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class SafeUnpickler(pickle._Unpickler):
    """An unpickler that builds only builtin containers, numbers, strings/bytes and numpy arrays.

    Any other global (a function, a class, ``os.system``, ``builtins.eval``...) raises
    :class:`DatasetError` naming it, before anything is called. A dtype's pickled state is never
    passed to ``numpy.dtype.__setstate__``, which trusts it (a few changed bytes there made numpy
    crash the process with a segmentation fault); only its byte order is taken. This needs the
    Python implementation of the unpickler, whose opcodes can be overridden.
    """

    dispatch: ClassVar[dict[int, Callable[..., None]]] = dict(pickle._Unpickler.dispatch)
    stack: list[Any]  # the unpickler's working stack (set by pickle._Unpickler.load)

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

    def load_build(self) -> None:
        """BUILD: for a dtype, apply only the byte order of the state; anything else as pickle does."""
        if len(self.stack) >= 2 and isinstance(self.stack[-2], np.dtype):
            state = self.stack.pop()
            order = state[1] if isinstance(state, tuple) and len(state) >= 2 else None
            order = order.decode("latin1") if isinstance(order, bytes) else order  # Python 2 pickles
            if order not in _BYTE_ORDERS:
                raise pickle.UnpicklingError(f"numpy dtype state {short_repr(state)} has no plain byte order")
            self.stack[-1] = self.stack[-1].newbyteorder(order) if order in "<>" else self.stack[-1]
            return
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = load_build


def _check_opcodes(content: bytes, max_opcodes: int) -> None:
    """Walk the pickle's opcodes (nothing is built) and refuse work out of proportion to the file.

    More than ``max_opcodes`` opcodes, or a memo index beyond the number of opcodes seen (a
    pickler numbers its memo entries 0, 1, 2, ...; a huge index makes the unpickler allocate a
    memo table of that size), raise :class:`pickle.UnpicklingError`.
    """
    for count, (opcode, argument, _) in enumerate(pickletools.genops(content)):
        if count >= max_opcodes:
            raise pickle.UnpicklingError(
                f"more than {max_opcodes:,} pickle opcodes, more than the dataset's size needs"
            )
        if opcode.name in _INDEXED_MEMO_PUTS and (not isinstance(argument, int) or argument > count):
            raise pickle.UnpicklingError(
                f"memo index {short_repr(argument)} at opcode {count}, beyond the objects built so far"
            )


def safe_load_pickle(path: str | Path, max_images: int = MAX_CIFAR_IMAGES) -> Any:
    """Unpickle ``path`` with :class:`SafeUnpickler`; damaged files raise :class:`DatasetError`.

    The file may hold at most ``max_images`` CIFAR images: larger files, and pickles whose opcode
    count or memo indices exceed what that many images need, are refused before anything is built.
    """
    max_bytes = max_images * (CIFAR_ROW_BYTES + CIFAR_EXTRA_BYTES_PER_IMAGE) + CIFAR_EXTRA_BYTES_PER_FILE
    try:
        with open(path, "rb") as handle:
            content = read_at_most(handle, max_bytes + 1)
    except OSError as exc:
        raise DatasetError(f"cannot read dataset file {path}: {exc}") from exc
    if len(content) > max_bytes:
        raise DatasetError(
            f"{path} is larger than the {max_bytes:,} bytes a file of at most {max_images} CIFAR images takes; "
            "it is not a CIFAR batch file of this dataset: delete it and download it again"
        )
    try:
        _check_opcodes(content, max_images * CIFAR_OPCODES_PER_IMAGE + CIFAR_OPCODES_PER_FILE)
        return SafeUnpickler(io.BytesIO(content), source=path).load()
    except DatasetError:
        raise
    except Exception as exc:  # pickle raises many types for damaged input (EOFError, UnpicklingError, ValueError...)
        raise DatasetError(
            f"{path} is not a readable CIFAR pickle ({type(exc).__name__}: {str(exc)[:MAX_DETAIL_CHARS]}); "
            "the file is truncated or damaged: delete it and download it again"
        ) from exc


def _entry(batch: dict, key: str, path: str | Path) -> Any:
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    found = ", ".join(short_repr(k) for k in list(batch)[:10]) + (", ..." if len(batch) > 10 else "")
    raise DatasetError(f"{path} has no {key!r} entry (found {found}); it is not a CIFAR batch file of this dataset")


def _check_labels(labels: Any, count: int, num_classes: int, path: str | Path, label_key: str) -> np.ndarray:
    """``labels`` as int64 if it is exactly ``count`` integers in ``[0, num_classes)``, else DatasetError.

    Only a flat list/tuple of Python or numpy integers or a 1-d integer array is accepted; its
    length is checked before any element is looked at, so nested or shared structures cost nothing.
    """
    where = f"{path}: {label_key!r}"
    if isinstance(labels, np.ndarray):
        if labels.dtype.kind not in "iu" or labels.ndim != 1:
            raise DatasetError(
                f"{where} is a {labels.dtype} array of shape {labels.shape}, not a list of integers; "
                "the file is damaged: delete it and download it again"
            )
    elif not isinstance(labels, (list, tuple)):
        raise DatasetError(
            f"{where} is a {type(labels).__name__}, not a list of integers; the file is damaged: "
            "delete it and download it again"
        )
    if len(labels) != count:
        raise DatasetError(
            f"{path}: {count} images but {len(labels)} labels in {label_key!r}; the file is damaged: "
            "delete it and download it again"
        )
    if not isinstance(labels, np.ndarray):
        for index, value in enumerate(labels):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise DatasetError(
                    f"{where}[{index}] is {short_repr(value)}, not an integer class index; the file "
                    "is damaged: delete it and download it again"
                )
        low, high = (min(labels), max(labels)) if count else (0, 0)
    else:
        low, high = (int(labels.min()), int(labels.max())) if count else (0, 0)
    if count and (low < 0 or high >= num_classes):
        raise DatasetError(
            f"{path}: labels in {label_key!r} range over [{short_repr(low)}, {short_repr(high)}], expected "
            f"[0, {num_classes - 1}]; is this the right dataset?"
        )
    return np.asarray(labels, dtype=np.int64).reshape(count)


def read_cifar_batch(
    path: str | Path, label_key: str, num_classes: int, max_images: int = MAX_CIFAR_IMAGES
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR batch file into ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``.

    ``label_key`` is ``"labels"`` (CIFAR-10) or ``"fine_labels"`` (CIFAR-100); labels must be
    integers in ``[0, num_classes)``; the file may hold at most ``max_images`` images. Anything else
    raises :class:`DatasetError` naming the file.
    """
    batch = safe_load_pickle(path, max_images)
    if not isinstance(batch, dict):
        raise DatasetError(f"{path} holds a {type(batch).__name__}, not a CIFAR batch dict")
    data = _entry(batch, "data", path)
    labels = _entry(batch, label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_ROW_BYTES:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DatasetError(
            f"{path}: 'data' must be a uint8 array of shape (N, {CIFAR_ROW_BYTES}); got {dtype} {short_repr(shape)}; "
            "the file is damaged: delete it and download it again"
        )
    if data.shape[0] > max_images:
        raise DatasetError(f"{path} holds {data.shape[0]} images, more than the {max_images} of this dataset split")
    label_array = _check_labels(labels, data.shape[0], num_classes, path, label_key)
    images = data.reshape(-1, CIFAR_CHANNELS, CIFAR_SIDE, CIFAR_SIDE)
    return images, label_array


def read_cifar(
    paths: list[Path] | tuple[Path, ...], label_key: str, num_classes: int, max_images: int = MAX_CIFAR_IMAGES
) -> tuple[np.ndarray, np.ndarray]:
    """Read and concatenate several CIFAR batch files (e.g. ``data_batch_1`` ... ``data_batch_5``).

    ``max_images`` bounds the images of each file (the caller checks the total).
    """
    parts = [read_cifar_batch(path, label_key, num_classes, max_images) for path in paths]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return images, labels
