"""Crash-safe file replacement: write a temporary file, fsync it, rename it over the target.

Used for checkpoints, ``config.yaml``, ``summary.json`` and exported weights, so that a process
killed at any moment leaves either the old file or the complete new one under the final name,
never a partial write. Temporary files start with :data:`TEMP_PREFIX` and live in the target's
directory (a rename is atomic only within one file system); :func:`remove_temporaries` deletes
only names of exactly that form.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".tmp-"
# Mode of new files before the process umask is applied, as for open(path, "w").
_FILE_MODE = 0o666
_NAME_ATTEMPTS = 100
# Random hex digits at the end of a temporary file's name.
_TOKEN_BYTES = 6
_TEMPORARY_NAME = re.compile(rf"^{re.escape(TEMP_PREFIX)}(.+)\.[0-9a-f]{{{2 * _TOKEN_BYTES}}}$")


def _create_temporary(path: Path) -> tuple[int, Path]:
    for _ in range(_NAME_ATTEMPTS):
        candidate = path.parent / f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(_TOKEN_BYTES)}"
        try:
            return os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE), candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {str(path)!r}")


def fsync_directory(directory: str | os.PathLike) -> None:
    """fsync a directory so that a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, then atomically rename it.

    The data are flushed and fsynced before ``os.replace`` and the directory after it. On any
    error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 string."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(data))


def temporary_target(name: str) -> str | None:
    """The file name whose write created the temporary file ``name``, or None if ``name`` is not one.

    Only names of exactly the form :func:`atomic_write` creates count: a user's ``.tmp-notes`` is
    not a temporary file of this module.
    """
    match = _TEMPORARY_NAME.match(name)
    return match.group(1) if match else None


def remove_temporaries(directory: str | os.PathLike, targets: Callable[[str], bool] = lambda name: True) -> int:
    """Delete temporary files of killed writes in ``directory`` whose target name passes ``targets``.

    Returns how many were removed. Files that merely start with :data:`TEMP_PREFIX` are kept.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for entry in directory.iterdir():
        target = temporary_target(entry.name)
        if target is not None and targets(target) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed += 1
    return removed
