"""Datasets and on-device loading for the experiments of Liu et al., "Deep Hyperspherical Learning"
(NIPS 2017, arXiv:1711.03189), Section 5.

- :func:`load_dataset` finds (or, when allowed, downloads), verifies and reads MNIST and
  Fashion-MNIST (IDX), CIFAR-10/100 (python pickles, read by a restricted unpickler) and folders of
  class-named image subfolders into uint8 CPU tensors.
- :class:`DeviceLoader` keeps them on the device and yields normalised, augmented batches with
  deterministic order, DDP sharding and exact resume.
"""

from .augment import AUGMENTATIONS, augment_batch
from .datasets import dataset_info, load_dataset
from .discovery import DATA_DIR_ENV, user_cache_dir
from .download import MIRROR_ENV, download_dataset
from .loader import DeviceLoader, normalize_pixels, subset
from .registry import DatasetInfo, list_datasets

__all__ = [
    "load_dataset",
    "dataset_info",
    "list_datasets",
    "DatasetInfo",
    "DeviceLoader",
    "normalize_pixels",
    "subset",
    "AUGMENTATIONS",
    "augment_batch",
    "download_dataset",
    "user_cache_dir",
    "DATA_DIR_ENV",
    "MIRROR_ENV",
]
