"""Checkpoints: atomic writes, rotation, integrity, safe loading, compatibility checks, weight export.

A checkpoint is one file ``checkpoints/step_00001234.pt``: a header line :data:`MAGIC`, a line
``sha256:<64 hex digits>`` and then the ``torch.save`` payload whose SHA-256 that line records.
Every load recomputes the digest before unpickling anything, so a flipped bit or a cut file is a
:class:`~sphereconv.errors.CheckpointError` naming the file, never a silently different weight.
The payload holds plain data only (tensors, numbers, strings, lists, dicts, tuples) so that it
loads with ``torch.load(weights_only=True)``: the unpickler then refuses anything that would run
code. It holds everything a resumed run needs to continue bit for bit: model, optimizer,
scheduler, grad scaler and loss-module state, the step, the data loader's position, the RNG states
of torch, CUDA, numpy and Python, the progress counters and the resolved configuration. It also
records the dataset's class names and image size (:func:`dataset_record`), which an image folder
takes from its contents: a folder changed since training is refused by name
(:func:`check_dataset_compatible`) instead of relabelling classes in silence.
Checkpoints of format version 1 (a bare ``torch.save`` file, no digest) still load, with a warning.

Writes are atomic: the file is written to a temporary name in the same directory, flushed and
fsynced, renamed over the final name (``os.replace``) and the directory is fsynced, so a crash
leaves either the previous set of checkpoints or the new one, never a half-written file under a
checkpoint name. Only the newest ``keep`` checkpoints are kept.

Weights for sharing are exported as safetensors (no pickle at all).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError
from .atomic import atomic_write, remove_temporaries

if TYPE_CHECKING:
    from ..data import DatasetInfo

logger = logging.getLogger(__name__)

FORMAT_NAME = "sphereconv-checkpoint"
FORMAT_VERSION = 2
# Format version 1: a bare torch.save file without a digest (read with a warning).
UNVERIFIED_FORMAT_VERSION = 1
# First line of a checkpoint file of format version 2, then "sha256:<hex digest>\n", then the payload.
MAGIC = b"SPHERECONV-CHECKPOINT 2\n"
_DIGEST_PREFIX = b"sha256:"
_DIGEST_HEX_CHARS = 64
HEADER_BYTES = len(MAGIC) + len(_DIGEST_PREFIX) + _DIGEST_HEX_CHARS + 1
# A first line differing from MAGIC in at most this many bytes is a damaged header, not another format.
_MAGIC_DAMAGE_BYTES = 4
CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^step_(\d+)\.pt$")

# Longest excerpt of an underlying error quoted in a one-line message.
EXCERPT_CHARS = 200
# What torch's weights-only unpickler says when it refuses to import or call something (a global,
# a reduce, a class), as opposed to bytes that are no pickle ("Unsupported operand 0"), and where
# its own reason starts in the message.
_REFUSED_OBJECT = re.compile(r"global|reduce|new object|can only build", re.IGNORECASE)
_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)")
# Longest repr of a configuration value quoted in a one-line message.
VALUE_CHARS = 60
# Configuration keys besides the network's (objective.MODEL_CONFIG_KEYS) that a checkpoint's run
# and the current one must share: the loss module's weights and the classes depend on them.
LOSS_AND_DATA_KEYS = ("loss", "loss_kwargs", "dataset")


# ------------------------------------------------------------------------------------------------
# Atomic saving


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` behind the integrity header, to ``path`` atomically (see :func:`atomic_write`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getbuffer()
    header = MAGIC + _DIGEST_PREFIX + hashlib.sha256(payload).hexdigest().encode("ascii") + b"\n"

    def write(handle) -> None:
        handle.write(header)
        handle.write(payload)

    return atomic_write(path, write)


# ------------------------------------------------------------------------------------------------
# RNG state as plain data


def capture_rng_state() -> dict[str, Any]:
    """RNG states of Python ``random``, numpy's global generator, torch CPU and every CUDA device.

    Stored as tensors, ints, floats, strings and tuples only (``weights_only``-loadable).
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; raises CheckpointError if the state is malformed."""
    try:
        python = state["python"]
        random.setstate((python[0], tuple(python[1]), python[2]))
        numpy_state = state["numpy"]
        np.random.set_state(
            (
                numpy_state["kind"],
                numpy_state["keys"].numpy().astype(np.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            cuda_states = list(state["cuda"])
            if len(cuda_states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda_states)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint holds a malformed RNG state ({type(exc).__name__}: {exc})") from None


# ------------------------------------------------------------------------------------------------
# Saving, listing, loading


def checkpoint_dir(out: str | os.PathLike) -> Path:
    """The checkpoint directory of a run directory."""
    return Path(out) / CHECKPOINT_DIR


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """File name of the checkpoint at ``step`` in ``directory``."""
    return Path(directory) / f"step_{step:08d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint file in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _CHECKPOINT_NAME.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def remove_stale_temporaries(directory: str | os.PathLike) -> int:
    """Delete temporary files left by checkpoint writes that were killed; return how many.

    Only temporaries of checkpoint names go: other files in ``directory`` (a user's
    ``.tmp-important``, ``mymodel.pt``) are never touched.
    """
    return remove_temporaries(directory, lambda target: bool(_CHECKPOINT_NAME.match(target)))


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike, step: int, keep: int) -> Path:
    """Write ``state`` (plus format name and version) atomically as the checkpoint of ``step``.

    Afterwards only the newest ``keep`` checkpoints of ``directory`` remain, the one just written
    always among them. Checkpoints of later steps are removed: a run writes them only after
    resuming from an earlier step because they did not load, so they belong to the interrupted
    run's abandoned course (left in place, they would push the new checkpoints out of the
    ``keep`` newest and be what a resume or ``eval RUN`` finds first).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1; got {keep}")
    payload = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "step": int(step), **state}
    path = atomic_save(payload, checkpoint_path(directory, step))
    found = list_checkpoints(directory)
    abandoned = [old for old_step, old in found if old_step > step]
    earlier = [old for old_step, old in found if old_step <= step]
    for old in abandoned + earlier[:-keep]:
        logger.debug("removing checkpoint %s", old)
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify a checkpoint's SHA-256, then load it with ``torch.load(weights_only=True)``.

    Raises :class:`CheckpointError` (one line, naming the file) when the file is missing,
    truncated, fails its digest, is not a checkpoint, carries pickled code or objects, or has an
    unsupported format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r} ({type(exc).__name__}: {exc.strerror})") from None
    verified = data.startswith(MAGIC)
    if not verified and _damaged_magic(data):
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt: its first line is not {MAGIC!r}")
    payload = _verified_payload(path, data) if verified else memoryview(data)
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... here
        raise CheckpointError(_load_failure(path, exc)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{str(path)!r} is not a sphereconv checkpoint (no '{FORMAT_NAME}' format marker)")
    version = state.get("format_version")
    expected = FORMAT_VERSION if verified else UNVERIFIED_FORMAT_VERSION
    if version != expected:
        if version in (FORMAT_VERSION, UNVERIFIED_FORMAT_VERSION):  # header stripped, or added by hand
            where = "inside an integrity header" if verified else "without its integrity header"
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: format version {version} {where}")
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {version!r}; this sphereconv reads "
            f"versions {UNVERIFIED_FORMAT_VERSION} and {FORMAT_VERSION}"
        )
    if not verified:
        logger.warning("checkpoint %s has format version 1 and no integrity digest: it cannot be verified", path)
    missing = [k for k in ("step", "model", "config") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: missing {', '.join(missing)}")
    return state


def _damaged_magic(data: bytes) -> bool:
    """True when ``data`` starts like a version-2 header cut short or with a few bytes changed."""
    head = data[: len(MAGIC)]
    if not head or MAGIC.startswith(head):
        return bool(head)
    return len(head) == len(MAGIC) and sum(a != b for a, b in zip(head, MAGIC)) <= _MAGIC_DAMAGE_BYTES


def _verified_payload(path: Path, data: bytes) -> memoryview:
    """The payload after the header of ``data``, or CheckpointError if its SHA-256 does not match."""
    digest_line = data[len(MAGIC) : HEADER_BYTES]
    recorded = digest_line[len(_DIGEST_PREFIX) : -1]
    if (
        len(data) < HEADER_BYTES
        or not digest_line.startswith(_DIGEST_PREFIX)
        or not digest_line.endswith(b"\n")
        or any(c not in b"0123456789abcdef" for c in recorded)
    ):
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt: its integrity header is damaged")
    payload = memoryview(data)[HEADER_BYTES:]
    actual = hashlib.sha256(payload).hexdigest()
    if actual != recorded.decode("ascii"):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or corrupt: the SHA-256 of its {len(payload)} payload bytes is "
            f"{actual[:16]}..., not the {recorded[:16].decode('ascii')}... recorded when it was written"
        )
    return payload


def _load_failure(path: Path, exc: Exception) -> str:
    text = " ".join(str(exc).split())
    unpickler_failed = isinstance(exc, pickle.UnpicklingError) or "weights_only" in text.lower()
    if unpickler_failed and not _REFUSED_OBJECT.search(text):
        # Bytes that are no pickle at all (zeros, text, a safetensors file): nothing was refused.
        detail = _UNPICKLER_DETAIL.search(text)
        reason = detail.group(1) if detail else text
        return f"{str(path)!r} is not a readable checkpoint (not a torch.save file: {reason[:EXCERPT_CHARS]})"
    if unpickler_failed:
        first = text.split(". ")[0][:EXCERPT_CHARS]
        return (
            f"refused to load {str(path)!r}: it contains pickled code or objects that are not plain "
            f"tensors and data ({first}); only load checkpoints you trust with other tools"
        )
    if (
        isinstance(exc, EOFError)
        or "central directory" in text
        or "failed reading" in text
        or "truncated" in text.lower()
    ):
        return f"checkpoint {str(path)!r} is truncated or corrupt ({type(exc).__name__}: {text[:EXCERPT_CHARS]})"
    return f"{str(path)!r} is not a readable checkpoint ({type(exc).__name__}: {text[:EXCERPT_CHARS]})"


def find_latest_checkpoint(
    directory: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """Newest checkpoint in ``directory`` that loads; broken ones are skipped with a warning.

    Returns ``(path, state)`` or ``None`` when there is no loadable checkpoint.
    """
    for step, path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as exc:
            logger.warning("skipping checkpoint of step %d: %s", step, exc)
    return None


# ------------------------------------------------------------------------------------------------
# Compatibility


def _describe(config: Mapping[str, Any]) -> str:
    return f"model {short_value(config.get('model'))} with operator {short_value(config.get('operator'))}"


def short_value(value: Any) -> str:
    """``repr(value)``, cut to :data:`VALUE_CHARS` characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= VALUE_CHARS else text[: VALUE_CHARS - 3] + "..."


def check_config_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], source: str) -> None:
    """Raise CheckpointError (one line) if ``saved`` and ``current`` differ in a key that defines the
    network, its loss or its classes."""
    from .objective import MODEL_CONFIG_KEYS  # here, not on top: objective imports runtime, which imports us

    differing = [key for key in (*MODEL_CONFIG_KEYS, *LOSS_AND_DATA_KEYS) if saved.get(key) != current.get(key)]
    if differing:
        changes = ", ".join(
            f"{k}={short_value(saved.get(k))} there but {short_value(current.get(k))} here" for k in differing
        )
        names = "" if _describe(saved) == _describe(current) else f" ({_describe(saved)}, not {_describe(current)})"
        raise CheckpointError(f"{source} belongs to a different model{names}: {changes}")


def dataset_record(info: DatasetInfo) -> dict[str, Any]:
    """What a checkpoint records of the dataset it was trained on (a ``DatasetInfo``): the classes and
    the image size, which an image folder takes from its contents."""
    size = info.image_size
    return {
        "class_names": list(info.class_names),
        "image_size": list(size) if isinstance(size, tuple) else size,
    }


def check_dataset_compatible(saved: Mapping[str, Any] | None, info: DatasetInfo, source: str) -> None:
    """Raise CheckpointError (one line) if the dataset found now (a ``DatasetInfo``) has other classes
    or another image size than the one recorded by :func:`dataset_record` (checkpoints without the
    record pass: they were written before it existed)."""
    if not isinstance(saved, Mapping):
        return
    current = dataset_record(info)
    changes = []
    size, here = saved.get("image_size", current["image_size"]), current["image_size"]
    if size != here:
        changes.append(f"image_size={short_value(size)} there but {short_value(here)} here")
    names, here = saved.get("class_names", current["class_names"]), current["class_names"]
    names = list(names) if isinstance(names, (list, tuple)) else []
    if names != here:
        # The first label whose class differs (the longer list's next name when one is a prefix).
        label = next(i for i, (a, b) in enumerate(zip([*names, None], [*here, None])) if a != b)
        first = [short_value(n[label]) if label < len(n) else "none" for n in (names, here)]
        changes.append(
            f"{len(names)} classes there but {len(here)} here, class {label} {first[0]} there but {first[1]} here"
        )
    if changes:
        raise CheckpointError(
            f"{source} was trained on other data than {info.name!r} holds now: {'; '.join(changes)}; point data_dir "
            "(--data-dir) at the data the run was trained on"
        )


def check_state_compatible(saved: Mapping[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Raise CheckpointError (one line) unless ``saved`` has exactly ``model``'s keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) such as {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) such as {unexpected[0]!r}")
        raise CheckpointError(f"{source} does not match this model: {'; '.join(parts)}")
    for key, tensor in expected.items():
        other = saved[key]
        if not isinstance(other, torch.Tensor):
            raise CheckpointError(f"{source} does not match this model: {key!r} is not a tensor")
        if tuple(other.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source} does not match this model: {key!r} has shape "
                f"{tuple(other.shape)} there but {tuple(tensor.shape)} here"
            )


def load_model_state(model: nn.Module, saved: Mapping[str, torch.Tensor], source: str) -> None:
    """Check ``saved`` against ``model`` (keys and shapes) and load it."""
    check_state_compatible(saved, model, source)
    model.load_state_dict(saved)


# ------------------------------------------------------------------------------------------------
# safetensors export


def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: give every tensor its own copy.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def export_weights(module: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``module.state_dict()`` to a safetensors file atomically; ``metadata`` is str -> str."""
    from safetensors.torch import save

    if not isinstance(module, nn.Module):
        raise TypeError(f"export_weights expects an nn.Module; got {type(module).__name__}")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    data = save(_plain_state(module), metadata=meta or None)
    return atomic_write(path, lambda handle: handle.write(data))


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; CheckpointError if it is missing or corrupt."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises SafetensorError / OSError for bad files
        raise CheckpointError(
            f"{str(path)!r} is not a readable safetensors file ({' '.join(str(exc).split())[:EXCERPT_CHARS]})"
        ) from None
    return tensors, metadata


def load_weights(module: nn.Module, path: str | os.PathLike) -> dict[str, str]:
    """Load a safetensors file written by :func:`export_weights` into ``module``; return its metadata.

    Raises CheckpointError (one line) if the file is unreadable or its tensors do not match
    ``module`` (missing/unexpected keys or different shapes).
    """
    tensors, metadata = read_weights(path)
    load_model_state(module, tensors, f"weights file {str(path)!r}")
    return metadata
