"""Downloading datasets, atomically and verified.

A file is streamed into a temporary file next to its destination, checked (MD5 of the bytes where
the publisher gives one, SHA-256 of the decompressed content where known, see :mod:`.checksums`),
flushed to disk and only then renamed into place, so an interrupted or corrupted download never
leaves a file that looks complete. A mismatch deletes the temporary file and raises
:class:`~sphereconv.errors.DatasetError`.

Base URLs come from the dataset's registry entry; the ``mirror`` argument or the environment
variable ``SPHERECONV_MIRROR`` replaces them (the file name is appended to it), e.g. for a local
mirror or a test server. Tar archives (CIFAR) are unpacked member by member after checking that
every member is a plain file or directory inside the expected top directory.
"""

from __future__ import annotations

import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .. import __version__
from ..errors import DatasetError
from .checksums import verify_content_of_file, verify_md5
from .registry import DatasetSpec, RemoteFile

# Environment variable replacing the registry's base URLs.
MIRROR_ENV = "SPHERECONV_MIRROR"
# Seconds to wait for a server to answer or send more data.
DEFAULT_TIMEOUT_S = 60.0
# Bytes per read while streaming a download.
CHUNK_BYTES = 1 << 20
# Most bytes one download may bring: above the largest file of the registry (CIFAR-100's archive,
# 161 MiB); a server sending without end (a wrong mirror, a hostile one) must not fill the disk.
MAX_DOWNLOAD_BYTES = 1 << 30


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _fsync_and_replace(temp: Path, dest: Path) -> None:
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, dest)


def download_file(
    url: str,
    dest: str | Path,
    *,
    md5: str | None = None,
    content_sha256: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying it before it appears under its name.

    ``md5`` checks the downloaded bytes, ``content_sha256`` the decompressed content (for gzip
    files; raw files are hashed as they are). On any failure the temporary file is deleted and
    :class:`DatasetError` is raised naming the URL; ``dest`` is left untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(handle, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": f"sphereconv/{__version__}"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                total = response.headers.get("Content-Length")
                with tqdm(
                    total=int(total) if total and total.isdigit() else None,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    disable=None if progress else True,
                ) as bar:
                    received = 0
                    for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                        received += len(chunk)
                        if received > MAX_DOWNLOAD_BYTES:
                            raise DatasetError(
                                f"download of {url} stopped: the server sent more than {MAX_DOWNLOAD_BYTES:,} bytes, "
                                f"more than any dataset file; check the URL (the mirror argument or ${MIRROR_ENV})"
                            )
                        out.write(chunk)
                        bar.update(len(chunk))
        try:
            verify_md5(temp, md5)
            verify_content_of_file(temp, content_sha256)  # hashed as it is decompressed: a gzip bomb costs no memory
        except DatasetError as exc:
            raise DatasetError(f"download of {url} failed verification and was deleted: {exc}") from None
        _fsync_and_replace(temp, dest)
        return dest
    except DatasetError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        # HTTPException: a malformed URL (InvalidURL) or a reply that is not HTTP (BadStatusLine).
        raise DatasetError(f"could not download {url}: {type(exc).__name__}: {exc}") from exc
    finally:
        _remove_quietly(temp)


def _safe_member_path(member: tarfile.TarInfo, archive: Path) -> Path:
    path = Path(member.name)
    if path.is_absolute() or ".." in path.parts or member.name.startswith(("/", "\\")):
        raise DatasetError(f"{archive} refused: member {member.name!r} points outside the extraction directory")
    if not (member.isfile() or member.isdir()):
        raise DatasetError(f"{archive} refused: member {member.name!r} is a link or device, not a plain file")
    return path


def extract_tar(archive: str | Path, dest_dir: str | Path, top_dir: str) -> Path:
    """Unpack the tar archive ``archive`` into ``dest_dir``; every member must lie under ``top_dir``.

    Members are written through temporary files and renamed into place. Absolute paths, ``..``,
    links, devices and members outside ``top_dir`` raise :class:`DatasetError` before anything is
    written. Returns ``dest_dir / top_dir``.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                path = _safe_member_path(member, archive)
                if path.parts[:1] != (top_dir,):
                    raise DatasetError(f"{archive} refused: member {member.name!r} is not under {top_dir}/")
            for member in members:
                target = dest_dir / member.name
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # regular files always have content
                handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
                try:
                    with os.fdopen(handle, "wb") as out:
                        shutil.copyfileobj(source, out, CHUNK_BYTES)
                    _fsync_and_replace(Path(temp_name), target)
                finally:
                    _remove_quietly(Path(temp_name))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DatasetError(f"cannot unpack {archive} ({exc}); delete it and download it again") from exc
    return dest_dir / top_dir


def base_urls(spec: DatasetSpec, mirror: str | None) -> tuple[str, ...]:
    """The base URLs to try: ``mirror``, else ``$SPHERECONV_MIRROR``, else the registry's."""
    override = mirror or os.environ.get(MIRROR_ENV)
    return (override,) if override else spec.mirrors


def _fetch_from_mirrors(spec: DatasetSpec, remote: RemoteFile, dest: Path, mirror: str | None, progress: bool) -> None:
    # Files without a published MD5 (Fashion-MNIST) are checked by their decompressed content.
    logical_name = remote.filename.removesuffix(".gz")
    content_sha256 = None if remote.md5 else spec.content_sha256.get(logical_name)
    failures = []
    for base in base_urls(spec, mirror):
        url = base.rstrip("/") + "/" + remote.filename
        try:
            download_file(url, dest, md5=remote.md5, content_sha256=content_sha256, progress=progress)
            return
        except DatasetError as exc:
            failures.append(str(exc))
    raise DatasetError(" | ".join(failures))


def download_dataset(spec: DatasetSpec, root: str | Path, *, mirror: str | None = None, progress: bool = True) -> Path:
    """Download every file of ``spec`` that is missing under ``root``; returns the dataset directory.

    Plain files go to ``root / spec.layouts[0]``; archives are saved in ``root`` and unpacked there
    (their top directory is ``spec.layouts[0]``).
    """
    root = Path(root)
    dataset_dir = root / spec.layouts[0]
    for remote in spec.downloads:
        if remote.extract:
            archive = root / remote.filename
            if not all((dataset_dir / f).is_file() for files in spec.split_files.values() for f in files):
                if not archive.is_file():
                    _fetch_from_mirrors(spec, remote, archive, mirror, progress)
                else:
                    verify_md5(archive, remote.md5)
                extract_tar(archive, root, spec.layouts[0])
        else:
            target = dataset_dir / remote.filename
            raw = dataset_dir / remote.filename.removesuffix(".gz")
            if not target.is_file() and not raw.is_file():
                _fetch_from_mirrors(spec, remote, target, mirror, progress)
    return dataset_dir
