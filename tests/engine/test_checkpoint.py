"""Checkpoint files: atomic writes, rotation, refusing unsafe or broken files, safetensors export."""

from __future__ import annotations

import logging
import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from sphereconv.engine import checkpoint as ckpt
from sphereconv.engine import export_weights, load_weights
from sphereconv.engine.atomic import TEMP_PREFIX, atomic_write
from sphereconv.errors import CheckpointError
from sphereconv.models import create_model


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "config": {"model": "spherenet9"}}


def test_save_keeps_the_newest_k(tmp_path):
    for step in (5, 10, 15, 20):
        ckpt.save_checkpoint(_state(step), tmp_path, step, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [15, 20]
    loaded = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 20))
    assert loaded["step"] == 20 and torch.equal(loaded["model"]["w"], torch.full((3,), 20.0))
    assert loaded["format_version"] == ckpt.FORMAT_VERSION
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_save_after_resuming_before_an_unreadable_checkpoint_keeps_the_new_one(tmp_path):
    # A run whose newest checkpoint (step 30) no longer loads resumes from an earlier point (here:
    # from scratch, keep=1) and saves step 10: that checkpoint must survive, and the unreadable one
    # of the abandoned course must not be what the next resume or `eval RUN` finds first.
    ckpt.save_checkpoint(_state(30), tmp_path, 30, keep=1)
    stale = ckpt.checkpoint_path(tmp_path, 30)
    stale.write_bytes(stale.read_bytes()[:-10])
    assert ckpt.find_latest_checkpoint(tmp_path) is None
    written = ckpt.save_checkpoint(_state(10), tmp_path, 10, keep=1)
    assert ckpt.list_checkpoints(tmp_path) == [(10, written)]
    path, state = ckpt.find_latest_checkpoint(tmp_path)
    assert path == written and state["step"] == 10
    for step in (20, 25):
        ckpt.save_checkpoint(_state(step), tmp_path, step, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [20, 25]


def test_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old contents")

    def write_half(handle):
        handle.write(b"new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, write_half)
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_atomic_write_uses_fsync_and_replace(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    atomic_write(tmp_path / "x", lambda handle: handle.write(b"data"))
    # file fsync before the rename, directory fsync after it
    assert calls == ["fsync", "replace", "fsync"]
    assert (tmp_path / "x").read_bytes() == b"data"


def test_truncated_checkpoint_is_reported_and_skipped(tmp_path, caplog):
    ckpt.save_checkpoint(_state(1), tmp_path, 1, keep=5)
    newest = ckpt.save_checkpoint(_state(2), tmp_path, 2, keep=5)
    data = newest.read_bytes()
    for cut in (len(data) // 2, 100, 0):
        newest.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as info:
            ckpt.load_checkpoint(newest)
        assert "\n" not in str(info.value) and "step_00000002.pt" in str(info.value)
        with caplog.at_level(logging.WARNING, logger="sphereconv.engine.checkpoint"):
            path, state = ckpt.find_latest_checkpoint(tmp_path)
        assert state["step"] == 1 and path.name == "step_00000001.pt"
        assert "skipping checkpoint of step 2" in caplog.text


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello, not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a readable checkpoint|truncated or corrupt"):
        ckpt.load_checkpoint(text)
    # Bytes that are no pickle (zeros, a safetensors file) are not reported as carrying code.
    for name, data in (("zeros.pt", bytes(30)), ("model.safetensors", b"\x90\x00\x00\x00\x00\x00\x00\x00{}")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="not a readable checkpoint") as info:
            ckpt.load_checkpoint(tmp_path / name)
        assert "pickled code" not in str(info.value)
    other = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(2)}, other)
    with pytest.raises(CheckpointError, match="not a sphereconv checkpoint"):
        ckpt.load_checkpoint(other)
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")
    future = tmp_path / "future.pt"
    torch.save({"format": ckpt.FORMAT_NAME, "format_version": 99, "step": 1, "model": {}, "config": {}}, future)
    with pytest.raises(CheckpointError, match="format version 99"):
        ckpt.load_checkpoint(future)


class _RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_carrying_code_is_refused(tmp_path, legacy):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    payload = {
        "format": ckpt.FORMAT_NAME,
        "format_version": ckpt.FORMAT_VERSION,
        "step": 1,
        "model": {},
        "config": {},
        "extra": _RunsCode(marker),
    }
    if legacy:
        with open(path, "wb") as handle:  # a plain pickle, not torch's zip container
            pickle.dump(payload, handle, protocol=2)
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match="refused to load") as info:
        ckpt.load_checkpoint(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    with pytest.raises(CheckpointError, match="malformed RNG state"):
        ckpt.restore_rng_state({"python": 3})


def _tiny(operator="cosine", width=0.0625):
    return create_model("spherenet9", num_classes=10, in_channels=1, image_size=28, operator=operator, width_mult=width)


def test_different_model_is_a_one_line_error():
    saved = {"model": "spherenet9", "operator": "cosine", "width_mult": 0.5}
    with pytest.raises(CheckpointError) as info:
        ckpt.check_config_compatible(
            saved, {**saved, "model": "spherenet18", "operator": "linear"}, "checkpoint 'x.pt'"
        )
    message = str(info.value)
    assert "\n" not in message
    assert "model 'spherenet9' with operator 'cosine', not model 'spherenet18' with operator 'linear'" in message
    model = _tiny()
    with pytest.raises(CheckpointError, match=r"has shape .* there but .* here"):
        ckpt.load_model_state(model, _tiny(width=0.125).state_dict(), "checkpoint 'x.pt'")
    state = model.state_dict()
    state.pop(next(iter(state)))
    with pytest.raises(CheckpointError, match="missing 1 tensor"):
        ckpt.load_model_state(model, state, "checkpoint 'x.pt'")


def test_export_weights_to_safetensors(tmp_path):
    torch.manual_seed(0)
    model = _tiny()
    path = export_weights(model, tmp_path / "model.safetensors", {"model": "spherenet9"})
    assert path.read_bytes()[8:9] == b"{"  # safetensors: 8-byte header length, then JSON
    torch.manual_seed(1)
    other = _tiny()
    assert not torch.equal(next(iter(other.parameters())), next(iter(model.parameters())))
    metadata = load_weights(other, path)
    assert metadata == {"model": "spherenet9"}
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, other.state_dict()[key]), key
    with pytest.raises(CheckpointError, match="does not match this model"):
        load_weights(_tiny(width=0.125), path)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_weights(other, broken)


def test_export_handles_shared_tensors(tmp_path):
    shared = nn.Linear(3, 3)
    holder = nn.ModuleDict({"a": shared, "b": shared})
    export_weights(holder, tmp_path / "w.safetensors")
    copy = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3)})
    load_weights(copy, tmp_path / "w.safetensors")
    assert torch.equal(copy["b"].weight, shared.weight)


def test_every_flipped_byte_is_caught_by_the_digest(tmp_path, caplog):
    """One flipped bit anywhere (magic line, digest line, pickle, tensor data, zip directory) is refused."""
    ckpt.save_checkpoint(_state(1), tmp_path, 1, keep=5)
    newest = ckpt.save_checkpoint(_state(2), tmp_path, 2, keep=5)
    data = newest.read_bytes()
    assert data.startswith(ckpt.MAGIC)
    positions = [0, len(ckpt.MAGIC) - 2, len(ckpt.MAGIC) + 10, ckpt.HEADER_BYTES - 1]
    positions += random.Random(0).sample(range(ckpt.HEADER_BYTES, len(data)), 40)
    for position in positions:
        for bit in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[position] ^= bit
            newest.write_bytes(bytes(damaged))
            with pytest.raises(CheckpointError) as info:
                ckpt.load_checkpoint(newest)
            message = str(info.value)
            assert "\n" not in message and "step_00000002.pt" in message and "corrupt" in message, (position, message)
    with caplog.at_level(logging.WARNING, logger="sphereconv.engine.checkpoint"):
        path, state = ckpt.find_latest_checkpoint(tmp_path)
    assert state["step"] == 1 and "skipping checkpoint of step 2" in caplog.text
    newest.write_bytes(data)
    assert torch.equal(ckpt.load_checkpoint(newest)["model"]["w"], torch.full((3,), 2.0))


def test_header_and_version_must_agree(tmp_path, caplog):
    payload = {"format": ckpt.FORMAT_NAME, "step": 1, "model": {"w": torch.ones(2)}, "config": {}}
    # A checkpoint of format version 1 (no digest, written by earlier versions) loads, with a warning.
    legacy = tmp_path / "legacy.pt"
    torch.save({**payload, "format_version": ckpt.UNVERIFIED_FORMAT_VERSION}, legacy)
    with caplog.at_level(logging.WARNING, logger="sphereconv.engine.checkpoint"):
        assert ckpt.load_checkpoint(legacy)["step"] == 1
    assert "no integrity digest" in caplog.text
    # A version-2 payload whose header was stripped is not taken for an unverified old file.
    stripped = tmp_path / "stripped.pt"
    stripped.write_bytes(
        ckpt.atomic_save({**payload, "format_version": ckpt.FORMAT_VERSION}, tmp_path / "full.pt").read_bytes()[
            ckpt.HEADER_BYTES :
        ]
    )
    with pytest.raises(CheckpointError, match="corrupt: format version 2 without its integrity header"):
        ckpt.load_checkpoint(stripped)
