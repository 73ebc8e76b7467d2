"""Entry point of the ``sphereconv`` command line.

Subcommands: ``train``, ``eval``, ``inspect``, ``list-models``, ``list-datasets``, ``reproduce`` (the paper's
experiments, Liu et al. NIPS 2017 Sec. 5), ``plot``, ``selftest`` and, when installed, ``bench``. User errors
(bad flags, invalid configs, missing data or checkpoints) print one line
``sphereconv: error: ...`` on stderr and exit with code 2; an interrupt exits with code 1. Set
``SPHERECONV_DEBUG=1`` to get the full traceback instead.
"""

from __future__ import annotations

import os
import sys

from .. import __version__
from ..errors import SphereconvError
from . import evaluate, inspect, listing, plot, reproduce, selftest, train
from .parsing import OneLineArgumentParser

try:  # the benchmark subcommand is optional: the CLI works without it
    from . import bench
except ImportError:
    bench = None

PROG = "sphereconv"
# Exit codes: 2 for user errors (argparse's convention), 1 for an interrupted run.
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 1
DEBUG_ENV = "SPHERECONV_DEBUG"

# Errors reported as one line: the package's own user errors, invalid values/types met while
# building a config, model or loss, and file-system problems (unwritable --out, unreadable file).
USER_ERRORS = (SphereconvError, ValueError, TypeError, OSError)


def build_parser() -> OneLineArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = OneLineArgumentParser(
        prog=PROG,
        description="Deep hyperspherical learning (SphereConv / SphereNet, Liu et al. NIPS 2017) for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = [train, evaluate, inspect, listing, reproduce, plot, selftest]
    if bench is not None:
        modules.append(bench)
    for module in modules:
        module.register(subparsers)
    return parser


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "no")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and not isinstance(exc, SphereconvError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except SystemExit as exc:  # --help and --version exit through argparse
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        if _debug():
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as exc:
        if _debug():
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
