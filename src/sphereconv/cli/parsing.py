"""Argument parsing helpers shared by the subcommands.

Every user error the command line reports is one line (``sphereconv: error: ...``) with exit code
2, never argparse's usage block and never a traceback; :class:`OneLineArgumentParser` turns
argparse's own errors into :class:`CommandLineError` so that :func:`sphereconv.cli.main.main`
reports them like every other :class:`~sphereconv.errors.SphereconvError`.
"""

from __future__ import annotations

import argparse
import math

from ..errors import SphereconvError


class CommandLineError(SphereconvError):
    """A flag is unknown, missing, malformed or conflicts with another flag."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """``ArgumentParser`` that raises :class:`CommandLineError` instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise CommandLineError(f"{message} (see '{self.prog} --help')")


def _int_at_least(text: str, minimum: int, kind: str) -> int:
    """Parse ``text`` as an integer >= ``minimum``; ``kind`` names the allowed range in the error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "positive")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "non-negative")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """argparse type: any finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value
