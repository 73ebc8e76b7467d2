"""Reader for a folder of class-named image subfolders (any small image classification dataset).

Two layouts are accepted:

- split: ``root/train/<class>/<image>`` and ``root/test/<class>/<image>`` (``val/`` is accepted
  for ``test/``). The classes are the subfolders of ``train/``; a test class that has no train
  folder is an error.
- flat: ``root/<class>/<image>``. Each image goes to the test split when a hash of
  ``"<class>/<file name>"`` falls in the lowest ``FLAT_TEST_FRACTION`` (20%) of the hash range, else
  to train. The rule depends only on the names, so adding images never moves existing ones between
  splits, and every run and machine sees the same split.

A class folder (of ``train/`` in the split layout) without one image of these formats is an error:
it would become a class the model never trains; so is, in the flat layout, a class all of whose
images fall into the test split (a class of one or two images may).

Labels are the indices of the sorted class names. Images with the extensions in
``IMAGE_EXTENSIONS`` are read with Pillow (an optional dependency: ``pip install pillow`` or the
``images`` extra) and converted to RGB (``channels=3``) or greyscale (``channels=1``), 16-bit
greyscale scaled to 8 bits (its high byte). A photo whose
EXIF orientation tag says it is stored rotated or mirrored (as phone cameras write them) is turned
upright first, as image viewers show it; sizes below are those of the upright image.

Sizes: the network needs one input size. With ``image_size`` given (an int for square images or
``(height, width)``; the ``image_size`` config key and ``--image-size`` flag) every image is resized
to it (bilinear) as it is read. Without it, the size comes from the headers of the train split: if
all its images share one size of at most ``MAX_NATIVE_SIDE`` pixels a side, that size is kept;
otherwise (photos of mixed or large sizes) every image is resized to ``DEFAULT_FOLDER_IMAGE_SIZE``
square and a warning says so and names the flag. Files are untrusted: an image whose header
declares more than ``MAX_IMAGE_PIXELS`` pixels (a "decompression bomb") is refused with a
:class:`~sphereconv.errors.DatasetError` before it is decoded. All images are held in memory, so
this is meant for datasets that fit in it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import warnings
from pathlib import Path

import numpy as np

from ..errors import DatasetError, short_repr
from .registry import FOLDER, DatasetInfo, check_split

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
# Share of each class that the flat layout puts into the test split (a common 80/20 hold-out).
FLAT_TEST_FRACTION = 0.2
# Folder names of each split in the split layout, in order of preference.
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val")}
# Pillow image modes for the supported channel counts.
CHANNEL_MODES = {1: "L", 3: "RGB"}
# The EXIF Orientation tag (TIFF/EXIF 2.3, tag 0x0112) and, for each of its values other than 1
# (upright), the Pillow transpose that shows the image upright: 2 mirrored, 3 rotated 180 degrees,
# 4 flipped, 5-8 the four with width and height exchanged.
EXIF_ORIENTATION_TAG = 0x0112
# The start of Pillow's warnings about a damaged EXIF block (JpegImagePlugin and TiffImagePlugin).
DAMAGED_EXIF_WARNINGS = "(Corrupt EXIF data|Truncated File Read)"
_UPRIGHT = {
    2: "FLIP_LEFT_RIGHT",
    3: "ROTATE_180",
    4: "FLIP_TOP_BOTTOM",
    5: "TRANSPOSE",
    6: "ROTATE_270",
    7: "TRANSVERSE",
    8: "ROTATE_90",
}
_SIDES_EXCHANGED = frozenset((5, 6, 7, 8))
# Most class names quoted in one error message.
MAX_NAMED_CLASSES = 5
# Bits of the name hash used to place an image in the flat layout's split.
_HASH_BITS = 32
# Side to which images of mixed or large sizes are resized when image_size is not given: 32, the
# CIFAR image size the models of Liu et al. 2017 (Sec. 5) are built for.
DEFAULT_FOLDER_IMAGE_SIZE = 32
# Largest side of images kept at their own size when image_size is not given; larger ones (photos)
# would make the first fully connected layer, which grows with the image area, too large.
MAX_NATIVE_SIDE = 64
# Largest image_size accepted: the models are CIFAR-scale networks; 512 already gives their fully
# connected layer 256 times the positions of a 32x32 input.
MAX_IMAGE_SIZE = 512
# Most pixels an image file may declare: 8192x8192 (64 MP), above the 48 MP of current phone
# cameras; a few hundred bytes of PNG can declare 20000x20000 and decode to gigabytes.
MAX_IMAGE_PIXELS = 8192 * 8192

logger = logging.getLogger(__name__)
# Folders (and the size chosen for them) whose automatic resize was announced in this process.
_announced: set[tuple[str, tuple[int, int]]] = set()


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
        p
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def flat_split_of(class_name: str, file_name: str) -> str:
    """The split (``train``/``test``) the flat layout assigns to ``<class_name>/<file_name>``."""
    # surrogateescape: a name that is not UTF-8 (a legacy zip) hashes its raw bytes; UTF-8 names are unchanged.
    digest = hashlib.sha256(f"{class_name}/{file_name}".encode("utf-8", "surrogateescape")).digest()
    position = int.from_bytes(digest[: _HASH_BITS // 8], "big") / 2**_HASH_BITS
    return "test" if position < FLAT_TEST_FRACTION else "train"


def _check_root(root: str | os.PathLike | None) -> Path:
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


def _class_images(root: Path, class_root: Path) -> dict[str, list[Path]]:
    """The images of each class folder of ``class_root``, by class name, listed once. A class folder
    without one readable image (say, only .gif or .webp files) would still become a class, an output
    the model never trains: it is refused, naming the folders and the extensions read."""
    images = {d.name: _images_in(d) for d in _subdirs(class_root)}
    if not images:
        raise DatasetError(
            f"image folder {root} has no class subfolders; expected root/<class>/<image> or root/train/<class>/<image>"
        )
    empty = [name for name, paths in images.items() if not paths]
    if empty:
        raise DatasetError(
            f"image folder {class_root} has class folders without images ({', '.join(IMAGE_EXTENSIONS)}): "
            f"{_name_classes(empty)}; add images, convert them to one of these formats, or remove the folders"
        )
    return images


def _name_classes(names: list[str]) -> str:
    """The first MAX_NAMED_CLASSES of ``names``, quoted, and how many more there are."""
    shown = ", ".join(repr(name) for name in names[:MAX_NAMED_CLASSES])
    return shown + (f" and {len(names) - MAX_NAMED_CLASSES} more" if len(names) > MAX_NAMED_CLASSES else "")


def list_image_folder(root: str | os.PathLike | None, split: str) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """The class names and the ``(path, label)`` pairs of ``split``, in a fixed order.

    See the module docstring for the layouts and the split rule.
    """
    check_split(split)
    root = _check_root(root)
    train_dir = _split_dir(root, "train")
    if train_dir is not None:
        split_dir = _split_dir(root, split)
        if split_dir is None:
            raise DatasetError(
                f"image folder {root} has a train/ folder but no {' or '.join(d + '/' for d in SPLIT_DIRS[split])} "
                "folder; add one, or use the flat layout root/<class>/<image>"
            )
        train_images = _class_images(root, train_dir)
        classes = tuple(train_images)
        label_of = {name: i for i, name in enumerate(classes)}
        items = []
        for class_dir in _subdirs(split_dir):
            if class_dir.name not in label_of:
                raise DatasetError(
                    f"{class_dir} is a class folder that {train_dir} does not have; train classes: {', '.join(classes)}"
                )
            paths = train_images[class_dir.name] if split_dir == train_dir else _images_in(class_dir)
            items += [(p, label_of[class_dir.name]) for p in paths]
    else:
        class_images = _class_images(root, root)
        classes = tuple(class_images)
        splits = {name: [flat_split_of(name, p.name) for p in paths] for name, paths in class_images.items()}
        # A class whose every file name hashes into the test split would be an output never trained.
        untrained = [name for name, of_class in splits.items() if "train" not in of_class]
        if untrained:
            raise DatasetError(
                f"image folder {root}: every image of class {_name_classes(untrained)} falls into the test split "
                f"(the flat layout holds out {FLAT_TEST_FRACTION:.0%} of each class by a hash of the file names), "
                "so the model would never train on it; add images, or use root/train/<class>/ and root/test/<class>/"
            )
        items = [
            (p, label)
            for label, (name, paths) in enumerate(class_images.items())
            for p, of_image in zip(paths, splits[name])
            if of_image == split
        ]
    if not items:
        raise DatasetError(f"image folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)}) for split {split!r}")
    return classes, items


def _target_size(image_size: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    sides = [image_size] if isinstance(image_size, int) and not isinstance(image_size, bool) else image_size
    if (
        isinstance(sides, (tuple, list))
        and len(sides) in (1, 2)
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_IMAGE_SIZE for v in sides)
    ):
        return (int(sides[0]), int(sides[-1]))
    raise ValueError(
        f"image_size must be None, an int in [1, {MAX_IMAGE_SIZE}] or (height, width) of such ints; "
        f"got {short_repr(image_size)}"
    )


def _check_channels(channels: int) -> str:
    if channels not in CHANNEL_MODES:
        raise ValueError(f"channels must be one of {sorted(CHANNEL_MODES)}; got {channels!r}")
    return CHANNEL_MODES[channels]


def _open(image_module, path: Path):
    """Open ``path`` reading only its header; refuse it if it declares more than MAX_IMAGE_PIXELS."""
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning is superseded by the limit below, which is lower.
            warnings.simplefilter("ignore", image_module.DecompressionBombWarning)
            # A JPEG's damaged EXIF block: Pillow warns while parsing it at open; such an image is
            # read as stored (see _orientation), and damaged pixel data still fails in _read.
            warnings.filterwarnings("ignore", message=DAMAGED_EXIF_WARNINGS, category=UserWarning)
            image = image_module.open(path)
    except image_module.DecompressionBombError:
        image = None
    except (OSError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise DatasetError(f"cannot read image {path}: {exc}; remove or replace the file") from exc
    if image is None or image.width * image.height > MAX_IMAGE_PIXELS:
        size = "" if image is None else f" ({image.width}x{image.height})"
        if image is not None:
            image.close()
        raise DatasetError(
            f"image {path} declares more than {MAX_IMAGE_PIXELS:,} pixels{size}, the limit for one image "
            "(a larger one may be a decompression bomb); shrink or remove the file"
        )
    return image


def _orientation(image) -> int:
    """The EXIF orientation of an opened image (1, upright, when it has none or an invalid one)."""
    try:
        with warnings.catch_warnings():  # Pillow warns about each damaged tag; the pixels are still read
            warnings.simplefilter("ignore")
            value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except (OSError, ValueError, SyntaxError, struct.error):  # a damaged EXIF block: read the pixels as stored
        return 1
    return value if value in _UPRIGHT else 1


def _upright_size(image) -> tuple[int, int]:
    """``(height, width)`` of an opened image as shown upright (see :func:`_orientation`)."""
    if _orientation(image) in _SIDES_EXCHANGED:
        return image.width, image.height
    return image.height, image.width


def _read(image_module, path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """The pixels of ``path`` in ``mode``, turned upright (EXIF orientation) and resized to ``size`` =
    (height, width) if needed, as HWC uint8."""
    height, width = size
    with _open(image_module, path) as image:
        try:
            orientation = _orientation(image)
            stored = (width, height) if orientation in _SIDES_EXCHANGED else (height, width)
            if (image.height, image.width) != stored:
                # JPEG: decode at a reduced scale, much faster for photos (the scale of the stored image)
                image.draft(mode, (stored[1], stored[0]))
            if image.mode.startswith("I"):
                # 16-bit greyscale (PNG): Pillow's conversion to 8 bits clips at 255 instead of scaling.
                image = image_module.fromarray((np.asarray(image).clip(0, 65535) >> 8).astype(np.uint8))
            image = image.convert(mode)
            if orientation in _UPRIGHT:
                image = image.transpose(getattr(image_module.Transpose, _UPRIGHT[orientation]))
            if (image.height, image.width) != size:
                image = image.resize((width, height), image_module.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8).reshape(height, width, len(mode))
        except (OSError, ValueError, SyntaxError) as exc:  # damaged data after a valid header
            raise DatasetError(f"cannot read image {path}: {exc}; remove or replace the file") from exc


def folder_image_size(
    root: str | os.PathLike | None, image_size: int | tuple[int, int] | None = None, *, announce: bool = False
) -> tuple[int, int]:
    """``(height, width)`` at which every image of the folder is read (see the module docstring).

    ``image_size`` given: that size. Otherwise the one size of the train split's images if they
    share one no larger than MAX_NATIVE_SIDE, else DEFAULT_FOLDER_IMAGE_SIZE square (logged as a
    warning naming the flag when ``announce``, once per folder and process). Reads only the image
    headers.
    """
    size = _target_size(image_size)
    if size is not None:
        return size
    image_module = _require_pillow()
    _, items = list_image_folder(root, "train")
    sizes = set()
    for path, _ in items:
        with _open(image_module, path) as image:
            sizes.add(_upright_size(image))
    if len(sizes) == 1 and max(next(iter(sizes))) <= MAX_NATIVE_SIDE:
        return sizes.pop()
    size = (DEFAULT_FOLDER_IMAGE_SIZE, DEFAULT_FOLDER_IMAGE_SIZE)
    if announce and (str(root), size) not in _announced:
        _announced.add((str(root), size))
        height, width = max(sizes, key=lambda hw: hw[0] * hw[1])
        if len(sizes) > 1:
            found = f"{len(sizes)} different sizes, up to {width}x{height}"
        else:
            found = f"{width}x{height} pixels, more than {MAX_NATIVE_SIDE} a side"
        logger.warning(
            "image folder %s: its train images have %s; resizing every image to %dx%d (choose another "
            "size with --image-size / the image_size config key)",
            root,
            found,
            size[1],
            size[0],
        )
    return size


def load_image_folder(
    root: str | os.PathLike | None,
    split: str,
    *,
    image_size: int | tuple[int, int] | None = None,
    channels: int = 3,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read ``split`` of an image folder into ``(images uint8 (N, C, H, W), labels int64 (N,), class names)``.

    Every image is read at :func:`folder_image_size` (resized where it differs).
    """
    mode = _check_channels(channels)
    _target_size(image_size)
    image_module = _require_pillow()
    classes, items = list_image_folder(root, split)
    height, width = folder_image_size(root, image_size)
    images = np.empty((len(items), height, width, channels), dtype=np.uint8)
    labels = np.empty(len(items), dtype=np.int64)
    for i, (path, label) in enumerate(items):
        images[i] = _read(image_module, path, mode, (height, width))
        labels[i] = label
    return images.transpose(0, 3, 1, 2).copy(), labels, classes


def image_folder_info(
    root: str | os.PathLike | None, *, image_size: int | tuple[int, int] | None = None, channels: int = 3
) -> DatasetInfo:
    """The :class:`DatasetInfo` of an image folder.

    Its classes come from the train split, its size from :func:`folder_image_size`.
    """
    _check_channels(channels)
    _target_size(image_size)
    classes, _ = list_image_folder(root, "train")
    size = folder_image_size(root, image_size, announce=True)
    reported = size[0] if size[0] == size[1] else size
    return DatasetInfo(FOLDER, len(classes), channels, reported, classes)
