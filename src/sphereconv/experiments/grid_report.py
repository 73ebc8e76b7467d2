"""The combined report of a grid: ``RESULTS/report.md`` and its plots, from the results files.

Per cell (regime x model) the mean final test accuracy over seeds with its 95% interval; per
SphereNet-vs-baseline pair the paired difference over seeds (Student t), its verdict under the
pre-registered rules of docs/RESULTS.md, iterations to a fixed accuracy, and the effect against
width and run length (the paper's claims: Liu et al., NIPS 2017, Sec. 5.1-5.2).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .grid import RUNS_DIR, GridPlan, Named, load_grid, load_recorded, plan_grid
from .plots import plot_curves, plot_effects
from .report import describe_machine
from .results import iterations_to_reach, series, thresholds_for
from .stats import PairedComparison, has_spread, mean_interval, paired_comparison

REPORT_FILE = "report.md"
# Verdicts need at least this many paired seeds (the protocol's minimum).
MIN_SEEDS_FOR_VERDICT = 3
# Iterations-to-accuracy mark of the convergence comparison (protocol: 85% on Fashion-MNIST).
CONVERGENCE_MARK = 0.85
# Pending comparisons beyond this many are counted rather than listed in the verdict lines.
MAX_LISTED_PENDING = 4
# Where the reports point readers for the protocol and the discussion.
RESULTS_PAGE = "docs/RESULTS.md"
# Verdict of a comparison whose pairs all differ by the same non-zero amount: the paired t-test needs
# spread (an addition to the protocol, docs/RESULTS.md; by a sign test, 3 equal signs have p = 0.25).
NO_VERDICT = "no verdict (every pair differs by the same amount: no spread to test)"


@dataclass
class Cell:
    """The finished runs of one regime x model: seed -> results document."""

    regime: Named
    model: Named
    planned_seeds: tuple[int, ...]
    documents: dict[int, dict]

    def values(self, key: str) -> dict[int, float]:
        return {
            s: d["summary"][key]
            for s, d in self.documents.items()
            if "summary" in d and d["summary"].get(key) is not None
        }

    def mean_over(self, seeds: tuple[int, ...], key: str = "final_test_acc") -> float:
        """The mean of ``key`` over ``seeds`` (the seeds a paired comparison used)."""
        values = self.values(key)
        return sum(values[s] for s in seeds) / len(seeds)

    def iterations_to(self, mark: float) -> dict[int, int | None]:
        """Seed -> the first evaluated iteration at or above ``mark``, None where it was never reached
        (a diverged run, which has no metrics, never reached it)."""
        return {
            s: iterations_to_reach(d["metrics"], mark) if "metrics" in d else None for s, d in self.documents.items()
        }


def collect_cells(plan: GridPlan, strict: bool = True) -> tuple[list[Cell], int]:
    """Cells in stage order with whatever results files exist, and how many files were ignored.

    A file made with other settings raises :class:`ConfigError`, or with ``strict=False`` is
    ignored and counted.
    """
    cells: dict[tuple[str, str], Cell] = {}
    ignored = 0
    for run in plan.runs:
        key = (run.regime.name, run.model.name)
        cell = cells.setdefault(key, Cell(run.regime, run.model, (), {}))
        cell.planned_seeds += (run.seed,)
        try:
            document = load_recorded(plan, run)
        except ConfigError:
            if strict:
                raise
            ignored, document = ignored + 1, None
        if document is not None:
            cell.documents[run.seed] = document
    return list(cells.values()), ignored


def _pct(value: float) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def _estimate_text(values: list[float]) -> str:
    estimate = mean_interval(values)
    if estimate.n == 0:
        return "—"
    if estimate.n == 1:
        return f"{_pct(estimate.mean)} (1 seed)"
    return f"{_pct(estimate.mean)} [{_pct(estimate.low)}, {_pct(estimate.high)}]"


def verdict(comparison: PairedComparison, lower_is_better: bool = False) -> str:
    """The protocol's verdict: better / worse / no detectable difference, or pending (< 3 pairs).

    Every pair differing by the same non-zero amount (iterations to a mark are multiples of the
    evaluation interval, so this happens) leaves the t-test undefined: :data:`NO_VERDICT`.
    """
    if comparison.n < MIN_SEEDS_FOR_VERDICT:
        return f"pending ({comparison.n}/{MIN_SEEDS_FOR_VERDICT} paired seeds)"
    if comparison.difference.mean != 0.0 and not has_spread(comparison.difference):
        return NO_VERDICT
    low, high = comparison.difference.low, comparison.difference.high
    if lower_is_better:
        low, high = -high, -low
    if low > 0:
        return "SphereNet better"
    if high < 0:
        return "SphereNet worse"
    return "no detectable difference"


@dataclass
class Comparison:
    regime: Named
    model: Named
    accuracy: PairedComparison
    best: PairedComparison
    convergence: PairedComparison | None  # None unless every paired seed of both reached the mark
    reached: tuple[int, int, int]  # seeds of the model and of the baseline that reached the mark, of n


def compare_cells(plan: GridPlan, cells: list[Cell]) -> list[Comparison]:
    """Every non-baseline cell against the baseline cell of its regime."""
    baselines = {c.regime.name: c for c in cells if c.model.name == plan.grid.baseline}
    comparisons = []
    for cell in cells:
        base = baselines.get(cell.regime.name)
        if cell.model.name == plan.grid.baseline or base is None:
            continue
        accuracy = paired_comparison(cell.values("final_test_acc"), base.values("final_test_acc"))
        best = paired_comparison(cell.values("best_test_acc"), base.values("best_test_acc"))
        mine, theirs = cell.iterations_to(CONVERGENCE_MARK), base.iterations_to(CONVERGENCE_MARK)
        shared = sorted(set(mine) & set(theirs))
        mine_reached = {s: float(n) for s in shared if (n := mine[s]) is not None}
        theirs_reached = {s: float(n) for s in shared if (n := theirs[s]) is not None}
        reached = (len(mine_reached), len(theirs_reached), len(shared))
        convergence = None
        if shared and reached[0] == reached[1] == len(shared):
            convergence = paired_comparison(mine_reached, theirs_reached)
        comparisons.append(Comparison(cell.regime, cell.model, accuracy, best, convergence, reached))
    return comparisons


def _points(comparison: PairedComparison, scale: float = 100.0, digits: int = 2) -> tuple[str, str, str]:
    d = comparison.difference
    if d.n == 0:
        return "—", "—", "—"
    mean = f"{scale * d.mean:+.{digits}f}"
    interval = "—" if d.n < 2 else f"[{scale * d.low:+.{digits}f}, {scale * d.high:+.{digits}f}]"
    p = "—" if not math.isfinite(comparison.p_value) else f"{comparison.p_value:.3f}"
    return mean, interval, p


def _regime_description(plan: GridPlan, regime: Named) -> str:
    config = next(r.planned.config for r in plan.runs if r.regime.name == regime.name)
    return f"width {config.width_mult:g}, batch {config.batch_size}, {config.augment}, {config.iterations} iterations"


def comparison_lines(plan: GridPlan, comparisons: list[Comparison]) -> list[str]:
    """One plain sentence per comparison (used by this report and by reports that summarise it)."""
    lines = []
    for c in comparisons:
        mean, interval, p = _points(c.accuracy)
        baseline = plan.grid.models[plan.grid.baseline].label
        text = f"`{c.regime.name}` ({_regime_description(plan, c.regime)}), {c.model.label} vs {baseline}: "
        if c.accuracy.n == 0:
            lines.append(text + "not run yet")
            continue
        lines.append(
            f"{text}{verdict(c.accuracy)}; final accuracy difference {mean} points, 95% CI {interval}, "
            f"p = {p}, {c.accuracy.n} seed(s)"
        )
    return lines


def _grouped(by_outcome: dict[str, list[str]]) -> str:
    """``outcome: model@regime, ...; ...``, with long pending lists shortened to a count."""
    parts = []
    for outcome, names in by_outcome.items():
        listed = (
            f"{len(names)} comparisons"
            if outcome == "pending" and len(names) > MAX_LISTED_PENDING
            else ", ".join(names)
        )
        parts.append(f"{outcome}: {listed}")
    return "; ".join(parts) or "no results yet"


def _interval_text(low: float, high: float) -> str:
    """``[low, high]`` in signed points, or what stands in for it where one seed pair gives none."""
    return (
        f"[{low:+.2f}, {high:+.2f}]" if math.isfinite(low) and math.isfinite(high) else "(one seed pair, no interval)"
    )


def _spans_values(points: list) -> bool:
    """Whether effect points ``(x, mean, low, high)`` cover two or more widths (or lengths): two
    regimes at one width that differ in another setting are no trend."""
    return len({x for x, *_ in points}) > 1


def claim_conclusions(plan: GridPlan, comparisons: list[Comparison]) -> list[str]:
    """The protocol's claims, each with the verdicts so far, in plain words."""
    by_verdict: dict[str, list[str]] = {}
    for c in comparisons:
        by_verdict.setdefault(verdict(c.accuracy).split(" (")[0], []).append(f"{c.model.name}@{c.regime.name}")
    accuracy = _grouped(by_verdict)
    speed: dict[str, list[str]] = {}
    for c in comparisons:
        if c.convergence is not None:
            key = verdict(c.convergence, lower_is_better=True).split(" (")[0]
        elif c.reached[2]:
            key = "not every seed reached 85%"
        else:
            key = "pending"
        speed.setdefault(key, []).append(f"{c.model.name}@{c.regime.name}")
    convergence = _grouped(speed)
    lines = [
        f"**SphereNets at least as accurate as CNN-9** (final accuracy, paired): {accuracy}.",
        f"**SphereNets converge faster** (iterations to {100 * CONVERGENCE_MARK:g}%, paired): {convergence}.",
    ]
    for vary, words in (("width_mult", "width"), ("iterations", "run length")):
        groups = {
            label: sorted(points)
            for label, points in _effect_groups(plan, comparisons, vary).items()
            if _spans_values(points)
        }
        if groups:
            trend = "; ".join(
                f"{label}: "
                + ", ".join(f"{x:g} -> {mean:+.2f} {_interval_text(low, high)}" for x, mean, low, high in points)
                for label, points in groups.items()
            )
            lines.append(
                f"**The gain grows with {words}** "
                f"(paired final-accuracy difference in points, 95% CI, by {words}): {trend}."
            )
        else:
            lines.append(
                f"**The gain grows with {words}:** pending "
                f"(no model has paired results at two {words}s with the rest fixed yet)."
            )
    return lines


def _in_words(comparison: Comparison) -> str:
    """What a comparison's final-accuracy interval says, in words a first-time reader follows."""
    n = comparison.accuracy.n
    if n < 2:
        return "one seed pair gives no interval, so this is not yet evidence either way"
    if n < MIN_SEEDS_FOR_VERDICT:
        return (
            f"with {n} seed pairs the interval is wide; the protocol needs {MIN_SEEDS_FOR_VERDICT} before it "
            "calls a difference"
        )
    return {
        "SphereNet worse": "the whole interval is below zero, so at this size the SphereNet is less accurate",
        "SphereNet better": "the whole interval is above zero, so at this size the SphereNet is more accurate",
        "no detectable difference": "the interval includes zero, so no difference is detectable",
        NO_VERDICT: "every seed pair differs by the same amount, which leaves no spread to test",
    }[verdict(comparison.accuracy)]


def in_short(plan: GridPlan, cells: list[Cell], comparisons: list[Comparison]) -> list[str]:
    """The report's opening: each comparison with a finished pair of runs as one sentence (the
    difference, its interval, the seed pairs and what they allow one to conclude). The two accuracies
    it quotes are means over the paired seeds, so that they differ by the difference it states."""
    by_key = {(c.regime.name, c.model.name): c for c in cells}
    baseline = plan.grid.models[plan.grid.baseline]
    lines = []
    for c in comparisons:
        if c.accuracy.n == 0:
            continue
        d = c.accuracy.difference
        where = f"{abs(100 * d.mean):.2f} points {'above' if d.mean > 0 else 'below'}" if d.mean else "level with"
        interval = "" if d.n < 2 else f", 95% interval {100 * d.low:+.2f} to {100 * d.high:+.2f}"
        seeds = c.accuracy.seeds
        ours = by_key[(c.regime.name, c.model.name)].mean_over(seeds)
        theirs = by_key[(c.regime.name, baseline.name)].mean_over(seeds)
        lines.append(
            f"In regime `{c.regime.name}`, {c.model.label} ended {where} "
            f"{baseline.label} ({_pct(ours)}% vs {_pct(theirs)}% final test accuracy; paired by seed"
            f"{interval}; {c.accuracy.n} seed pair(s)): {_in_words(c)}."
        )
    lines = lines or ["No comparison has a finished pair of runs yet."]
    if plan.smoke:
        lines.insert(0, "Smoke scale (a check of the plumbing, a few iterations per run): these numbers mean nothing.")
    return lines


def other_grid_in_short(path: Path, plan: GridPlan) -> list[str]:
    """The opening's lines on the grid at ``path`` (``summary_from``): its comparisons that this grid
    repeats with the same settings, and how all its comparisons of 3 or more seed pairs came out."""
    other_plan = plan_grid(load_grid(path), progress=False)
    cells, _ = collect_cells(other_plan, strict=False)
    comparisons = compare_cells(other_plan, cells)
    mine = {(r.regime.name, r.model.name): plan.grid.overrides(r.regime, r.model) for r in plan.runs}
    lines = []
    for c in comparisons:
        key = (c.regime.name, c.model.name)
        same = mine.get(key) == other_plan.grid.overrides(c.regime, c.model)
        if same and c.accuracy.n >= MIN_SEEDS_FOR_VERDICT:
            d = c.accuracy.difference
            lines.append(
                f"The full sweep ran the same regime `{c.regime.name}` with {c.accuracy.n} seed pairs: "
                f"{c.model.label} {abs(100 * d.mean):.2f} points {'above' if d.mean > 0 else 'below'} "
                f"{other_plan.grid.models[other_plan.grid.baseline].label}, 95% interval {100 * d.low:+.2f} to "
                f"{100 * d.high:+.2f}: {_in_words(c)}."
            )
    counts: dict[str, int] = {}
    for c in comparisons:
        if c.accuracy.n >= MIN_SEEDS_FOR_VERDICT:
            counts[verdict(c.accuracy)] = counts.get(verdict(c.accuracy), 0) + 1
    if counts:
        parts = [
            f"{counts[key]} {words}"
            for key, words in (
                ("SphereNet better", "with the SphereNet more accurate"),
                ("no detectable difference", "with no detectable difference"),
                (NO_VERDICT, "with every pair differing by the same amount (no verdict)"),
                ("SphereNet worse", "with the SphereNet less accurate"),
            )
            if key in counts
        ]
        lines.append(
            f"Over all its regimes and operators, the sweep has {sum(counts.values())} finished comparison(s) of "
            f"{MIN_SEEDS_FOR_VERDICT} or more seed pairs: {', '.join(parts)} (listed in the last section)."
        )
    return lines


def _effect_groups(
    plan: GridPlan, comparisons: list[Comparison], vary: str
) -> dict[str, list[tuple[float, float, float, float]]]:
    """Effect points (x, mean, low, high in points) grouped by model and the settings held fixed."""
    groups: dict[str, list[tuple[float, float, float, float]]] = {}
    for c in comparisons:
        d = c.accuracy.difference
        if d.n == 0:
            continue
        config = next(r.planned.config for r in plan.runs if r.regime.name == c.regime.name)
        held = {"width_mult": f"{config.iterations} it", "iterations": f"width {config.width_mult:g}"}[vary]
        label = f"{c.model.name}, {held}, batch {config.batch_size}, {config.augment}"
        groups.setdefault(label, []).append((float(getattr(config, vary)), 100 * d.mean, 100 * d.low, 100 * d.high))
    return groups


def _results_page_link(out: Path) -> str:
    """A markdown link to the results page: relative from a folder of the same tree, else absolute."""
    page = Path(RESULTS_PAGE).resolve()
    if not page.is_file():
        return f"`{RESULTS_PAGE}` of the source tree"
    try:
        Path(out).resolve().relative_to(Path.cwd())
    except ValueError:
        return f"[{RESULTS_PAGE}]({page.as_uri()})"
    return f"[{RESULTS_PAGE}]({os.path.relpath(page, Path(out).resolve())})"


def write_grid_report(plan: GridPlan, command: str) -> Path:
    """Rewrite ``report.md`` and its plots in the results folder from the results files present."""
    grid, out = plan.grid, plan.results_dir
    out.mkdir(parents=True, exist_ok=True)
    cells, _ = collect_cells(plan)
    comparisons = compare_cells(plan, cells)
    thresholds = [t for t in thresholds_for(plan.runs[0].planned.config.dataset)][:3]
    done = sum(len(c.documents) for c in cells)
    finished = sorted(d["finished"] for c in cells for d in c.documents.values() if d.get("finished"))
    machines = sorted({d.get("machine", "") for c in cells for d in c.documents.values()})
    parts = [
        f"# {grid.title} (grid `{grid.name}`)",
        "",
        f"- command: `{command}`",
        f"- grid file: `{grid.path}`; protocol and discussion: {_results_page_link(out)}",
        f"- runs finished: {done} of {len(plan.runs)}"
        + (f", between {finished[0]} and {finished[-1]}" if finished else ""),
        f"- machine: {'; '.join(machines) or describe_machine()}",
    ]
    if plan.smoke:
        parts.append(
            "- **smoke scale**: every run shrunk to a few iterations on a few hundred images; the numbers mean nothing"
        )
    parts += ["", "## In short", ""] + [f"- {line}" for line in in_short(plan, cells, comparisons)]
    if grid.summary_from is not None:
        parts += [line for text in other_grid_in_short(grid.summary_from, plan) for line in ("", text)]
    parts += ["", "## Verdicts (pre-registered rules; primary measure: final test accuracy)", ""]
    parts += [f"- {line}" for line in claim_conclusions(plan, comparisons)]
    parts += [
        "",
        "| regime | model vs baseline | seeds | final acc. difference (points) | 95% CI | p (paired t) | verdict "
        "| best acc. difference [95% CI] | iterations to 85%: difference [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        mean, interval, p = _points(c.accuracy)
        best_mean, best_interval, _ = _points(c.best)
        best = "—" if c.best.n == 0 else f"{best_mean} {best_interval}"
        if c.convergence is not None:
            conv_mean, conv_interval, _ = _points(c.convergence, scale=1.0, digits=0)
            convergence = f"{conv_mean} {conv_interval}"
        else:
            convergence = f"reached by {c.reached[0]} / {c.reached[1]} of {c.reached[2]} seeds" if c.reached[2] else "—"
        parts.append(
            f"| `{c.regime.name}` | {c.model.name} vs {grid.baseline} | {c.accuracy.n} | {mean} | {interval} | {p} | "
            f"{verdict(c.accuracy)} | {best} | {convergence} |"
        )
    header = ["regime", "model", "seeds done", "final acc. % mean [95% CI]", "best acc. % mean [95% CI]"]
    header += [f"iters to {100 * t:g}% (seeds reaching)" for t in thresholds] + ["images/s"]
    parts += ["", "## Cells", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    pending = []
    for cell in cells:
        n = len(cell.documents)
        if n == 0:
            pending.append(f"`{cell.regime.name}`/{cell.model.name}")
        reach = []
        for t in thresholds:
            steps = [s for s in cell.iterations_to(t).values() if s is not None]
            reach.append("—" if not steps else f"{sum(steps) / len(steps):,.0f} ({len(steps)}/{n})")
        speeds = [v for v in cell.values("images_per_second").values()]
        diverged = sum("diverged" in d for d in cell.documents.values())
        seeds_text = f"{n}/{len(cell.planned_seeds)}" + (f" ({diverged} diverged)" if diverged else "")
        parts.append(
            "| "
            + " | ".join(
                [
                    f"`{cell.regime.name}`",
                    cell.model.label,
                    seeds_text,
                    _estimate_text(list(cell.values("final_test_acc").values())),
                    _estimate_text(list(cell.values("best_test_acc").values())),
                    *reach,
                    f"{sum(speeds) / len(speeds):,.0f}" if speeds else "—",
                ]
            )
            + " |"
        )
    parts += ["", "Regimes:", ""]
    parts += [
        f"- `{r.name}`: {r.label} ({_regime_description(plan, r)})"
        for r in grid.regimes.values()
        if any(x.regime.name == r.name for x in plan.runs)
    ]
    if pending:
        parts += ["", f"Pending cells (no finished run yet): {', '.join(pending)}."]
    parts += ["", "## Plots", ""]
    for regime in grid.regimes.values():
        regime_cells = [c for c in cells if c.regime.name == regime.name and c.documents]
        if not regime_cells:
            continue
        curves = {
            c.model.label: [series(d["metrics"], "test_acc") for d in c.documents.values() if "metrics" in d]
            for c in regime_cells
        }
        name = f"test_acc_{regime.name}.png"
        plot_curves(
            curves,
            out / name,
            title=f"{grid.name} `{regime.name}`: {_regime_description(plan, regime)} (mean over seeds, range shaded)",
        )
        parts.append(f"![test accuracy, regime {regime.name}]({name})")
    for vary, xlabel, name in (
        ("width_mult", "width multiplier", "effect_width.png"),
        ("iterations", "iterations", "effect_length.png"),
    ):
        groups = _effect_groups(plan, comparisons, vary)
        if any(_spans_values(points) for points in groups.values()):
            plot_effects(
                groups,
                out / name,
                xlabel=xlabel,
                log_x=True,
                title=f"{grid.name}: SphereNet - CNN (paired, 95% CI) against {xlabel}",
            )
            parts.append(f"![effect against {xlabel}]({name})")
    parts += [
        "",
        "Accuracies are on the test set named by the runs' settings, in percent; intervals are 95% "
        "Student-t intervals over seeds; differences are paired by seed (same data order and "
        "augmentation). `iters to X%` is the first evaluated iteration at or above X%.",
    ]
    if grid.summary_from is not None:
        parts += ["", *summary_of_other_grid(grid.summary_from, out)]
    report = out / REPORT_FILE
    temporary = report.with_suffix(f".md.{os.getpid()}.tmp")  # two workers may report at once
    temporary.write_text("\n".join(parts) + "\n")
    temporary.replace(report)
    return report


def summary_of_other_grid(path: Path, report_dir: Path) -> list[str]:
    """Markdown lines summarising the committed results of the grid file at ``path``.

    The lines go into a report written in ``report_dir``.
    """
    other = load_grid(path)
    plan = plan_grid(other, progress=False)
    link = (
        f"Protocol, all cells and discussion: {_results_page_link(report_dir)} and `{plan.results_dir / REPORT_FILE}`."
    )
    cells, ignored = collect_cells(plan, strict=False)
    done = sum(len(c.documents) for c in cells)
    if ignored:
        link += f" ({ignored} results file(s) unreadable or made with settings other than the grid's are left out.)"
    title = f"## What the full sweep (`{other.path}`) has found so far"
    if done == 0 and not (plan.results_dir / RUNS_DIR).is_dir():
        return [
            title,
            "",
            f"Its results folder `{plan.results_dir}` is not found from the working directory `{Path.cwd()}` "
            f"(the grid file gives it relative to the working directory). {link}",
        ]
    if done == 0:
        return [title, "", f"No run of the sweep has finished yet ({len(plan.runs)} planned). {link}"]
    comparisons = compare_cells(plan, cells)
    lines = [title, "", f"{done} of {len(plan.runs)} runs finished. {link}", ""]
    lines += [f"- {line}" for line in claim_conclusions(plan, comparisons)[:2]]
    lines += [f"- {line}" for line in comparison_lines(plan, comparisons) if not line.endswith("not run yet")]
    return lines
