"""User-facing errors.

Everything the command line should report as one line (bad flag, missing dataset, corrupt
checkpoint, invalid config) derives from :class:`SphereconvError`. ``ValueError``/``TypeError`` stay
the errors for bad arguments to library functions, as in ``torch.nn``.
"""


class SphereconvError(Exception):
    """Base class of errors reported to the user without a traceback."""


class ConfigError(SphereconvError, ValueError):
    """A configuration key has a wrong type, an out-of-range value, or conflicts with another key."""


class DatasetError(SphereconvError):
    """A dataset is missing, unknown, truncated or fails its checksum."""


class CheckpointError(SphereconvError):
    """A checkpoint is missing, truncated, not a checkpoint, or belongs to a different model."""


class TrainingDivergedError(SphereconvError):
    """Training kept producing non-finite losses or gradients."""
