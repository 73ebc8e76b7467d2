"""Entry point of the ``sphereconv`` command line.

Subcommands: ``train``, ``eval``, ``export``, ``inspect``, ``list-models``, ``list-datasets``, ``reproduce``
(the paper's experiments, Liu et al. NIPS 2017 Sec. 5), ``plot``, ``selftest`` and ``bench``.

Only the parser of the command being run gets its arguments (and imports what their choices need),
so ``sphereconv --help`` imports no torch; the command modules import torch, numpy and
matplotlib inside the functions that use them.

Errors reported as one line ``sphereconv: error: ...`` on stderr, exit code 2:

- the package's own errors (:class:`~sphereconv.errors.SphereconvError`: bad flags, invalid
  configs or arguments, missing data or checkpoints);
- file-system errors about a path (:func:`is_path_error`: it does not exist, is not readable or
  writable, is a folder where a file is needed or the reverse, is too long, lies on a read-only or
  full file system): every path the CLI opens comes from the user, and the message names it.

Anything else is a bug and keeps its traceback. An interrupt exits with code 1. Set
``SPHERECONV_DEBUG=1`` to get the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Collection, Sequence

from .. import __version__
from .._memory import keep_freed_memory
from ..errors import SphereconvError
from .parsing import EXIT_INTERRUPTED, OneLineArgumentParser

PROG = "sphereconv"
# Exit code for user errors (argparse's convention); EXIT_INTERRUPTED (1) for a run stopped by a signal.
EXIT_USER_ERROR = 2
# Exit code when stdout's reader has gone: 128 + SIGPIPE (13), what a shell reports for a process SIGPIPE ends.
EXIT_BROKEN_PIPE = 141
DEBUG_ENV = "SPHERECONV_DEBUG"

# Command -> (module of sphereconv.cli whose register(subparsers) adds it, one-line summary for --help).
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train a model"),
    "eval": ("evaluate", "evaluate a checkpoint on its test set"),
    "export": ("export", "export a trained network for inference (ONNX, torch.export, safetensors)"),
    "inspect": ("inspect", "per-layer statistics and plots of a run or checkpoint"),
    "list-models": ("listing", "list the registered models"),
    "list-datasets": ("listing", "list the supported datasets"),
    "reproduce": ("reproduce", "run one of the paper's experiments and write a report with plots"),
    "plot": ("plot", "overlay learning curves of finished runs"),
    "selftest": (
        "selftest",
        "check every SphereConv operator and layer against the reference implementation on this hardware",
    ),
    "bench": ("bench", "time SphereConv layers (and SphereNet-9 training steps) against plain convolutions"),
}

# File-system errors about a path, reported as one line: these OSError subclasses, and plain
# OSErrors with one of PATH_ERRNOS. Other OSErrors (a bad file descriptor, a broken pipe or
# connection, an I/O error of the device) are bugs or hardware faults and keep their traceback.
PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
PATH_ERRNOS = frozenset({errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOSPC, errno.EDQUOT})


class _Subcommands(argparse._SubParsersAction):
    """The subcommand action, listing each command with its summary from :data:`COMMANDS`."""

    def add_parser(self, name: str, **kwargs):
        kwargs.setdefault("help", COMMANDS[name][1])
        return super().add_parser(name, **kwargs)


def build_parser(commands: Collection[str] | None = None) -> OneLineArgumentParser:
    """The top-level parser; the parsers of ``commands`` (default: all) get their arguments.

    The other commands are listed by name and summary only, so that building the parser for one
    command (or for ``--help``) imports only what that command's arguments need.
    """
    parser = OneLineArgumentParser(
        prog=PROG,
        description="Deep hyperspherical learning (SphereConv / SphereNet, Liu et al. NIPS 2017) for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, action=_Subcommands)
    modules = {module for module, _ in COMMANDS.values()} if commands is None else {COMMANDS[c][0] for c in commands}
    for name, (module_name, _) in COMMANDS.items():
        if name in subparsers.choices:  # a module that registers several commands added it
            continue
        if module_name in modules:
            importlib.import_module(f".{module_name}", __package__).register(subparsers)
        else:
            subparsers.add_parser(name)
    return parser


def requested_command(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (its first word that is not an option), if it is one."""
    for word in argv:
        if not word.startswith("-"):  # the top-level options (--help, --version) take no value
            return word if word in COMMANDS else None
    return None


def is_path_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a file-system error about a path that the command line reports as one line."""
    return isinstance(exc, PATH_ERRORS) or (isinstance(exc, OSError) and exc.errno in PATH_ERRNOS)


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "no")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if (
        isinstance(exc, OSError)
        and not isinstance(exc, SphereconvError)
        and exc.filename
        and str(exc.filename) not in text
    ):
        text = f"{text}: {exc.filename}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command = requested_command(argv)
        parser = build_parser([command] if command else [])
        args = parser.parse_args(argv)
        keep_freed_memory()  # every command runs models: reuse freed blocks instead of faulting them in
        return int(args.func(args) or 0)
    except SystemExit as exc:  # --help and --version exit through argparse
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        if _debug():
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (``sphereconv ... | head``): stop quietly, as other commands do.
        # Point stdout at /dev/null so that the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (SphereconvError, OSError) as exc:
        if _debug() or not (isinstance(exc, SphereconvError) or is_path_error(exc)):
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
