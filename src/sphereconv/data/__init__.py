"""Datasets and on-device loading for the experiments of Liu et al., "Deep Hyperspherical Learning"
(NIPS 2017, arXiv:1711.03189), Section 5.

- :func:`load_dataset` finds (or, when allowed, downloads), verifies and reads MNIST and
  Fashion-MNIST (IDX), CIFAR-10/100 (python pickles, read by a restricted unpickler) and folders of
  class-named image subfolders into uint8 CPU tensors.
- :class:`DeviceLoader` keeps them on the device and yields normalised, augmented batches with
  deterministic order, DDP sharding and exact resume.
"""

from .augment import AUGMENTATIONS, PAD_MODES, augment_batch
from .cifar import SafeUnpickler, read_cifar, read_cifar_batch, safe_load_pickle
from .datasets import dataset_info, load_dataset
from .discovery import DATA_DIR_ENV, find_split_files, search_roots, user_cache_dir
from .download import MIRROR_ENV, download_dataset, download_file, extract_tar
from .idx import parse_idx, read_idx
from .image_folder import list_image_folder, load_image_folder
from .loader import PIXEL_CENTER, PIXEL_SCALE, DeviceLoader, normalize_pixels, subset
from .registry import DATASETS, SPLITS, DatasetInfo, DatasetSpec, RemoteFile, canonical_name, list_datasets

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "DATA_DIR_ENV",
    "DatasetInfo",
    "DatasetSpec",
    "DeviceLoader",
    "MIRROR_ENV",
    "PAD_MODES",
    "PIXEL_CENTER",
    "PIXEL_SCALE",
    "RemoteFile",
    "SPLITS",
    "SafeUnpickler",
    "augment_batch",
    "canonical_name",
    "dataset_info",
    "download_dataset",
    "download_file",
    "extract_tar",
    "find_split_files",
    "list_datasets",
    "list_image_folder",
    "load_dataset",
    "load_image_folder",
    "normalize_pixels",
    "parse_idx",
    "read_cifar",
    "read_cifar_batch",
    "read_idx",
    "safe_load_pickle",
    "search_roots",
    "subset",
    "user_cache_dir",
]
