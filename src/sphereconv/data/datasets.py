"""Loading a dataset split into CPU tensors: discovery, optional download, verification, reading.

The datasets are those of the experiments of Liu et al., "Deep Hyperspherical Learning" (NIPS 2017,
arXiv:1711.03189), Section 5, plus Fashion-MNIST and arbitrary image folders. The steps are:

1. find the split's files (:mod:`.discovery`); if they are missing and ``download=True``, fetch
   them into ``data_dir`` or the user cache (:mod:`.download`) and look again;
2. verify them: SHA-256 of the decompressed content where known (Fashion-MNIST), and for every
   dataset the structure (magic numbers, shapes, image counts, label range). MNIST and
   Fashion-MNIST share file names and structure, so a file is also refused when its content is
   another dataset's (a search root holding only Fashion-MNIST must not serve MNIST);
3. return ``(images uint8 (N, C, H, W), labels int64 (N,))`` on the CPU.

Anything missing, truncated or failing a check raises :class:`~sphereconv.errors.DatasetError`
with a message saying what to do; nothing is silently used.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DatasetError, short_repr
from .checksums import sha256_hex, verify_content
from .cifar import read_cifar
from .discovery import DATA_DIR_ENV, SearchResult, download_root, find_split_files
from .download import MIRROR_ENV, base_urls, download_dataset
from .idx import IDX_DIM_BYTES, IDX_MAGIC_BYTES, parse_idx, read_idx_content
from .image_folder import image_folder_info, load_image_folder
from .registry import DATASETS, FOLDER, DatasetInfo, DatasetSpec, canonical_name, check_split, get_spec


def dataset_info(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int | tuple[int, int] | None = None,
    channels: int = 3,
) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``.

    For ``folder`` the classes and image size are read from ``data_dir`` (``image_size`` and
    ``channels`` as in :func:`load_dataset`); the other datasets need no files.
    """
    key = canonical_name(name)
    if key == FOLDER:
        return image_folder_info(data_dir, image_size=image_size, channels=channels)
    return _check_fixed_size(get_spec(key), image_size).info


def _check_fixed_size(spec: DatasetSpec, image_size: int | tuple[int, int] | None) -> DatasetSpec:
    """Refuse an ``image_size`` other than the native size of a dataset that is not an image folder."""
    side = spec.info.image_size
    if image_size is not None and image_size not in (side, (side, side), [side, side]):
        raise DatasetError(
            f"image_size={short_repr(image_size)} applies to image folders (dataset 'folder'); {spec.info.name} "
            f"images are {side}x{side}: leave image_size (--image-size) unset"
        )
    return spec


def _missing_message(key: str, spec: DatasetSpec, split: str, search: SearchResult, data_dir) -> str:
    needed = ", ".join(f"{f}[.gz]" if spec.reader == "idx" else f for f in spec.split_files[split])
    fixes = []
    if spec.system_package:
        fixes.append(f"install the Debian package (sudo apt install {spec.system_package})")
    sources = ", ".join(base_urls(spec, None))
    fixes.append(
        f"pass --download (download=True) to fetch it from {sources} into {download_root(data_dir)} "
        f"(set ${MIRROR_ENV} to use another mirror)"
    )
    fixes.append(f"or point --data-dir (or ${DATA_DIR_ENV}) at a directory holding {needed}")
    return f"dataset {key!r} (split {split!r}) not found: {search.describe_roots(spec)}. To fix: {'; '.join(fixes)}"


def _refuse_other_datasets_content(spec: DatasetSpec, path: Path, content: bytes) -> None:
    """Raise :class:`DatasetError` if ``content`` is a file of another dataset (its known content checksum).

    Needed where ``spec`` has no checksum of its own: MNIST's files have the names, header and
    shapes of Fashion-MNIST's, so only the content tells them apart.
    """
    others = {
        digest: other.info.name
        for other in DATASETS.values()
        if other.info.name != spec.info.name
        for digest in other.content_sha256.values()
    }
    owner = others.get(sha256_hex(content)) if others else None
    if owner is not None:
        raise DatasetError(
            f"{path} is a file of {owner}, not of {spec.info.name} (its decompressed content has {owner}'s "
            f"SHA-256); point --data-dir (or ${DATA_DIR_ENV}) at a directory holding {spec.info.name}'s own files "
            f"(a {spec.layouts[0]}/ subfolder of a search root is searched before the root itself)"
        )


def _read_idx_split(spec: DatasetSpec, split: str, files: dict) -> tuple[np.ndarray, np.ndarray]:
    image_name, label_name = spec.split_files[split]
    count, side = spec.split_counts[split], spec.info.image_size
    assert isinstance(side, int), "IDX datasets hold square images"
    # The content the dataset table implies: a 3-d header and count images of side x side bytes; a
    # 1-d header and count labels of one byte. Nothing longer is read.
    max_bytes = {
        image_name: IDX_MAGIC_BYTES + 3 * IDX_DIM_BYTES + count * side * side,
        label_name: IDX_MAGIC_BYTES + IDX_DIM_BYTES + count,
    }
    arrays = {}
    for name in (image_name, label_name):
        content = read_idx_content(files[name], max_bytes[name])
        expected = spec.content_sha256.get(name)
        if expected is None:
            _refuse_other_datasets_content(spec, files[name], content)
        verify_content(files[name], content, expected)
        arrays[name] = parse_idx(content, files[name])
    images, labels = arrays[image_name], arrays[label_name]
    if images.shape != (count, side, side) or images.dtype != np.uint8:
        raise DatasetError(
            f"{files[image_name]} holds {images.dtype} images of shape {images.shape}, expected uint8 "
            f"{(count, side, side)} for the {split} split of {spec.info.name}; it is incomplete or another "
            "dataset's file: delete it and download it again"
        )
    if labels.shape != (count,):
        raise DatasetError(
            f"{files[label_name]} holds labels of shape {labels.shape}, expected ({count},); it is incomplete "
            "or another dataset's file: delete it and download it again"
        )
    if labels.min() < 0 or labels.max() >= spec.info.num_classes:
        raise DatasetError(
            f"{files[label_name]}: labels range over [{labels.min()}, {labels.max()}], expected "
            f"[0, {spec.info.num_classes - 1}]"
        )
    return images[:, None], labels.astype(np.int64)


def _read_cifar_split(spec: DatasetSpec, split: str, files: dict) -> tuple[np.ndarray, np.ndarray]:
    paths = [files[name] for name in spec.split_files[split]]
    count = spec.split_counts[split]
    images, labels = read_cifar(paths, spec.label_key, spec.info.num_classes, max_images=count)
    if images.shape[0] != count:
        raise DatasetError(
            f"the {split} split of {spec.info.name} in {paths[0].parent} holds {images.shape[0]} images, expected "
            f"{count}; the files are incomplete: delete the directory and download it again"
        )
    return images, labels


_READERS = {"idx": _read_idx_split, "cifar": _read_cifar_split}


def load_dataset(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    *,
    mirror: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    channels: int = 3,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Load ``split`` (``train`` or ``test``) of dataset ``name`` as CPU tensors.

    Returns ``(images, labels)``: uint8 ``(N, C, H, W)`` and int64 ``(N,)``. ``name`` is one of
    :func:`~sphereconv.data.list_datasets`; for ``folder``, ``data_dir`` is the folder root and
    ``image_size``/``channels`` apply (see :mod:`.image_folder`). ``download=True`` fetches missing
    files (from ``mirror`` if given) into ``data_dir`` or the user cache.
    """
    key = canonical_name(name)
    check_split(split)
    if key == FOLDER:
        images, labels, _ = load_image_folder(data_dir, split, image_size=image_size, channels=channels)
        return torch.from_numpy(images), torch.from_numpy(labels)
    spec = _check_fixed_size(get_spec(key), image_size)
    search = find_split_files(spec, split, data_dir)
    if search.files is None and download:
        download_dataset(spec, download_root(data_dir), mirror=mirror, progress=progress)
        search = find_split_files(spec, split, data_dir)
    if search.files is None:
        raise DatasetError(_missing_message(key, spec, split, search, data_dir))
    images, labels = _READERS[spec.reader](spec, split, search.files)
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)
