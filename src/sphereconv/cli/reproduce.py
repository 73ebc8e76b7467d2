"""``sphereconv reproduce``: one command per experiment of Liu et al. (NIPS 2017, Sec. 5).

Trains every variant of the experiment for every seed into ``OUT/EXPERIMENT/<variant>/seed<k>/``
(finished runs are skipped, interrupted ones resumed) and writes ``report.md``, ``results.json``
and PNG plots into ``OUT/EXPERIMENT/``. ``all`` runs every experiment in turn.
"""

from __future__ import annotations

import argparse
import shlex

from ..experiments.definitions import EXPERIMENTS
from ..experiments.scales import SCALES
from .parsing import positive_float, positive_int

ALL = "all"
DEFAULT_SCALE = "small"
DEFAULT_OUT = "runs/reproduce"


def register(subparsers) -> None:
    """Add the ``reproduce`` subcommand to ``subparsers``."""
    scales = "; ".join(f"{s.name}: {s.description}" for s in SCALES.values())
    parser = subparsers.add_parser(
        "reproduce",
        help="run one of the paper's experiments and write a report with plots",
        description=__doc__.split("\n\n")[0] + f" Scales: {scales}.",
    )
    parser.add_argument("experiment", choices=[*EXPERIMENTS, ALL], metavar="EXPERIMENT", help=f"one of: {', '.join(EXPERIMENTS)}, or {ALL}")
    parser.add_argument("--scale", choices=list(SCALES), default=DEFAULT_SCALE, help=f"run size (default {DEFAULT_SCALE})")
    parser.add_argument("--dataset", default=None, help="dataset instead of the scale's (e.g. cifar100 at paper scale)")
    parser.add_argument("--data-dir", default=None, help="folder holding the dataset files")
    parser.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    parser.add_argument("--seeds", type=positive_int, default=None, help="seeds per variant (default: the scale's)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output root (default {DEFAULT_OUT})")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--iterations", type=positive_int, default=None, help="override the scale's iterations per run")
    parser.add_argument("--width-mult", type=positive_float, default=None, help="override the scale's width multiplier")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--dry-run", action="store_true", help="validate every run's config and print the plan without training")
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
    for flag, value in (("--dataset", args.dataset), ("--data-dir", args.data_dir), ("--seeds", args.seeds),
                        ("--out", args.out), ("--device", args.device), ("--iterations", args.iterations),
                        ("--width-mult", args.width_mult)):
        if value is not None:
            words += [flag, str(value)]
    if args.download:
        words.append("--download")
    return shlex.join(words)


def _print_plan(plan) -> None:
    print(f"{plan.experiment.name}: {len(plan.runs)} run(s) at scale '{plan.scale.name}' on {plan.dataset} -> {plan.out}")
    for run in plan.runs:
        if run.seed == 0:
            config = run.config
            print(
                f"  {run.variant.name}: model={config.model} operator={config.operator} loss={config.loss} "
                f"width_mult={config.width_mult:g} batch_size={config.batch_size} iterations={config.iterations}"
            )


def run(args: argparse.Namespace) -> int:
    """Run (or with ``--dry-run`` only plan) the experiment(s); returns the exit code."""
    from ..experiments.runner import plan_experiment, run_experiment

    names = list(EXPERIMENTS) if args.experiment == ALL else [args.experiment]
    if args.dry_run:
        for name in names:
            _print_plan(plan_experiment(name, args.scale, **_options(args)))
        return 0
    for name in names:
        report = run_experiment(name, args.scale, command=_command(args, name), **_options(args))
        print(f"report: {report}")
    return 0
