"""The files of a training run directory: ownership, lock, resume contract and TensorBoard log.

``sphereconv train --out DIR`` writes (rank 0 only):

- ``sphereconv-run.json``: the marker that makes DIR a sphereconv run (a random run id and the
  time the run was created);
- ``config.yaml``: the resolved :class:`~sphereconv.engine.config.TrainConfig` the run started
  with, written once and never rewritten;
- ``amendments.json``: the settings a resume changed (see below), each with the step from which
  it applies;
- ``metrics.jsonl``: one JSON object per evaluation (every ``eval_every`` steps and at the end),
  following the reference code's evaluation every 500 iterations (Liu et al. 2017, Sec. 5);
- ``summary.json``: final and best test accuracy and run facts, written when the run completes
  (and removed when a resume trains it further, until that part completes);
- ``checkpoints/``: see :mod:`.checkpoint`;
- ``tensorboard/``: event files when TensorBoard logging is on.

**Ownership.** A new run starts only in a missing or empty folder, in a run folder with
``overwrite`` (which deletes that run's own files, by their names above, and nothing else), or
with ``overwrite`` in a folder of other files none of which has one of those names: sphereconv
never deletes or replaces a file it did not write. A folder written before run markers existed
(``config.yaml`` plus sphereconv checkpoints) counts as a run.

**Lock.** The trainer holds an exclusive ``flock`` on the run folder itself for as long as it runs
(the operating system releases it when the process dies), so a second trainer on the same folder
fails at once. Under ``torchrun`` rank 0 holds it.

**Resume contract.** ``resume`` compares the requested config with the run's (``config.yaml``
plus its amendments). Keys in :data:`RESUMABLE_KEYS` (the run's length, evaluation and checkpoint
cadence, logging, where and how it executes) may change and are recorded as an amendment;
anything else is refused with one line naming the keys and both values, before any file is
written: a failed resume leaves the folder byte for byte as it was.

On resume the metrics file is cut back to the records up to the checkpoint's step (dropping any
record a killed run wrote after its last checkpoint, and a half-written last line), so the resumed
run's records continue it without gap or duplicate.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, ConfigError, SphereconvError
from .atomic import atomic_write_text, remove_temporaries
from .checkpoint import (
    check_config_compatible,
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    short_value,
)
from .config import TrainConfig, config_from_dict, config_to_dict, read_yaml_config, save_config

try:  # POSIX advisory locks; without them (Windows) runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - platform dependent
    fcntl = None  # type: ignore[assignment]  # the stubs declare fcntl on POSIX only

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

logger = logging.getLogger(__name__)

MARKER_FILE = "sphereconv-run.json"
MARKER_FORMAT = "sphereconv-run"
CONFIG_FILE = "config.yaml"
AMENDMENTS_FILE = "amendments.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_PREFIX = "events.out.tfevents"
# Written by .layer_stats when layer_stats_every > 0 (named here: that module imports the trainer).
LAYER_STATS_FILE = "layer_stats.jsonl"
# Files in the run folder itself that a run writes (besides the marker).
RUN_FILES = (CONFIG_FILE, AMENDMENTS_FILE, METRICS_FILE, SUMMARY_FILE, LAYER_STATS_FILE)
# Settings that may change when a run is resumed: its length, how often it evaluates, checkpoints
# and logs, and where and how it executes. Everything else defines what the run computes.
RESUMABLE_KEYS = (
    "iterations",
    "epochs",
    "eval_every",
    "eval_batch_size",
    "checkpoint_every",
    "keep_checkpoints",
    "tensorboard",
    "progress",
    "device",
    "data_dir",
    "download",
    "compile",
    "channels_last",
    "max_nonfinite_steps",
    "layer_stats_every",
)
# Keys that describe the invocation, not the run.
INVOCATION_KEYS = ("out", "resume", "overwrite")
# Entries of a foreign folder named in the error that refuses it.
LISTED_ENTRIES = 3


def _json_value(value: Any) -> Any:
    # JSON has no NaN/Infinity: write them as null so every line stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _dumps(record: Mapping[str, Any]) -> str:
    return json.dumps({k: _json_value(v) for k, v in record.items()}, allow_nan=False)


def read_amendments(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The amendments recorded in ``out/amendments.json`` (empty when there is none)."""
    path = Path(out) / AMENDMENTS_FILE
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the run's amendments {str(path)!r}: {type(exc).__name__}") from None
    valid = isinstance(records, list) and all(
        isinstance(r, dict)
        and isinstance(r.get("step"), int)
        and isinstance(r.get("changes"), dict)
        and all(isinstance(c, dict) and {"from", "to"} <= c.keys() for c in r["changes"].values())
        for r in records
    )
    if not valid:
        raise ConfigError(
            f"the run's amendments {str(path)!r} are malformed: expected a list of "
            "{step, changes: {key: {from, to}}} records"
        )
    return records


def resumed_config_values(out: str | os.PathLike) -> dict[str, Any] | None:
    """The config a resume of the run in ``out`` continues: ``config.yaml`` with its amendments.

    ``None`` when ``out`` holds no ``config.yaml``.
    """
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        return None
    values = dict(read_yaml_config(path))
    for amendment in read_amendments(out):
        for key, change in amendment["changes"].items():
            values[key] = change["to"]
    return values


class RunDirectory:
    """Reads and writes the files of one run directory (see the module docstring)."""

    def __init__(self, out: str | os.PathLike, writable: bool = True) -> None:
        self.path = Path(out)
        self.writable = writable
        self._tensorboard: SummaryWriter | None = None
        self._lock_fd: int | None = None
        self._unmarked: bool | None = None
        self._created = False
        self.run_id: str | None = None
        # Amendments recorded by earlier resumes, and the one this resume makes (key -> {from, to}).
        self.amendments: list[dict[str, Any]] = []
        self.pending_changes: dict[str, dict[str, Any]] = {}
        self.start_step = 0

    @property
    def checkpoints(self) -> Path:
        """The checkpoint directory."""
        return checkpoint_dir(self.path)

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def marker_path(self) -> Path:
        return self.path / MARKER_FILE

    # -- ownership -----------------------------------------------------------------------------
    def _read_marker(self) -> str | None:
        """The run id of the marker file, or None when there is no valid marker."""
        try:
            marker = json.loads(self.marker_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT and isinstance(marker.get("run_id"), str):
            return marker["run_id"]
        return None

    def _is_unmarked_run(self) -> bool:
        """A run written before run markers existed: its config.yaml and a sphereconv checkpoint."""
        if self._unmarked is None:
            found = list_checkpoints(self.checkpoints) if (self.path / CONFIG_FILE).is_file() else []
            self._unmarked = False
            if found:
                try:
                    load_checkpoint(found[-1][1])
                    self._unmarked = True
                except CheckpointError:
                    pass
        return self._unmarked

    def holds_run(self) -> bool:
        """True when the directory holds (part of) a sphereconv run: its marker, or an unmarked run."""
        return self._read_marker() is not None or self._is_unmarked_run()

    def _own_names_present(self) -> list[str]:
        """Files of a foreign folder that have the names a run writes (it would replace them)."""
        present = [name for name in (MARKER_FILE, *RUN_FILES) if (self.path / name).exists()]
        present += [f"{self.checkpoints.name}/{p.name}" for _, p in list_checkpoints(self.checkpoints)]
        return present

    def check_start(self, config: TrainConfig) -> None:
        """Check, reading only, that ``config`` may start or resume a run here; ConfigError if not."""
        where = f"out={str(self.path)!r}"
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{where} is a file, not a folder; choose another out directory")
        if not self.path.is_dir() or not any(self.path.iterdir()):
            return
        if self.holds_run():
            if not config.resume and not config.overwrite:
                raise ConfigError(
                    f"{where} already holds a training run; pass resume (--resume) to continue it, "
                    "overwrite (--overwrite) to replace it, or choose another out directory"
                )
            return
        names = sorted(p.name for p in self.path.iterdir())
        entries = ", ".join(names[:LISTED_ENTRIES]) + (", ..." if len(names) > LISTED_ENTRIES else "")
        if config.resume:
            raise ConfigError(
                f"{where} is not a sphereconv run (it has no {MARKER_FILE}; it holds {entries}): "
                "there is nothing to resume; choose the folder of the run to continue"
            )
        if not config.overwrite:
            raise ConfigError(
                f"{where} is not empty and is not a sphereconv run (it holds {entries}); pass overwrite "
                "(--overwrite) to train there anyway (files sphereconv did not write are kept), "
                "or choose another out directory"
            )
        clashes = self._own_names_present()
        if clashes:
            raise ConfigError(
                f"{where} holds {clashes[0]}, which no sphereconv run wrote, and a run would replace it; "
                "sphereconv never deletes or replaces files it did not write: choose another out directory "
                "(such as a new subfolder)"
            )

    # -- lock ----------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the exclusive lock of the run folder (created if missing); SphereconvError if it is held."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"out={str(self.path)!r} is a file, not a folder; choose another out directory")
        self._created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (NotADirectoryError, FileExistsError):  # a file where a parent folder should be
            blocking = next(p for p in self.path.parents if p.exists())
            raise ConfigError(
                f"out={str(self.path)!r} lies below {str(blocking)!r}, which is a file, not a folder; "
                "choose another out directory"
            ) from None
        if fcntl is None or self._lock_fd is not None:
            return
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SphereconvError(
                f"out={str(self.path)!r} is in use: another sphereconv train process holds its lock; "
                "wait for it to finish or choose another out directory"
            ) from None
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock (closing the descriptor releases the flock).

        A folder that :meth:`lock` created and that is still empty (the run failed before writing
        anything) is removed again.
        """
        if self._created:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only succeeds while empty
            self._created = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- resume contract -----------------------------------------------------------------------
    def check_resume(self, config: TrainConfig) -> None:
        """Compare ``config`` with the run's config; record allowed changes, refuse the others.

        Reads only. Sets :attr:`amendments` (earlier ones) and :attr:`pending_changes`. A changed
        architecture key raises CheckpointError ("belongs to a different model"), any other key
        outside :data:`RESUMABLE_KEYS` ConfigError naming the keys and both values.
        """
        self.amendments, self.pending_changes = [], {}
        values = resumed_config_values(self.path)
        if values is None:
            return
        self.amendments = read_amendments(self.path)
        try:
            saved = config_to_dict(config_from_dict(values, check_environment=False))
        except ConfigError as exc:
            raise ConfigError(
                f"cannot resume: the run's {CONFIG_FILE} in {str(self.path)!r} is not a valid config ({exc})"
            ) from None
        current = config_to_dict(config)
        differing = [key for key in current if key not in INVOCATION_KEYS and saved.get(key) != current[key]]
        check_config_compatible(saved, current, f"the run in {str(self.path)!r}")
        fixed = [key for key in differing if key not in RESUMABLE_KEYS]
        if fixed:
            changes = ", ".join(
                f"{key}={short_value(saved.get(key))} there but {short_value(current[key])} here" for key in fixed
            )
            raise ConfigError(
                f"cannot resume the run in {str(self.path)!r} with other settings: {changes}; a resume may change only "
                f"{', '.join(k for k in RESUMABLE_KEYS if k in current)} (to change the others start a new run in "
                "another out directory)"
            )
        self.pending_changes = {key: {"from": saved.get(key), "to": current[key]} for key in differing}

    def all_amendments(self) -> list[dict[str, Any]]:
        """Earlier amendments plus this resume's (if it changes anything), as recorded."""
        if not self.pending_changes:
            return list(self.amendments)
        return [*self.amendments, {"step": self.start_step, "changes": self.pending_changes}]

    # -- writing -------------------------------------------------------------------------------
    def begin(self, config: TrainConfig, step: int) -> None:
        """Write what a starting run writes; ``step`` is the step it starts from.

        A new run (no resume, or nothing to resume) clears the files of a run it overwrites, writes
        a new marker and ``config.yaml``; a resume adds its amendment (and adopts an unmarked run).
        Temporary files of killed writes are removed in both cases.
        """
        self.start_step = int(step)
        if not self.writable:
            return
        owned = self.holds_run()
        if config.resume and owned:
            self.run_id = self._read_marker()
            if self.run_id is None:
                self._write_marker()
            if not (self.path / CONFIG_FILE).is_file():
                save_config(config, self.path / CONFIG_FILE)
            if self.pending_changes:
                amendments = self.all_amendments()
                atomic_write_text(self.path / AMENDMENTS_FILE, json.dumps(amendments, indent=2) + "\n")
                logger.info(
                    "resume at step %d changes %s (recorded in %s)",
                    step,
                    ", ".join(self.pending_changes),
                    AMENDMENTS_FILE,
                )
        else:
            if owned:
                self.clear()
            self.amendments, self.pending_changes = [], {}
            self._write_marker()
            save_config(config, self.path / CONFIG_FILE)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.checkpoints)
        remove_temporaries(self.path, lambda target: target in RUN_FILES or target == MARKER_FILE)

    def _write_marker(self) -> None:
        self.run_id = uuid.uuid4().hex
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        marker = {"format": MARKER_FORMAT, "run_id": self.run_id, "created": created}
        atomic_write_text(self.marker_path, json.dumps(marker, indent=2) + "\n")

    def clear(self) -> None:
        """Delete the files of the run here (by their names; other files stay)."""
        if not self.writable:
            return
        for _, path in list_checkpoints(self.checkpoints):
            path.unlink(missing_ok=True)
        remove_stale_temporaries(self.checkpoints)
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        events = self.path / TENSORBOARD_DIR
        if events.is_dir():
            for entry in events.iterdir():
                if entry.is_file() and entry.name.startswith(TENSORBOARD_PREFIX):
                    entry.unlink(missing_ok=True)

    def truncate_metrics(self, last_step: int) -> None:
        """Keep only well-formed records with ``step <= last_step`` (atomically)."""
        if not self.writable or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
                kept.append(line)
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def read_metrics(self) -> list[dict[str, Any]]:
        """All records of ``metrics.jsonl`` (skipping a half-written last line)."""
        if not self.metrics_path.exists():
            return []
        records = []
        for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one evaluation record (flushed and fsynced) and mirror it to TensorBoard."""
        if not self.writable:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(_dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self._tensorboard is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()

    def discard_summary(self) -> None:
        """Remove ``summary.json``: a resume that trains on makes the run unfinished again.

        Left in place, the summary of the shorter run would report it finished (final accuracy,
        steps) while the run trains further or after it was stopped there, and ``sphereconv
        reproduce`` would take the run as done.
        """
        if self.writable:
            self.summary_path.unlink(missing_ok=True)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write ``summary.json`` atomically."""
        if not self.writable:
            return
        text = json.dumps({k: _json_value(v) for k, v in summary.items()}, indent=2, allow_nan=False) + "\n"
        atomic_write_text(self.summary_path, text)

    def open_tensorboard(self, start_step: int) -> None:
        """Start TensorBoard logging; events after ``start_step`` from a killed run are purged."""
        if not self.writable:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._tensorboard = SummaryWriter(
            log_dir=str(self.path / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step > 0 else None
        )

    def close(self) -> None:
        """Flush and close the TensorBoard writer, if any, and release the lock."""
        try:
            if self._tensorboard is not None:
                self._tensorboard.close()
                self._tensorboard = None
        finally:
            self.unlock()
