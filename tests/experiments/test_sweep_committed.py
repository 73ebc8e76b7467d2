"""The committed results of the pre-registered sweep (docs/results/sweep) are complete and current:
every run its report counts has its results file in the repository, made with the grid file's
settings, so a fresh clone (and the quick start's summary of the sweep) sees the same runs."""

from __future__ import annotations

import re
from pathlib import Path

from sphereconv.configs import find_grid
from sphereconv.experiments.grid import RUNS_DIR, load_grid, plan_grid
from sphereconv.experiments.grid_report import collect_cells, compare_cells

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


# A row of the README's table of the sweep: regime, seed pairs, CNN-9 and SphereNet-9 cosine means
# over the paired seeds, and the paired difference with its interval (absent for one pair).
README_ROW = re.compile(
    r"^\| `(?P<regime>\w+)`[^|]*\|[^|]*\|[^|]*\|[^|]*\| (?P<pairs>\d+) \| (?P<cnn>[\d.]+)% \| (?P<sphere>[\d.]+)% "
    r"\| (?P<mean>[+-][\d.]+)(?: \[(?P<low>[+-][\d.]+), (?P<high>[+-][\d.]+)\])?",
    re.M,
)


def test_the_readme_table_of_the_sweep_matches_the_committed_results(monkeypatch):
    monkeypatch.chdir(REPOSITORY)
    plan = plan_grid(load_grid(find_grid("claims")), progress=False)
    cells, _ = collect_cells(plan, strict=True)
    by_key = {(c.regime.name, c.model.name): c for c in cells}
    comparisons = {c.regime.name: c for c in compare_cells(plan, cells) if c.model.name == "cosine"}
    rows = list(README_ROW.finditer((REPOSITORY / "README.md").read_text()))
    # Every regime with a finished cosine-vs-CNN pair has its row, and no other.
    assert sorted(row["regime"] for row in rows) == sorted(r for r, c in comparisons.items() if c.accuracy.n > 0)
    for row in rows:
        regime, comparison = row["regime"], comparisons[row["regime"]]
        seeds = comparison.accuracy.seeds
        assert int(row["pairs"]) == len(seeds), regime
        for column, model in (("cnn", "cnn"), ("sphere", "cosine")):
            assert float(row[column]) == round(100 * by_key[(regime, model)].mean_over(seeds), 2), (regime, model)
        difference = comparison.accuracy.difference
        assert float(row["mean"]) == round(100 * difference.mean, 2), regime
        if len(seeds) > 1:
            assert (float(row["low"]), float(row["high"])) == (
                round(100 * difference.low, 2),
                round(100 * difference.high, 2),
            ), regime
