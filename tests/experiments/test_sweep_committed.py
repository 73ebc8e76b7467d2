"""The committed results of the pre-registered sweep (docs/results/sweep) are complete and current:
every run its report counts has its results file in the repository, made with the grid file's
settings, so a fresh clone (and the quick start's summary of the sweep) sees the same runs."""

from __future__ import annotations

import re
from pathlib import Path

from sphereconv.configs import find_grid
from sphereconv.experiments.grid import RUNS_DIR, load_grid, plan_grid
from sphereconv.experiments.grid_report import collect_cells

REPOSITORY = Path(__file__).resolve().parents[2]


def test_every_run_the_report_counts_has_its_committed_results_file(monkeypatch):
    monkeypatch.chdir(REPOSITORY)  # the grid names its results folder relative to the repository
    plan = plan_grid(load_grid(find_grid("claims")), progress=False)
    report = (plan.results_dir / "report.md").read_text()
    counted, planned = map(int, re.search(r"runs finished: (\d+) of (\d+)", report).groups())
    cells, _ = collect_cells(plan, strict=True)  # a file made with other settings raises
    recorded = sorted(f"{c.regime.name}-{c.model.name}-s{seed}" for c in cells for seed in c.documents)
    files = sorted(path.stem for path in (plan.results_dir / RUNS_DIR).glob("*.json"))
    assert planned == len(plan.runs)
    assert counted > 0, "the report counts no finished run"
    assert recorded == files
    assert len(files) >= counted, f"the report counts {counted} runs but only {len(files)} results files exist"
