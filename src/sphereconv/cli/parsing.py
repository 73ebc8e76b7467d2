"""Argument parsing helpers shared by the subcommands.

Every user error the command line reports is one line (``sphereconv: error: ...``) with exit code
2, never argparse's usage block and never a traceback; :class:`OneLineArgumentParser` turns
argparse's own errors into :class:`CommandLineError` so that :func:`sphereconv.cli.main.main`
reports them like every other :class:`~sphereconv.errors.SphereconvError`.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import NoReturn

from ..errors import ConfigError, SphereconvError, short_repr

# Longest path printed in a message.
MAX_PATH_CHARS = 200
# Longest message of argparse's own errors printed (it lists unrecognized arguments in full).
MAX_MESSAGE_CHARS = 500


class CommandLineError(SphereconvError):
    """A flag is unknown, missing, malformed or conflicts with another flag."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """``ArgumentParser`` that raises :class:`CommandLineError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        if len(message) > MAX_MESSAGE_CHARS:  # argparse repeats unrecognized arguments in full
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        raise CommandLineError(f"{message} (see '{self.prog} --help')")


def _int_at_least(text: str, minimum: int, kind: str) -> int:
    """Parse ``text`` as an integer >= ``minimum``; ``kind`` names the allowed range in the error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {short_repr(text)}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {short_repr(value)}")
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
        raise argparse.ArgumentTypeError(f"expected a positive number, got {short_repr(text)}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {short_repr(text)}")
    return value


def finite_float(text: str) -> float:
    """argparse type: any finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {short_repr(text)}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {short_repr(text)}")
    return value


def device_name(text: str) -> str:
    """argparse type: auto, cpu, cuda, cuda:N or mps (the check of the ``device`` config key)."""
    from ..engine.config import check_device_name

    try:
        return check_device_name(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def mapping_text(text: str) -> dict:
    """argparse type: a mapping written as YAML or JSON (``{margin: 4}``) or as ``KEY=VALUE`` (the
    value read as YAML, so ``margin=4`` gives the number 4). Read like a config file (no aliases,
    no duplicate keys, no Python objects)."""
    from ..engine.config import parse_yaml_text

    name, equals, value = text.partition("=")
    try:
        if equals and name.strip().isidentifier():
            return {name.strip(): parse_yaml_text(value, f"value of {name.strip()}")}
        data = parse_yaml_text(text, "mapping text")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(
            f"expected a YAML mapping such as '{{margin: 4}}' or KEY=VALUE, got {short_repr(text, MAX_PATH_CHARS)}"
        )
    return data


def existing_directory(text: str) -> str:
    """argparse type: the path of a directory that exists."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a directory, got an empty path")
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"expected an existing directory, got {short_repr(text, MAX_PATH_CHARS)}")
    return text
