"""Running a grid: ``sphereconv reproduce --grid configs/sweeps/NAME.yaml`` (grid files: :mod:`.grid`).

Runs are trained one at a time in the grid's order, each in ``OUT/<grid>/train/<run>/``. A run
whose results file exists is skipped; an interrupted run continues from its newest checkpoint.
Several processes (or machines sharing a results folder) can work on one grid: a lock file per
run keeps two from training the same run, and ``--only`` gives each its own cells. After every
run the combined report (:mod:`.grid_report`) is rewritten from all the results files present.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from .grid import (
    RUNS_DIR,
    GridPlan,
    GridRun,
    load_grid,
    load_recorded,
    plan_grid,
    record_run,
    results_path,
    select_runs,
    source_version,
)
from .grid_report import collect_cells, compare_cells, in_short, other_grid_in_short, write_grid_report
from .runner import check_run_matches, run_status, train_run

# A lock file is empty only between its creation and its process writing its id into it, unless the
# machine stopped in between (a file created just before a crash or power cut can come back empty):
# an empty lock file older than this is stale.
EMPTY_LOCK_SECONDS = 60.0


def _lock_path(run: GridRun) -> Path:
    return run.planned.out.parent / f"{run.run_id}.lock"


def _lock_owner(run: GridRun) -> int | None:
    """The process id of the live process that holds the run's lock file, else None (a lock file
    left by a process that is gone is removed)."""
    lock = _lock_path(run)
    try:
        text = lock.read_text().strip()
        if not text and time.time() - lock.stat().st_mtime > EMPTY_LOCK_SECONDS:
            raise ValueError("an empty lock file left by a crash")
        owner = int(text or 0)  # empty: its process is writing its id now
        os.kill(owner, 0)
        return owner
    except PermissionError:  # the process lives, under another user
        return owner
    except FileNotFoundError:
        return None
    except (ValueError, ProcessLookupError):
        lock.unlink(missing_ok=True)
        return None


def _claim(run: GridRun) -> bool:
    """Take the run for this process (a lock file beside its directory); False if another live process has it."""
    lock = _lock_path(run)
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        owner = _lock_owner(run)
        return owner == os.getpid() if owner is not None else _claim(run)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(str(os.getpid()))
    return True


def _numbered(plan: GridPlan, runs: list[GridRun] | None) -> list[tuple[int, GridRun]]:
    """``(place in the whole grid, run)`` for each of ``runs`` (default: all), in run order."""
    chosen = {r.run_id for r in (plan.runs if runs is None else runs)}
    return [(index, run) for index, run in enumerate(plan.runs, start=1) if run.run_id in chosen]


def execute_grid(
    plan: GridPlan, command: str, log: Callable[[str], None] = print, runs: list[GridRun] | None = None
) -> None:
    """Train every run (of ``runs``, default all) without a results file, in order, rewriting the
    report after each."""
    total = len(plan.runs)
    for index, run in _numbered(plan, runs):
        tag = f"[{index}/{total}] {run.run_id}"
        if load_recorded(plan, run) is not None:
            log(f"{tag}: in {plan.results_dir / RUNS_DIR}, skipped")
            continue
        if not _claim(run):
            log(f"{tag}: being trained by another process, skipped")
            continue
        try:
            status = run_status(run.planned)
            started = time.perf_counter()
            check_run_matches(run.planned, status)  # a run of other settings (a smoke run, say) is not recorded
            if status in ("finished", "diverged"):
                outcome = f"{status} earlier in {run.planned.out}, recorded"
            else:
                outcome = train_run(run.planned, status) + f" in {time.perf_counter() - started:.0f} s"
                if status == "partial":
                    outcome = "resumed: " + outcome
            record_run(plan, run, command)
        finally:
            _lock_path(run).unlink(missing_ok=True)
        log(f"{tag}: {outcome}")
        write_grid_report(plan, command)


def run_grid(
    grid_file: str | os.PathLike,
    *,
    command: str,
    log: Callable[[str], None] = print,
    only: str | None = None,
    **options,
) -> Path:
    """Plan, train what is missing (of the cells ``only`` names, see :func:`select_runs`), and
    report; returns the report's path (options: :func:`plan_grid`)."""
    grid = load_grid(grid_file)
    plan = plan_grid(grid, **options)
    runs = select_runs(plan, only)
    source_version()  # the code this process runs, before anyone edits the tree
    done = sum(results_path(plan, r).is_file() for r in plan.runs)
    selected = f" ({len(runs)} selected by --only {only})" if only is not None else ""
    log(
        f"grid {grid.name}: {len(plan.runs)} run(s){selected}, {done} already in {plan.results_dir / RUNS_DIR}; "
        f"training in {plan.train_dir}"
    )
    try:
        execute_grid(plan, command, log, runs)
    finally:  # stopped by a signal or an error: the report still covers every finished run
        report = write_grid_report(plan, command)
    cells, _ = collect_cells(plan)
    for line in in_short(plan, cells, compare_cells(plan, cells)):
        log(line)
    for line in other_grid_in_short(grid.summary_from, plan) if grid.summary_from is not None else []:
        log(line)
    return report


def describe_plan(plan: GridPlan, runs: list[GridRun] | None = None) -> list[str]:
    """One line per run (of ``runs``, default all): order, id, status (for a partial run, the step
    its checkpoint holds and whether a process is training it now) and the key settings; then the
    count per status (for ``--dry-run``). A results file, or a run in the training folder, made with
    other settings raises :class:`ConfigError`, as it does when the grid runs."""
    from ..engine.checkpoint import checkpoint_dir, list_checkpoints

    lines = []
    counts: dict[str, int] = {}
    numbered = _numbered(plan, runs)
    for index, run in numbered:
        config = run.planned.config
        # A results file of other settings stops the real run; the plan says so the same way.
        state = "recorded" if load_recorded(plan, run) is not None else run_status(run.planned)
        check_run_matches(run.planned, state)  # a run of other settings there stops the real run too
        counts[state] = counts.get(state, 0) + 1
        if state == "partial":
            steps = list_checkpoints(checkpoint_dir(run.planned.out))
            state += f" (checkpoint at step {steps[-1][0]:,} of {config.iterations:,})" if steps else ""
        if state != "recorded" and (owner := _lock_owner(run)) is not None:
            state += f", being trained by process {owner}"
        lines.append(
            f"  {index:3d}. {run.run_id}: {state}; operator={config.operator} width_mult={config.width_mult:g} "
            f"batch_size={config.batch_size} augment={config.augment} iterations={config.iterations} "
            f"eval_every={config.eval_every}"
        )
    of = (
        f"{len(numbered)} selected of {len(plan.runs)} runs"
        if len(numbered) < len(plan.runs)
        else f"{len(plan.runs)} runs"
    )
    lines.append("  " + ", ".join(f"{n} {state}" for state, n in counts.items()) + f" (of {of})")
    return lines
