"""Argument parsing helpers shared by the subcommands.

Every user error the command line reports is one line (``sphereconv: error: ...``) with exit code
2, never argparse's usage block and never a traceback; :class:`OneLineArgumentParser` turns
argparse's own errors into :class:`CommandLineError` so that :func:`sphereconv.cli.main.main`
reports them like every other :class:`~sphereconv.errors.SphereconvError`.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import NoReturn

from .._validation import check_float, check_int
from ..errors import ConfigError, SphereconvError, short_repr

# Exit code of a run stopped by a signal (the CLI's convention for interrupts; user errors exit 2).
EXIT_INTERRUPTED = 1
# reST inline roles in docstrings (:func:`name`, :mod:`~pkg.name`), shown as plain names in --help.
_REST_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
# Longest path printed in a message.
MAX_PATH_CHARS = 200
# Longest message of argparse's own errors printed (it lists unrecognized arguments in full).
MAX_MESSAGE_CHARS = 500


class CommandLineError(SphereconvError):
    """A flag is unknown, missing, malformed or conflicts with another flag."""


def help_text(docstring: str) -> str:
    """A module docstring as ``--help`` text: its reST inline markup (double backquotes, roles) removed."""
    return _REST_ROLE.sub(r"\1", docstring).replace("``", "")


class OneLineArgumentParser(argparse.ArgumentParser):
    """``ArgumentParser`` that raises :class:`CommandLineError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        if len(message) > MAX_MESSAGE_CHARS:  # argparse repeats unrecognized arguments in full
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        raise CommandLineError(f"{message} (see '{self.prog} --help')")


def _flag_value(check, **rules):
    """An argparse type running ``check`` (from :mod:`sphereconv._validation`) on the flag's text;
    argparse prefixes the message with the flag's name."""

    def parse(text: str):
        return check("value", text, parse_strings=True, error=argparse.ArgumentTypeError, **rules)

    return parse


# argparse types for the flags of the subcommands other than ``train`` (whose flags the config
# declares and checks): an integer >= 1, an integer >= 0, a finite number > 0, a finite number.
positive_int = _flag_value(check_int, minimum=1)
non_negative_int = _flag_value(check_int, minimum=0)
positive_float = _flag_value(check_float, low=0.0, low_open=True)
finite_float = _flag_value(check_float)


def device_name(text: str) -> str:
    """argparse type: auto, cpu, cuda, cuda:N or mps (the check of the ``device`` config key)."""
    from ..engine.config import check_device_name

    try:
        return check_device_name(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# What a flag of an optional config key takes for null (YAML's spellings, any case).
NULL_WORDS = ("null", "none", "~")


class Nullable:
    """argparse type of a flag whose config key may be null: ``null`` (or ``none``, ``~``) gives
    None, anything else goes through ``kind`` (argparse names ``kind`` in its error message)."""

    def __init__(self, kind: type) -> None:
        self.kind = kind
        self.__name__ = kind.__name__

    def __call__(self, text: str):
        return None if text.strip().lower() in NULL_WORDS else self.kind(text)

    def __repr__(self) -> str:
        return f"Nullable({self.kind.__name__})"


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


def _file_above(path: Path) -> Path | None:
    """The nearest existing parent of ``path`` if it is not a folder (a file, say), else None."""
    for parent in path.parents:
        if os.path.lexists(parent):
            return None if parent.is_dir() else parent
    return None


def _refuse_below_file(text: str, expected: str) -> str:
    """``text`` unless an existing parent of it is a file (``expected`` says what was asked for)."""
    blocking = _file_above(Path(text))
    if blocking is not None:
        raise argparse.ArgumentTypeError(
            f"expected {expected}, got {short_repr(text, MAX_PATH_CHARS)}, "
            f"below {short_repr(str(blocking), MAX_PATH_CHARS)}, which is a file, not a folder"
        )
    return text


def output_directory(text: str) -> str:
    """argparse type: a folder to write into, existing or to be created (not a file, nor below one)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder, got an empty path")
    path = Path(text)
    if os.path.lexists(path) and not path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a folder, got {short_repr(text, MAX_PATH_CHARS)}, which is a file")
    return _refuse_below_file(text, "a folder")


def output_file(text: str) -> str:
    """argparse type: a file to write, existing or new (not a folder, nor below a file)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a file name, got an empty path")
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(
            f"expected a file name, got {short_repr(text, MAX_PATH_CHARS)}, which is a folder"
        )
    return _refuse_below_file(text, "a file name")
