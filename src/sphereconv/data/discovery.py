"""Where dataset files are looked for.

Search roots, in order (the first directory that holds every file of the requested split wins):

1. the ``data_dir`` argument (``--data-dir`` on the command line);
2. the directory in the environment variable ``SPHERECONV_DATA``;
3. the user cache, ``$XDG_CACHE_HOME/sphereconv`` or ``~/.cache/sphereconv`` (downloads go here
   unless ``data_dir`` is given);
4. ``/usr/share/datasets``, where Debian's dataset packages install (``dataset-fashion-mnist``
   puts Fashion-MNIST in ``/usr/share/datasets/fashion-mnist``).

Inside each root the dataset's usual subdirectories are tried, most specific first (for
Fashion-MNIST: ``fashion-mnist/``, torchvision's ``FashionMNIST/raw/``, then the root itself), so
``--data-dir`` may point either at a directory of datasets or at the dataset's own directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .registry import DatasetSpec

# Environment variable naming an extra search root.
DATA_DIR_ENV = "SPHERECONV_DATA"
# Directory where Debian's dataset packages (e.g. dataset-fashion-mnist) install their files.
SYSTEM_DATASETS_ROOT = Path("/usr/share/datasets")
# Name of the cache subdirectory under $XDG_CACHE_HOME (or ~/.cache).
CACHE_SUBDIR = "sphereconv"


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sphereconv`` if the variable is set and non-empty, else ``~/.cache/sphereconv``."""
    base = os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    return root / CACHE_SUBDIR


def search_roots(data_dir: str | os.PathLike | None) -> list[tuple[str, Path]]:
    """The search roots in order, each as ``(where it came from, path)``; duplicates removed."""
    roots: list[tuple[str, Path]] = []
    if data_dir is not None:
        roots.append(("data_dir", Path(data_dir).expanduser()))
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        roots.append((f"${DATA_DIR_ENV}", Path(env).expanduser()))
    roots.append(("user cache", user_cache_dir()))
    roots.append(("system datasets", SYSTEM_DATASETS_ROOT))
    unique: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for origin, path in roots:
        if path not in seen:
            seen.add(path)
            unique.append((origin, path))
    return unique


def file_candidates(spec: DatasetSpec, filename: str) -> tuple[str, ...]:
    """Names under which a file may be stored: IDX files raw or gzip-compressed."""
    return (filename, filename + ".gz") if spec.reader == "idx" else (filename,)


def _find_in(directory: Path, spec: DatasetSpec, filenames: tuple[str, ...]) -> dict[str, Path] | None:
    found: dict[str, Path] = {}
    for filename in filenames:
        for candidate in file_candidates(spec, filename):
            path = directory / candidate
            if path.is_file():
                found[filename] = path
                break
        else:
            return None
    return found


@dataclass(frozen=True)
class SearchResult:
    """Outcome of a search: ``files`` maps each needed file name to its path (``None``: not found)."""

    files: dict[str, Path] | None
    directory: Path | None
    roots: list[tuple[str, Path]]

    def describe_roots(self, spec: DatasetSpec) -> str:
        """One line naming every searched root and the subdirectories tried in each."""
        subdirs = ", ".join(f"{layout}/" if layout else "the root itself" for layout in spec.layouts)
        roots = "; ".join(f"{path} ({origin})" for origin, path in self.roots)
        return f"searched {roots}; in each: {subdirs}"


def find_split_files(spec: DatasetSpec, split: str, data_dir: str | os.PathLike | None) -> SearchResult:
    """Look for the files of ``split`` in every search root and layout; see the module docstring."""
    roots = search_roots(data_dir)
    filenames = spec.split_files[split]
    for _, root in roots:
        for layout in spec.layouts:
            directory = root / layout if layout else root
            found = _find_in(directory, spec, filenames)
            if found is not None:
                return SearchResult(found, directory, roots)
    return SearchResult(None, None, roots)


def download_root(data_dir: str | os.PathLike | None) -> Path:
    """Where downloads go: ``data_dir`` if given, else the user cache."""
    return Path(data_dir).expanduser() if data_dir is not None else user_cache_dir()
