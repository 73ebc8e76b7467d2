"""Crash-safe file replacement: write a temporary file, fsync it, rename it over the target.

Used for checkpoints, ``config.yaml``, ``summary.json`` and exported weights, so that a process
killed at any moment leaves either the old file or the complete new one under the final name,
never a partial write. Temporary files start with :data:`TEMP_PREFIX` and live in the target's
directory (a rename is atomic only within one file system).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

TEMP_PREFIX = ".tmp-"
# Mode of new files before the process umask is applied, as for open(path, "w").
_FILE_MODE = 0o666
_NAME_ATTEMPTS = 100


def _create_temporary(path: Path) -> tuple[int, Path]:
    for _ in range(_NAME_ATTEMPTS):
        candidate = path.parent / f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(6)}"
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


def remove_temporaries(directory: str | os.PathLike) -> int:
    """Delete temporary files left in ``directory`` by writes that were killed; return the count."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for entry in directory.iterdir():
        if entry.name.startswith(TEMP_PREFIX) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed += 1
    return removed
