"""Reader for a folder of class-named image subfolders (any small image classification dataset).

Two layouts are accepted:

- split: ``root/train/<class>/<image>`` and ``root/test/<class>/<image>`` (``val/`` is accepted
  for ``test/``). The classes are the subfolders of ``train/``; a test class that has no train
  folder is an error.
- flat: ``root/<class>/<image>``. Each image goes to the test split when a hash of
  ``"<class>/<file name>"`` falls in the lowest ``FLAT_TEST_FRACTION`` (20%) of the hash range, else
  to train. The rule depends only on the names, so adding images never moves existing ones between
  splits, and every run and machine sees the same split.

Labels are the indices of the sorted class names. Images with the extensions in
``IMAGE_EXTENSIONS`` are read with Pillow (an optional dependency: ``pip install pillow`` or the
``images`` extra) and converted to RGB (``channels=3``) or greyscale (``channels=1``). Sizes: with
``image_size=None`` every image must have the size of the first one (else a
:class:`~sphereconv.errors.DatasetError` names the odd file); with ``image_size`` given (an int for
square images or ``(height, width)``) every image is resized to it (bilinear). All images are held
in memory, so this is meant for datasets that fit in it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .registry import FOLDER, DatasetInfo, check_split

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
# Share of each class that the flat layout puts into the test split (a common 80/20 hold-out).
FLAT_TEST_FRACTION = 0.2
# Folder names of each split in the split layout, in order of preference.
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val")}
# Pillow image modes for the supported channel counts.
CHANNEL_MODES = {1: "L", 3: "RGB"}
# Bits of the name hash used to place an image in the flat layout's split.
_HASH_BITS = 32


def _require_pillow():
    try:
        from PIL import Image
    except ImportError as exc:
        raise DatasetError(
            "reading an image folder needs Pillow, which is not installed; install it with "
            "'pip install pillow' (or 'pip install sphereconv[images]')"
        ) from exc
    return Image


def _subdirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def flat_split_of(class_name: str, file_name: str) -> str:
    """The split (``train``/``test``) the flat layout assigns to ``<class_name>/<file_name>``."""
    digest = hashlib.sha256(f"{class_name}/{file_name}".encode()).digest()
    position = int.from_bytes(digest[: _HASH_BITS // 8], "big") / 2**_HASH_BITS
    return "test" if position < FLAT_TEST_FRACTION else "train"


def _check_root(root: str | Path | None) -> Path:
    if root is None:
        raise DatasetError("the 'folder' dataset needs data_dir (--data-dir) pointing at the image folder root")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"image folder {path} does not exist or is not a directory")
    return path


def _split_dir(root: Path, split: str) -> Path | None:
    for name in SPLIT_DIRS[split]:
        if (root / name).is_dir():
            return root / name
    return None


def list_image_folder(root: str | Path | None, split: str) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """The class names and the ``(path, label)`` pairs of ``split``, in a fixed order.

    See the module docstring for the layouts and the split rule.
    """
    check_split(split)
    root = _check_root(root)
    train_dir = _split_dir(root, "train")
    if train_dir is not None:
        classes = tuple(d.name for d in _subdirs(train_dir))
        split_dir = _split_dir(root, split)
        if split_dir is None:
            raise DatasetError(
                f"image folder {root} has a train/ folder but no {' or '.join(d + '/' for d in SPLIT_DIRS[split])} "
                "folder; add one, or use the flat layout root/<class>/<image>"
            )
        label_of = {name: i for i, name in enumerate(classes)}
        items = []
        for class_dir in _subdirs(split_dir):
            if class_dir.name not in label_of:
                raise DatasetError(
                    f"{class_dir} is a class folder that {train_dir} does not have; train classes: {', '.join(classes)}"
                )
            items += [(p, label_of[class_dir.name]) for p in _images_in(class_dir)]
    else:
        classes = tuple(d.name for d in _subdirs(root))
        items = [
            (p, label)
            for label, name in enumerate(classes)
            for p in _images_in(root / name)
            if flat_split_of(name, p.name) == split
        ]
    if not classes:
        raise DatasetError(f"image folder {root} has no class subfolders; expected root/<class>/<image> or root/train/<class>/<image>")
    if not items:
        raise DatasetError(
            f"image folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)}) for split {split!r}"
        )
    return classes, items


def _target_size(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool) and image_size > 0:
        return (image_size, image_size)
    if (isinstance(image_size, (tuple, list)) and len(image_size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size)):
        return (int(image_size[0]), int(image_size[1]))
    raise ValueError(f"image_size must be None, a positive int or (height, width); got {image_size!r}")


def _check_channels(channels: int) -> str:
    if channels not in CHANNEL_MODES:
        raise ValueError(f"channels must be one of {sorted(CHANNEL_MODES)}; got {channels!r}")
    return CHANNEL_MODES[channels]


def _open(image_module, path: Path, mode: str):
    try:
        with image_module.open(path) as image:
            return image.convert(mode)
    except (OSError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise DatasetError(f"cannot read image {path}: {exc}; remove or replace the file") from exc


def load_image_folder(
    root: str | Path | None,
    split: str,
    *,
    image_size: int | tuple[int, int] | None = None,
    channels: int = 3,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read ``split`` of an image folder into ``(images uint8 (N, C, H, W), labels int64 (N,), class names)``."""
    mode = _check_channels(channels)
    size = _target_size(image_size)
    image_module = _require_pillow()
    classes, items = list_image_folder(root, split)
    resample = image_module.Resampling.BILINEAR
    first = _open(image_module, items[0][0], mode)
    height, width = size if size is not None else (first.height, first.width)
    images = np.empty((len(items), height, width, channels), dtype=np.uint8)
    labels = np.empty(len(items), dtype=np.int64)
    for i, (path, label) in enumerate(items):
        image = first if i == 0 else _open(image_module, path, mode)
        if (image.height, image.width) != (height, width):
            if size is None:
                raise DatasetError(
                    f"image {path} is {image.width}x{image.height} but {items[0][0]} is {width}x{height}; "
                    "image folders need one size: pass image_size to resize every image"
                )
            image = image.resize((width, height), resample)
        images[i] = np.asarray(image, dtype=np.uint8).reshape(height, width, channels)
        labels[i] = label
    return images.transpose(0, 3, 1, 2).copy(), labels, classes


def image_folder_info(
    root: str | Path | None, *, image_size: int | tuple[int, int] | None = None, channels: int = 3
) -> DatasetInfo:
    """The :class:`DatasetInfo` of an image folder (classes from the train split, size from its first image)."""
    _check_channels(channels)
    size = _target_size(image_size)
    classes, items = list_image_folder(root, "train")
    if size is None:
        image_module = _require_pillow()
        first = _open(image_module, items[0][0], CHANNEL_MODES[channels])
        size = (first.height, first.width)
    reported = size[0] if size[0] == size[1] else size
    return DatasetInfo(FOLDER, len(classes), channels, reported, classes)
