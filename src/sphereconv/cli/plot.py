"""``sphereconv plot``: overlay learning curves of finished runs into one PNG."""

from __future__ import annotations

import argparse

from .parsing import output_file


def register(subparsers) -> None:
    """Add the ``plot`` subcommand to ``subparsers``."""
    from ..experiments.overlay import METRICS

    parser = subparsers.add_parser(
        "plot",
        description="Overlay finished runs (directories with metrics.jsonl, or reproduce outputs holding many) "
        "in one plot.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run directory or a directory of runs")
    parser.add_argument("--out", type=output_file, required=True, metavar="FILE.png", help="PNG file to write")
    parser.add_argument(
        "--metric", default="test_acc", choices=METRICS, help="what to plot against iterations (default test_acc)"
    )
    parser.add_argument("--title", default=None, help="plot title")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Overlay the runs into the PNG given by ``--out``; returns the exit code."""
    from ..experiments.overlay import overlay_runs

    path = overlay_runs(args.runs, args.out, metric=args.metric, title=args.title)
    print(f"wrote {path}")
    return 0
