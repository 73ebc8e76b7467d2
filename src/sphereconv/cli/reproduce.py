"""``sphereconv reproduce``: one command per experiment of Liu et al. (NIPS 2017, Sec. 5).

Trains every variant of the experiment for every seed into ``OUT/EXPERIMENT/<variant>/seed<k>/``
(finished runs are skipped, interrupted ones resumed) and writes ``report.md``, ``results.json``
and PNG plots into ``OUT/EXPERIMENT/``. ``all`` runs every experiment in turn.

``--grid FILE`` runs a grid of regimes x models x seeds instead (a file, or a grid of
:mod:`sphereconv.configs` by name; see :mod:`sphereconv.experiments.grid`): one small results file
per finished run in the grid's results folder, runs already there skipped, and one combined report
with paired statistics.
"""

from __future__ import annotations

import argparse
import shlex

from ..errors import ConfigError
from .parsing import device_name, help_text, output_directory, positive_float, positive_int

ALL = "all"
DEFAULT_SCALE = "small"
DEFAULT_OUT = "runs/reproduce"
# The only scale that applies to a grid (whose file sets every run's size): the plumbing check.
GRID_SCALE = "smoke"


def register(subparsers) -> None:
    """Add the ``reproduce`` subcommand to ``subparsers``."""
    from ..configs import list_grids
    from ..experiments.definitions import EXPERIMENTS
    from ..experiments.scales import SCALES

    scales = "; ".join(f"{s.name}: {s.description}" for s in SCALES.values())
    parser = subparsers.add_parser(
        "reproduce",
        description=help_text(__doc__.split("\n\n")[0]) + f" Scales: {scales}.",
    )
    parser.add_argument(
        "experiment",
        nargs="?",
        choices=[*EXPERIMENTS, ALL],
        metavar="EXPERIMENT",
        help=f"one of: {', '.join(EXPERIMENTS)}, or {ALL} (omit with --grid)",
    )
    parser.add_argument(
        "--grid",
        default=None,
        metavar="NAME_OR_FILE",
        help="run a grid instead of an experiment: a grid file, or the name of one shipped with the package "
        f"({', '.join(list_grids())})",
    )
    parser.add_argument(
        "--results",
        type=output_directory,
        default=None,
        metavar="DIR",
        help="--grid only: folder of the results files and report (default: the grid's)",
    )
    parser.add_argument(
        "--only",
        default=None,
        metavar="CELLS",
        help="--grid only: train only these cells, comma-separated REGIME or REGIME/MODEL (e.g. WL or "
        "Q/linear,Q/sigmoid), to split a grid between workers or machines; the report covers every recorded run",
    )
    parser.add_argument(
        "--scale",
        choices=list(SCALES),
        default=None,
        help=f"run size (default {DEFAULT_SCALE}; with --grid only {GRID_SCALE}, which shrinks every run)",
    )
    parser.add_argument("--dataset", default=None, help="dataset instead of the scale's (e.g. cifar100 at paper scale)")
    parser.add_argument("--data-dir", default=None, help="folder holding the dataset files")
    parser.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    parser.add_argument("--seeds", type=positive_int, default=None, help="seeds per variant (default: the scale's)")
    parser.add_argument(
        "--out", type=output_directory, default=DEFAULT_OUT, help=f"output root (default {DEFAULT_OUT})"
    )
    parser.add_argument("--device", type=device_name, default=None, help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--iterations", type=positive_int, default=None, help="override the scale's iterations per run")
    parser.add_argument("--width-mult", type=positive_float, default=None, help="override the scale's width multiplier")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate every run's config and print the plan without training"
    )
    parser.set_defaults(func=run)


def _options(args: argparse.Namespace) -> dict:
    return {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "download": args.download,
        "seeds": args.seeds,
        "out": args.out,
        "device": args.device,
        "iterations": args.iterations,
        "width_mult": args.width_mult,
        "progress": args.progress,
    }


def _command(args: argparse.Namespace, experiment: str) -> str:
    words = ["sphereconv", "reproduce", experiment, "--scale", args.scale]
    for flag, value in (
        ("--dataset", args.dataset),
        ("--data-dir", args.data_dir),
        ("--seeds", args.seeds),
        ("--out", args.out),
        ("--device", args.device),
        ("--iterations", args.iterations),
        ("--width-mult", args.width_mult),
    ):
        if value is not None:
            words += [flag, str(value)]
    if args.download:
        words.append("--download")
    return shlex.join(words)


def _print_plan(plan) -> None:
    print(
        f"{plan.experiment.name}: {len(plan.runs)} run(s) at scale '{plan.scale.name}' on {plan.dataset} -> {plan.out}"
    )
    for run in plan.runs:
        if run.seed == 0:
            config = run.config
            print(
                f"  {run.variant.name}: model={config.model} operator={config.operator} loss={config.loss} "
                f"width_mult={config.width_mult:g} batch_size={config.batch_size} iterations={config.iterations}"
            )


def _grid_command(args: argparse.Namespace) -> str:
    words = ["sphereconv", "reproduce", "--grid", args.grid]
    for flag, value in (
        ("--scale", args.scale),
        ("--out", args.out),
        ("--results", args.results),
        ("--device", args.device),
        ("--data-dir", args.data_dir),
    ):
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


def run_grid_command(args: argparse.Namespace) -> int:
    """``reproduce --grid FILE``: train the grid's missing runs and write its report."""
    from ..configs import find_grid
    from ..experiments.grid import load_grid, plan_grid, select_runs
    from ..experiments.sweep import describe_plan, run_grid

    if args.experiment is not None:
        raise ConfigError(f"give either an experiment ({args.experiment!r}) or --grid, not both")
    for flag, value in (
        ("--dataset", args.dataset),
        ("--seeds", args.seeds),
        ("--iterations", args.iterations),
        ("--width-mult", args.width_mult),
    ):
        if value is not None:
            raise ConfigError(f"{flag} {value} cannot be combined with --grid: the grid file sets it for every run")
    if args.scale not in (None, GRID_SCALE):
        raise ConfigError(
            f"--scale {args.scale} cannot be combined with --grid (its file sets each run's size); "
            f"only --scale {GRID_SCALE} applies"
        )
    grid_file = find_grid(args.grid)
    options = {
        "out": args.out,
        "results": args.results,
        "smoke": args.scale == GRID_SCALE,
        "device": args.device,
        "data_dir": args.data_dir,
        "download": args.download,
        "progress": args.progress,
    }
    if args.dry_run:
        plan = plan_grid(load_grid(grid_file), **options)
        runs = select_runs(plan, args.only)
        print(
            f"grid {plan.grid.name}: {len(plan.runs)} run(s) -> results {plan.results_dir}, "
            f"training in {plan.train_dir}"
        )
        print("\n".join(describe_plan(plan, runs)))
        return 0
    report = run_grid(grid_file, command=_grid_command(args), only=args.only, **options)
    print(f"report: {report}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run (or with ``--dry-run`` only plan) the experiment(s) or the grid; returns the exit code."""
    if args.grid is not None:
        return run_grid_command(args)
    from ..experiments.definitions import EXPERIMENTS
    from ..experiments.runner import plan_experiment, run_experiment

    if args.experiment is None:
        raise ConfigError(f"name an experiment ({', '.join(EXPERIMENTS)} or {ALL}) or pass --grid FILE")
    for flag, value in (("--results", args.results), ("--only", args.only)):
        if value is not None:
            raise ConfigError(f"{flag} {value} applies only with --grid, not to the experiment {args.experiment!r}")
    args.scale = args.scale or DEFAULT_SCALE
    names = list(EXPERIMENTS) if args.experiment == ALL else [args.experiment]
    if args.dry_run:
        for name in names:
            _print_plan(plan_experiment(name, args.scale, **_options(args)))
        return 0
    for name in names:
        report = run_experiment(name, args.scale, command=_command(args, name), **_options(args))
        print(f"report: {report}")
    return 0
