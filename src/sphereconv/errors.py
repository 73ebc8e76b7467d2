"""User-facing errors.

Everything the command line should report as one line (bad flag, missing dataset, corrupt
checkpoint, invalid config) derives from :class:`SphereconvError`. ``ValueError``/``TypeError`` stay
the errors for bad arguments to library functions, as in ``torch.nn``.
"""


class SphereconvError(Exception):
    """Base class of errors reported to the user without a traceback."""


class InvalidArgumentError(SphereconvError, ValueError):
    """An argument of a layer, loss, model or loader has a value outside what it allows.

    A ``ValueError`` (as in ``torch.nn``) that the command line also reports as one line, since such
    values often come from a config file.
    """


class InvalidArgumentTypeError(SphereconvError, TypeError):
    """An argument of a layer, loss, model or loader has the wrong type (a ``TypeError``)."""


class ConfigError(SphereconvError, ValueError):
    """A configuration key has a wrong type, an out-of-range value, or conflicts with another key."""


class DatasetError(SphereconvError):
    """A dataset is missing, unknown, truncated or fails its checksum."""


class CheckpointError(SphereconvError):
    """A checkpoint is missing, truncated, not a checkpoint, or belongs to a different model."""


class TrainingDivergedError(SphereconvError):
    """Training kept producing non-finite losses or gradients."""


# Longest value representation an error message prints: a message names the bad value, but a value
# read from an untrusted file can be megabytes long or nested without end.
MAX_REPR_CHARS = 80
# Integers longer than this are named by their size (Python refuses to print > 4300 digits).
_MAX_PRINTED_INT_BITS = 256


def short_repr(value: object, limit: int = MAX_REPR_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, in time bounded for any nesting or sharing.

    Containers are summarised by :mod:`reprlib` (a few items per level, a few levels deep), so a
    structure of shared references that would expand to billions of items is never walked.
    """
    import reprlib

    if isinstance(value, int) and value.bit_length() > _MAX_PRINTED_INT_BITS:
        return f"<integer of {value.bit_length()} bits>"
    formatter = reprlib.Repr()
    formatter.maxlevel = 3
    formatter.maxstring = formatter.maxother = formatter.maxlong = limit
    try:
        text = formatter.repr(value)
    except Exception:  # a repr that fails (e.g. an integer too long to print) must not hide the error
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
