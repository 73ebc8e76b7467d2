"""The YAML presets shipped with the package.

One training config per experiment of Liu et al., "Deep Hyperspherical Learning" (NIPS 2017,
Sec. 5), in the reference recipe of wy1iu/SphereNet (``sphereconv train --config NAME``, the
``paper`` scale of ``sphereconv reproduce``), and the grids of ``sphereconv reproduce --grid`` in
``sweeps/``. They are package data, found through :mod:`importlib.resources`, so they work from an
installed wheel as from a source checkout (whose top-level ``configs/`` links here).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from ..errors import ConfigError, short_repr

__all__ = ["list_presets", "preset_path", "find_config", "list_grids", "find_grid"]

SUFFIX = ".yaml"
# Subfolder of the grid files.
GRIDS_FOLDER = "sweeps"
# Longest path printed in a message.
MAX_PATH_CHARS = 200


def _folder() -> Path:
    # The package is installed as files (setuptools never installs it zipped), so this is a real folder.
    return Path(str(resources.files(__name__)))


def _names(folder: Path) -> list[str]:
    return sorted(path.name[: -len(SUFFIX)] for path in folder.glob(f"*{SUFFIX}"))


def _find(name_or_path: str | os.PathLike, folder: Path, what: str) -> Path:
    """``name_or_path`` if it exists, else the file of that name (``.yaml`` optional) in ``folder``."""
    path = Path(name_or_path)
    if path.exists():
        return path
    stem = path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else path.name
    names = _names(folder)
    if path.name == os.fspath(name_or_path) and stem in names:
        return folder / f"{stem}{SUFFIX}"
    shown = short_repr(os.fspath(name_or_path), MAX_PATH_CHARS)
    raise ConfigError(
        f"{what} file {shown} does not exist and names no {what} shipped with the package: {', '.join(names)}"
    )


def list_presets() -> list[str]:
    """Names of the training presets, sorted (``spherenet9_cifar10``, ...)."""
    return _names(_folder())


def preset_path(name: str) -> Path:
    """The file of the preset ``name`` (with or without ``.yaml``); :class:`ConfigError` if there is none."""
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    if stem not in list_presets():
        raise ConfigError(f"no preset config named {name!r}; presets: {', '.join(list_presets())}")
    return _folder() / f"{stem}{SUFFIX}"


def find_config(name_or_path: str | os.PathLike) -> Path:
    """``name_or_path`` if it exists, else the preset of that name (``--config`` of ``sphereconv train``).

    :class:`ConfigError` when it is neither, listing the presets.
    """
    return _find(name_or_path, _folder(), "config")


def list_grids() -> list[str]:
    """Names of the grids of ``sphereconv reproduce --grid`` shipped in ``sweeps/``, sorted."""
    return _names(_folder() / GRIDS_FOLDER)


def find_grid(name_or_path: str | os.PathLike) -> Path:
    """``name_or_path`` if it exists, else the shipped grid of that name (``--grid`` of ``sphereconv reproduce``).

    :class:`ConfigError` when it is neither, listing the grids.
    """
    return _find(name_or_path, _folder() / GRIDS_FOLDER, "grid")
