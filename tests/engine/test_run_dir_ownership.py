"""A run folder is owned (real Fashion-MNIST subset, through the command line): ``train`` never
deletes or replaces a file it did not write, ``--overwrite`` deletes only the run's own files, and
an exclusive lock makes a second trainer on the same folder fail at once with one line."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from engine_helpers import PYTHON, subprocess_env

from cli_helpers import TINY, folder_snapshot, run_cli
from sphereconv.engine.atomic import TEMP_PREFIX
from sphereconv.engine.checkpoint import (
    checkpoint_dir,
    list_checkpoints,
    remove_stale_temporaries,
)
from sphereconv.engine.run_dir import MARKER_FILE

# Steps of the trainer that holds the lock while a second one tries (long enough to still run
# when the second, started in this already-initialised process, reaches the lock).
HOLDER_STEPS = 30
# Upper bound for the trainer subprocess (startup of a fresh interpreter on a loaded machine).
PROCESS_TIMEOUT_S = 180
# The refused second trainer must fail within this many seconds.
REFUSAL_BOUND_S = 10


def _users_folder(folder: Path) -> dict[str, bytes]:
    files = {
        "config.yaml": b"# my experiment: do not lose these comments\nlr: 0.01\n",
        "notes.txt": b"observations of yesterday\n",
        "checkpoints/mymodel.pt": b"weights I trained elsewhere\n",
        "checkpoints/.tmp-important": b"not a temporary file of sphereconv\n",
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def test_a_folder_that_is_not_a_run_is_never_overwritten(tmp_path):
    folder = tmp_path / "mine"
    users = _users_folder(folder)
    before = folder_snapshot(folder)
    code, _, err = run_cli("train", *TINY, "--iterations", 2, "--out", folder)
    assert code == 2 and err.count("\n") == 1 and "is not empty and is not a sphereconv run" in err
    # --overwrite may not replace the user's config.yaml either.
    code, _, err = run_cli("train", *TINY, "--iterations", 2, "--out", folder, "--overwrite")
    assert code == 2 and err.count("\n") == 1 and "holds config.yaml, which no sphereconv run wrote" in err
    # The user's commented config used as --config inside --out.
    for extra in ([], ["--overwrite"]):
        code, _, err = run_cli(
            "train", "--config", folder / "config.yaml", *TINY, "--iterations", 2, "--out", folder, *extra
        )
        assert code == 2 and err.count("\n") == 1, err
    assert folder_snapshot(folder) == before

    # Without the clash, --overwrite trains there and keeps every file it did not write.
    (folder / "config.yaml").unlink()
    del users["config.yaml"]
    for _ in range(2):  # the second --overwrite replaces the run, and only the run
        code, _, err = run_cli("train", *TINY, "--iterations", 2, "--out", folder, "--overwrite")
        assert code == 0, err
        assert {name: (folder / name).read_bytes() for name in users} == users
        assert [s for s, _ in list_checkpoints(checkpoint_dir(folder))] == [2]
    marker = json.loads((folder / MARKER_FILE).read_text())
    assert json.loads((folder / "summary.json").read_text())["run_id"] == marker["run_id"]


def test_only_temporaries_of_checkpoint_writes_are_removed(tmp_path):
    users = _users_folder(tmp_path)
    # A checkpoint write killed before its rename leaves exactly such a name.
    leftover = tmp_path / "checkpoints" / f"{TEMP_PREFIX}step_00000004.pt.0123456789ab"
    leftover.write_bytes(b"half a checkpoint")
    assert remove_stale_temporaries(tmp_path / "checkpoints") == 1
    assert not leftover.exists()
    assert {name: (tmp_path / name).read_bytes() for name in users} == users


def test_second_trainer_on_the_same_folder_fails_at_once(tmp_path):
    out = tmp_path / "run"
    command = [
        PYTHON,
        "-m",
        "sphereconv.cli.main",
        "train",
        *TINY,
        "--iterations",
        str(HOLDER_STEPS),
        "--eval-every",
        "15",
        "--out",
        str(out),
    ]
    holder = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The marker is written under the lock, once the run is set up: from then on it is held.
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while not (out / MARKER_FILE).exists():
            assert holder.poll() is None and time.monotonic() < deadline, holder.stderr.read()
            time.sleep(0.05)
        started = time.monotonic()
        code, _, err = run_cli("train", *TINY, "--iterations", HOLDER_STEPS, "--out", out, "--overwrite")
        refused_after = time.monotonic() - started
        assert holder.poll() is None, "the first trainer finished before the second one tried"
        assert (
            code == 2 and err.count("\n") == 1 and "is in use: another sphereconv train process holds its lock" in err
        )
        assert refused_after < REFUSAL_BOUND_S
        stdout, stderr = holder.communicate(timeout=PROCESS_TIMEOUT_S)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert holder.returncode == 0, stderr
    assert stdout.splitlines()[-1].startswith("done:")
    # Only the first run's records: one per evaluation, none interleaved from the refused one.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [15, HOLDER_STEPS]
    assert json.loads((out / "summary.json").read_text())["steps"] == HOLDER_STEPS
    # The lock went with the process: the folder can be resumed now.
    code, _, err = run_cli("train", "--resume", "--out", out)
    assert code == 0, err
