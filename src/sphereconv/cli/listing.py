"""``sphereconv list-models`` and ``sphereconv list-datasets``."""

from __future__ import annotations

import argparse

from ..errors import SphereconvError


def register(subparsers) -> None:
    """Add the ``list-models`` and ``list-datasets`` subcommands to ``subparsers``."""
    models = subparsers.add_parser("list-models", description="List the registered model names.")
    models.set_defaults(func=run_list_models)
    datasets = subparsers.add_parser("list-datasets", description="List the supported datasets.")
    datasets.set_defaults(func=run_list_datasets)


def run_list_models(args: argparse.Namespace) -> int:
    """Print one registered model name per line."""
    from ..models import list_models

    for name in list_models():
        print(name)
    return 0


def _image_size(size) -> str:
    return f"{size}x{size}" if isinstance(size, int) else "x".join(str(s) for s in size)


def run_list_datasets(args: argparse.Namespace) -> int:
    """Print each dataset with its classes, channels and image size."""
    from ..data import dataset_info, list_datasets

    for name in list_datasets():
        try:
            info = dataset_info(name)
        except SphereconvError:  # the image-folder dataset: classes and size come from --data-dir
            print(f"{name}  (class-named image subfolders of --data-dir)")
            continue
        print(f"{name}  ({info.num_classes} classes, {info.in_channels} channel(s), {_image_size(info.image_size)})")
    return 0
