"""Argument checks shared by every layer, loss, model, loader and config key.

Each check returns the normalised value or raises an error that names the argument, shows the bad
value (cut by :func:`~sphereconv.errors.short_repr`) and says what is allowed:
:class:`~sphereconv.errors.InvalidArgumentTypeError` (a ``TypeError``) for a wrong type and
:class:`~sphereconv.errors.InvalidArgumentError` (a ``ValueError``) for a value out of range, so
library callers get torch's usual exception types and the command line reports either in one line.
Callers that need one error type for everything (the config keys raise
:class:`~sphereconv.errors.ConfigError`) pass it as ``error``.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

from .errors import InvalidArgumentError, InvalidArgumentTypeError, short_repr

__all__ = [
    "fail",
    "check_bool",
    "check_int",
    "check_float",
    "check_choice",
    "describe_int_range",
    "describe_float_range",
]


def fail(
    name: str, value: Any, allowed: str, *, wrong_type: bool = False, error: type[Exception] | None = None
) -> Exception:
    """The error for argument ``name`` holding ``value`` where ``allowed`` describes the valid values."""
    cls = error or (InvalidArgumentTypeError if wrong_type else InvalidArgumentError)
    return cls(f"invalid {name}={short_repr(value)}: expected {allowed}")


def _is_integral(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> TypeGuard[numbers.Real]:
    """A real number (int, float, numpy scalar...), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_bool(name: str, value: Any, *, error: type[Exception] | None = None) -> bool:
    """``value`` if it is ``True`` or ``False`` (not 0/1, not a string)."""
    if isinstance(value, bool):
        return value
    raise fail(name, value, "true or false", wrong_type=True, error=error)


def describe_int_range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an integer in [{minimum}, {maximum}]"
    if minimum == 1:
        return "a positive integer"
    if minimum is not None:
        return f"an integer >= {minimum}"
    if maximum is not None:
        return f"an integer <= {maximum}"
    return "an integer"


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allowed: str | None = None,
    parse_strings: bool = False,
    error: type[Exception] | None = None,
) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``.

    Integral floats (``3.0``) and numpy integers are accepted; with ``parse_strings`` so are numeric
    strings (YAML reads ``1e3`` as text). ``allowed`` replaces the generated description.
    """
    allowed = allowed or describe_int_range(minimum, maximum)
    number = value
    if parse_strings and isinstance(number, str):
        try:
            number = float(number.strip())
        except ValueError:
            raise fail(name, value, allowed, wrong_type=True, error=error) from None
    if is_real(number) and not _is_integral(number):
        as_float = float(number)
        if not (math.isfinite(as_float) and as_float.is_integer()):
            raise fail(name, value, allowed, error=error)
        number = int(as_float)
    if not _is_integral(number):
        raise fail(name, value, allowed, wrong_type=True, error=error)
    number = int(number)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise fail(name, value, allowed, error=error)
    return number


def describe_float_range(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if low == -math.inf and high == math.inf:
        return "a finite number"
    if high == math.inf:
        return f"a number {'>' if low_open else '>='} {low:g}"
    if low == -math.inf:
        return f"a number {'<' if high_open else '<='} {high:g}"
    return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_float(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    allowed: str | None = None,
    parse_strings: bool = False,
    error: type[Exception] | None = None,
) -> float:
    """``value`` as a finite ``float`` in the interval from ``low`` to ``high``.

    ``low_open``/``high_open`` exclude the end points. Any real number is accepted (ints, numpy
    scalars), never a bool; with ``parse_strings`` numeric strings too.
    """
    if type(value) is float and _within(value, low, high, low_open, high_open):
        return value  # the common case, without building the message (layers check at every call)
    allowed = allowed or describe_float_range(low, high, low_open, high_open)
    number = value
    if parse_strings and isinstance(number, str):
        try:
            number = float(number.strip())
        except ValueError:
            raise fail(name, value, allowed, wrong_type=True, error=error) from None
    if not is_real(number):
        raise fail(name, value, allowed, wrong_type=True, error=error)
    number = float(number)
    if not math.isfinite(number):
        raise fail(name, value, allowed, error=error)
    if not _within(number, low, high, low_open, high_open):
        raise fail(name, value, allowed, error=error)
    return number


def _within(number: float, low: float, high: float, low_open: bool, high_open: bool) -> bool:
    """Whether a finite ``number`` lies in the interval (NaN and infinities do not)."""
    if not math.isfinite(number):
        return False
    return not (number < low or (low_open and number == low) or number > high or (high_open and number == high))


def check_choice(
    name: str,
    value: Any,
    choices: Sequence[str],
    *,
    aliases: Mapping[str, str] | None = None,
    error: type[Exception] | None = None,
) -> str:
    """The canonical spelling of ``value``, one of ``choices`` (case-insensitive; ``aliases`` map
    other spellings to a choice). The error suggests the closest choices."""
    if isinstance(value, str) and value in choices:  # the canonical spelling (layers check at every call)
        return value
    allowed = "one of " + ", ".join(choices)
    if aliases:
        allowed += " (aliases: " + ", ".join(f"{a} = {t}" for a, t in aliases.items()) + ")"
    if not isinstance(value, str):
        raise fail(name, value, allowed, wrong_type=True, error=error)
    key = value.strip().lower()
    if aliases:
        key = aliases.get(key, key)
    if key in choices:
        return key
    close = difflib.get_close_matches(key, list(choices), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise fail(name, value, allowed + hint, error=error)
