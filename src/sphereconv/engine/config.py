"""Training configuration: the :class:`TrainConfig` dataclass, its validation and YAML I/O.

The defaults follow the training recipe of the experiments of Liu et al., "Deep Hyperspherical
Learning" (NIPS 2017, Sec. 5) as the authors' code runs them (wy1iu/SphereNet): Adam, lr 1e-3
divided by 10 at 53% and 84% of the run (34k and 54k of its 64k iterations), batch 128,
orthogonality penalty 1e-4 on SphereConv filters, weight decay 5e-4 everywhere except SphereConv
filters. Two settings serve a first run on a new dataset instead, and the paper configs
(``configs/*_cifar*.yaml``) set the reference's values: the run length (``DEFAULT_EPOCHS`` passes
over the training set where neither ``iterations`` nor ``epochs`` is set, not 64k iterations) and
the BatchNorm momentum (``BN_MOMENTUM``). Label smoothing (the reference's 0.01) and augmentation
(the reference's horizontal flip, or crop + flip on CIFAR-10+) are also off by default; the paper
configs set them.

Every key is declared once, with :func:`setting`: its type (the annotation), default, allowed
values (a range, or choices taken from the registry that owns them) and help text. The validation
(:meth:`TrainConfig.validate`), the ``train`` command's flags, its ``--dry-run`` output
(:func:`format_config`) and the table of docs/CONFIG.md (:func:`config_table`) are all generated
from those declarations (:func:`key_specs`).

A configuration is resolved in three layers: the dataclass defaults, then a YAML file, then
overrides (the command-line flags that were given). ``epochs`` and ``iterations`` are mutually
exclusive: a layer that sets one clears the other from the layers below it. Every value is checked
by :meth:`TrainConfig.validate` before any work starts; problems raise
:class:`~sphereconv.errors.ConfigError` naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .._validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    describe_float_range,
    describe_int_range,
    fail,
)
from ..data.augment import AUGMENTATIONS
from ..data.image_folder import MAX_IMAGE_SIZE
from ..data.registry import canonical_name, list_datasets
from ..errors import ConfigError, DatasetError, short_repr
from ..losses.registry import LOSSES
from ..models import BN_MOMENTUM, MIN_BATCH_NORM_BATCH, list_models
from ..nn.angular import DEFAULT_SIGMOID_K, MODEL_OPERATORS, OPERATOR_ALIASES
from .atomic import atomic_write_text

# Choices of the enumerated keys that belong to the engine itself (the others come from the
# registries: models, losses, datasets, operators, augmentations).
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("step", "cosine", "onecycle", "constant")
AMP_MODES = ("none", "bf16", "fp16")
# Other spellings of the operators every model accepts (MODEL_OPERATORS: "none" = the
# plain-convolution CNN baseline, then the SphereConv operators).
MODEL_OPERATOR_ALIASES = {alias: name for alias, name in OPERATOR_ALIASES.items() if name in MODEL_OPERATORS}
# Device strings accepted besides "cuda:<index>".
DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")

# Largest config file read: real ones are a few hundred bytes; the limit keeps a mistaken
# --config /dev/zero or a huge file from being read into memory.
MAX_CONFIG_BYTES = 1 << 20
# Deepest nesting of lists and mappings in a config file (real ones use two levels).
MAX_CONFIG_DEPTH = 32
# Most values in model_kwargs or loss_kwargs, counted as a tree: keyword arguments are a handful
# of numbers; the bound keeps copying and printing a config cheap.
MAX_KWARGS_VALUES = 1000
# Longest file name printed in a message.
MAX_PATH_CHARS = 200
# Longest device name accepted ("cuda:" and an index; no machine has more than a few digits' worth).
MAX_DEVICE_CHARS = 16
# Largest seed: numpy seeds must fit in 32 bits.
MAX_SEED = 2**32 - 1

# Line width given to yaml.safe_dump so that a value is written on one line.
YAML_LINE_WIDTH = 1 << 20
# The command that regenerates docs/CONFIG.md from the declarations below (config_table()).
CONFIG_TABLE_COMMAND = ".venv/bin/python scripts/config_table.py"

# Reference schedule (wy1iu/SphereNet): lr divided by 10 at iterations 34k and 54k of 64k,
# written here as fractions of the run so that shorter runs keep the same shape.
REFERENCE_MILESTONES = (34000 / 64000, 54000 / 64000)
# The default run length, in passes over the training set. The reference's 64k iterations of batch
# 128 are 164 epochs of CIFAR-10 and 8,000 of a 1,000-image folder; ten passes learn Fashion-MNIST
# to about 90% at width 1/4 (docs/RESULTS.md, regime L: 3,000 iterations, 6.4 epochs, 91.1-91.9%)
# and keep a first run on a small dataset short. The paper configs set iterations: 64000.
DEFAULT_EPOCHS = 10.0

# The metadata key of dataclasses.field under which setting() stores a Setting.
_SETTING = "setting"


# ------------------------------------------------------------------------------------------------
# Declaring a key


@dataclass(frozen=True)
class Setting:
    """What one config key allows, declared next to its default by :func:`setting`.

    ``choices`` is the collection of allowed names (e.g. a registry's dict), ``choices_from`` a
    function returning it (for registries that grow at run time); ``aliases`` maps other spellings
    to a choice. ``low``/``high`` bound a number (``low_open``/``high_open`` exclude the end).
    ``check(key, value)`` replaces the generic check of the annotated type for keys with rules of
    their own; ``allowed`` then describes the valid values (it overrides the generated text).
    """

    help: str
    choices: Collection[str] | None = None
    choices_from: Callable[[], Iterable[str]] | None = None
    aliases: Mapping[str, str] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    allowed: str | None = None
    check: Callable[[KeySpec, Any], Any] | None = None


def setting(
    default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING, **rules: Any
) -> Any:
    """A dataclass field of :class:`TrainConfig` carrying its :class:`Setting` (``rules``) as metadata."""
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={_SETTING: Setting(help=help, **rules)}
    )


# ------------------------------------------------------------------------------------------------
# Checks of the keys with rules of their own (each gets the key's KeySpec and the value)


def _check_text(key: KeySpec, value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise fail(key.name, value, key.allowed(), error=ConfigError)
    return value


def _check_model(key: KeySpec, value: Any) -> str:
    name = value.replace("-", "_") if isinstance(value, str) else value  # Sphere-ResNet32 = sphere_resnet32
    return check_choice(key.name, name, key.choices() or (), error=ConfigError)


def _check_dataset(key: KeySpec, value: Any) -> str:
    try:
        return canonical_name(value)  # case-insensitive, with the registry's aliases (cifar-10, fmnist)
    except DatasetError:
        return check_choice(key.name, value, key.choices() or (), error=ConfigError)


def _check_device(key: KeySpec, value: Any) -> str:
    if isinstance(value, str):
        name = value.strip().lower()
        index = name.removeprefix("cuda:")
        if name in DEVICE_NAMES or (
            index != name and index.isascii() and index.isdigit() and len(name) <= MAX_DEVICE_CHARS
        ):
            return name
    raise fail(key.name, value, key.allowed(), error=ConfigError)


# Bounds of a fraction of the run strictly between its start and its end.
_OPEN_UNIT_INTERVAL: dict[str, Any] = dict(low=0.0, high=1.0, low_open=True, high_open=True)


def _check_milestones(key: KeySpec, value: Any) -> list[float]:
    allowed = key.allowed()
    if not isinstance(value, (list, tuple)):
        raise fail(key.name, value, allowed, error=ConfigError)
    fractions = [
        check_float(key.name, item, **_OPEN_UNIT_INTERVAL, allowed=allowed, parse_strings=True, error=ConfigError)
        for item in value
    ]
    if any(later <= earlier for earlier, later in zip(fractions, fractions[1:])):
        raise fail(key.name, value, allowed, error=ConfigError)
    return fractions


def _count_plain_values(value: Any, budget: int, depth: int = 0) -> int:
    """Values in ``value`` counted as a tree (a shared object counts each time), or -1 when it is
    not plain YAML data, nests deeper than :data:`MAX_CONFIG_DEPTH` or exceeds ``budget``.

    Stops as soon as ``budget`` is spent, so shared references that would expand to billions of
    values are refused after ``budget`` steps.
    """
    if depth > MAX_CONFIG_DEPTH:
        return -1
    if value is None or isinstance(value, (bool, int, float, str)):
        return 1
    if isinstance(value, dict):
        children = [c for item in value.items() for c in item]
    elif isinstance(value, (list, tuple)):
        children = list(value)
    else:
        return -1
    count = 1
    for child in children:
        used = _count_plain_values(child, budget - count, depth + 1)
        if used < 0 or count + used > budget:
            return -1
        count += used
    return count


def _check_kwargs(key: KeySpec, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.isidentifier() for k in value):
        raise fail(key.name, value, key.allowed(), error=ConfigError)
    if _count_plain_values(value, MAX_KWARGS_VALUES) < 0:
        limits = f"at most {MAX_KWARGS_VALUES} plain values (numbers, strings, booleans, null, lists, mappings)"
        raise fail(
            key.name, value, f"{key.allowed()}: {limits} nested at most {MAX_CONFIG_DEPTH} deep", error=ConfigError
        )
    return dict(value)


_KWARGS = "a mapping of keyword-argument names to values"
_EVERY = dict(low=0, allowed="an integer >= 0 (0 = only at the end)")


@dataclass
class TrainConfig:
    """Every setting of a training run (defaults: the reference recipe of the paper's code).

    Each field is declared with :func:`setting`; :func:`key_specs` describes them and
    docs/CONFIG.md lists them.
    """

    # --- model -------------------------------------------------------------------------------
    model: str = setting(
        "spherenet9",
        help="registered model name (sphereconv list-models)",
        choices_from=list_models,
        check=_check_model,
    )
    operator: str = setting(
        "cosine",
        help="SphereConv operator g(theta); 'none' = plain-convolution CNN baseline",
        choices=MODEL_OPERATORS,
        aliases=MODEL_OPERATOR_ALIASES,
    )
    sigmoid_k: float = setting(DEFAULT_SIGMOID_K, help="k of the sigmoid operator", low=0.0, low_open=True)
    fc_operator: str | None = setting(
        None,
        help="operator of the fully connected SphereConv (fc6); null = same as operator",
        choices=MODEL_OPERATORS,
        aliases=MODEL_OPERATOR_ALIASES,
    )
    width_mult: float = setting(1.0, help="multiplier of every layer width", low=0.0, high=16.0, low_open=True)
    batch_norm: bool = setting(True, help="BatchNorm after every convolution")
    bn_momentum: float = setting(
        BN_MOMENTUM,
        help=(
            "BatchNorm running-average momentum: the default suits runs of any length; the reference recipe's 0.001 "
            "(decay 0.999, set in the paper configs) needs thousands of iterations"
        ),
        low=0.0,
        high=1.0,
        low_open=True,
    )
    sphere_norm: bool = setting(False, help="use SphereNorm layers (paper Sec. 3.4)")
    feature_dim: int | None = setting(
        None, help="width of the penultimate layer (2 for the 2-D feature experiment); null = model default", low=1
    )
    model_kwargs: dict[str, Any] = setting(
        default_factory=dict, help="extra keyword arguments of create_model", allowed=_KWARGS, check=_check_kwargs
    )
    # --- loss --------------------------------------------------------------------------------
    loss: str = setting("softmax", help="classifier loss (sphereconv.losses)", choices=LOSSES)
    loss_kwargs: dict[str, Any] = setting(
        default_factory=dict,
        help="extra keyword arguments of build_loss (e.g. margin)",
        allowed=_KWARGS,
        check=_check_kwargs,
    )
    label_smoothing: float = setting(0.0, help="label smoothing of the softmax loss", low=0.0, high=1.0, high_open=True)
    # --- data --------------------------------------------------------------------------------
    dataset: str = setting(
        "fashion-mnist",
        help="dataset name (sphereconv list-datasets)",
        choices_from=list_datasets,
        check=_check_dataset,
    )
    data_dir: str | None = setting(
        None, help="where the dataset files are; null = search the usual places", check=_check_text
    )
    download: bool = setting(False, help="download the dataset when it is missing")
    train_subset: int | None = setting(
        None, help="train on N of the training images (the same class-balanced sample every run)", low=1
    )
    test_subset: int | None = setting(
        None, help="evaluate on N of the test images (the same class-balanced sample every run)", low=1
    )
    image_size: int | None = setting(
        None,
        help=(
            "image folders: resize every image to image_size x image_size when loading; null = keep the images' "
            "own size when they share one of at most 64 pixels a side, else 32"
        ),
        low=1,
        high=MAX_IMAGE_SIZE,
    )
    augment: str = setting(
        "none", help="per-batch augmentation (crop_flip: pad 4 + random crop + flip)", choices=AUGMENTATIONS
    )
    # --- optimisation ------------------------------------------------------------------------
    optimizer: str = setting(
        "adam", help="adam (L2 weight decay, as the reference), adamw (decoupled) or sgd (momentum)", choices=OPTIMIZERS
    )
    lr: float = setting(1e-3, help="peak learning rate", low=0.0, low_open=True)
    momentum: float = setting(0.9, help="SGD momentum", low=0.0, high=1.0, high_open=True)
    weight_decay: float = setting(
        5e-4, help="weight decay of BN parameters, classifier/loss weights and all filters of plain CNNs", low=0.0
    )
    sphere_weight_decay: float = setting(0.0, help="weight decay of SphereConv filters (reference: none)", low=0.0)
    orthogonality: float = setting(
        1e-4, help="coefficient of ||W^T W - I||_F^2 on SphereConv filters; 0 disables", low=0.0
    )
    grad_clip: float | None = setting(
        None, help="clip the gradient norm to this value; null = off", low=0.0, low_open=True
    )
    schedule: str = setting("step", help="learning-rate schedule", choices=SCHEDULES)
    lr_milestones: list[float] = setting(
        default_factory=lambda: list(REFERENCE_MILESTONES),
        help="step schedule: fractions of the run at which lr is multiplied by lr_gamma (reference 34k, 54k of 64k)",
        allowed="an increasing list of fractions of the run, each in (0, 1)",
        check=_check_milestones,
    )
    lr_gamma: float = setting(
        0.1, help="step schedule: factor applied at each milestone", low=0.0, high=1.0, low_open=True
    )
    iterations: int | None = setting(
        None, help="optimizer steps of the run (exclusive with epochs; the paper configs: 64000)", low=1
    )
    epochs: float | None = setting(
        None,
        help=f"passes over the training set (exclusive with iterations); with neither set, {DEFAULT_EPOCHS:g}",
        low=0.0,
        low_open=True,
    )
    batch_size: int = setting(
        128,
        help=(
            "global mini-batch size: the images of one optimizer step over all data-parallel processes, split evenly "
            "between them (must be divisible by their number)"
        ),
        low=1,
    )
    # --- evaluation, checkpoints and logging ---------------------------------------------------
    eval_every: int = setting(500, help="evaluate every N steps (0 = only at the end); reference 500", **_EVERY)
    eval_batch_size: int = setting(1000, help="batch size of evaluation", low=1)
    checkpoint_every: int = setting(500, help="checkpoint every N steps (0 = only at the end)", **_EVERY)
    keep_checkpoints: int = setting(3, help="keep the newest K checkpoints", low=1)
    out: str = setting("runs/train", help="output directory", check=_check_text)
    resume: bool = setting(
        False,
        help="continue from the newest intact checkpoint in out; only the keys of run_dir.RESUMABLE_KEYS may change",
    )
    overwrite: bool = setting(
        False, help="start afresh even if out holds a run (only its own files are deleted) or other files (kept)"
    )
    tensorboard: bool = setting(False, help="write TensorBoard logs to out/tensorboard")
    layer_stats_every: int = setting(
        0,
        help=(
            "record per-layer statistics (cos theta, activations, gradients) into out/layer_stats.jsonl "
            "every N steps, at most 100 times (see 'sphereconv inspect'); 0 = off"
        ),
        low=0,
        allowed="an integer >= 0 (0 = off)",
    )
    progress: bool = setting(
        True, help="show a progress bar; without it, train prints a start line and a line per evaluation"
    )
    # --- execution ---------------------------------------------------------------------------
    device: str = setting("auto", help="where to train", allowed="auto, cpu, cuda, cuda:N or mps", check=_check_device)
    amp: str = setting("none", help="mixed precision (fp16 on CUDA only)", choices=AMP_MODES)
    compile: bool = setting(False, help="torch.compile the model")
    channels_last: bool = setting(False, help="channels-last memory format")
    seed: int = setting(
        0, help="seed of torch, numpy and python random", low=0, high=MAX_SEED, allowed="an integer in [0, 2**32)"
    )
    max_nonfinite_steps: int = setting(
        20, help="stop after this many consecutive steps with a non-finite loss or gradient", low=1
    )

    def validate(self, check_environment: bool = True) -> TrainConfig:
        """Check types, ranges, choices and conflicts in place; return ``self``.

        Raises :class:`ConfigError` naming the first bad key, its value and what is allowed.
        Numeric strings (YAML reads ``1e-3`` as a string) and integral floats are converted, and
        a config that sets neither ``iterations`` nor ``epochs`` gets ``DEFAULT_EPOCHS``.
        ``check_environment=False`` skips the checks that depend on this machine (is the device
        there, does it support the chosen precision), e.g. to read a config saved elsewhere.
        """
        for key in key_specs():
            setattr(self, key.name, key.check(getattr(self, key.name)))
        if self.iterations is None and self.epochs is None:
            self.epochs = DEFAULT_EPOCHS
        self._check_conflicts(check_environment)
        return self

    def _check_conflicts(self, check_environment: bool) -> None:
        if self.iterations is not None and self.epochs is not None:
            raise ConfigError(
                "set at most one of iterations and epochs; "
                f"got iterations={short_repr(self.iterations)}, epochs={short_repr(self.epochs)}"
            )
        if check_environment:
            if self.data_dir is not None and not self.download and not os.path.isdir(os.path.expanduser(self.data_dir)):
                # Searching the other places instead would train on whatever they hold.
                raise ConfigError(
                    f"data_dir={short_repr(self.data_dir, MAX_PATH_CHARS)} is not an existing folder; give the "
                    "folder that holds the dataset's files, leave data_dir unset to search the usual places, "
                    "or set download true to fetch the files into it"
                )
            device = resolve_device_name(self.device)
            if self.amp == "fp16" and not device.startswith("cuda"):
                raise ConfigError(
                    f"amp='fp16' needs a CUDA device, but device resolves to {device!r}; use amp='bf16' or 'none'"
                )
        if self.sphere_norm and self.operator == "none":
            raise ConfigError(
                "sphere_norm=True needs a SphereConv operator, but operator='none'; "
                "choose operator linear, cosine, sigmoid or learnable_sigmoid, or set sphere_norm false"
            )
        if self.batch_size < MIN_BATCH_NORM_BATCH and self.batch_norm:
            raise ConfigError(
                f"batch_size={self.batch_size} is too small for BatchNorm (needs >= {MIN_BATCH_NORM_BATCH}); "
                "raise batch_size or set batch_norm false"
            )


# ------------------------------------------------------------------------------------------------
# The keys as the validation, the command line and the docs see them


@dataclass(frozen=True, eq=False)
class KeySpec:
    """One key of :class:`TrainConfig`: its name, type (from the annotation), default and :class:`Setting`."""

    name: str
    kind: type  # bool, int, float, str, dict or list
    item_kind: type | None  # the type of a list's items
    optional: bool  # null (None) allowed
    default: Any
    setting: Setting

    @property
    def help(self) -> str:
        return self.setting.help

    @property
    def flag(self) -> str:
        """The ``train`` flag that sets this key (a boolean also has ``--no-`` in front of the name)."""
        return "--" + self.name.replace("_", "-")

    def choices(self) -> tuple[str, ...] | None:
        """The allowed names (from the registry that owns them), or None for a key without choices."""
        if self.setting.choices_from is not None:
            return tuple(self.setting.choices_from())
        return None if self.setting.choices is None else tuple(self.setting.choices)

    def type_name(self) -> str:
        """The type as the docs write it: ``int``, ``float or null``, ``mapping``, ``list of float``."""
        if self.kind is dict:
            name = "mapping"
        elif self.kind is list:
            name = f"list of {getattr(self.item_kind, '__name__', 'values')}"
        else:
            name = self.kind.__name__
        return f"{name} or null" if self.optional else name

    def allowed(self) -> str:
        """What values are allowed, in words (the text error messages end with)."""
        rules = self.setting
        choices = self.choices()
        if rules.allowed is not None:
            text = rules.allowed
        elif choices is not None:
            text = "one of " + ", ".join(choices)
            if rules.aliases:
                text += " (aliases: " + ", ".join(f"{alias} = {name}" for alias, name in rules.aliases.items()) + ")"
        elif self.kind is bool:
            text = "true or false"
        elif self.kind is int:
            text = describe_int_range(*self._int_bounds())
        elif self.kind is float:
            text = describe_float_range(*self._float_bounds())
        else:
            text = "a non-empty string"
        return f"{text} or null" if self.optional else text

    def _int_bounds(self) -> tuple[int | None, int | None]:
        rules = self.setting
        return (None if rules.low is None else int(rules.low), None if rules.high is None else int(rules.high))

    def _float_bounds(self) -> tuple[float, float, bool, bool]:
        rules = self.setting
        low = -math.inf if rules.low is None else rules.low
        high = math.inf if rules.high is None else rules.high
        return low, high, rules.low_open, rules.high_open

    def check(self, value: Any) -> Any:
        """``value`` normalised (numeric strings parsed, names canonical); ConfigError if not allowed."""
        rules = self.setting
        if value is None and self.optional:
            return None
        if rules.check is not None:
            return rules.check(self, value)
        if rules.choices is not None or rules.choices_from is not None:
            return check_choice(self.name, value, self.choices() or (), aliases=rules.aliases, error=ConfigError)
        if self.kind is bool:
            return check_bool(self.name, value, error=ConfigError)
        if self.kind is int:
            minimum, maximum = self._int_bounds()
            return check_int(
                self.name,
                value,
                minimum=minimum,
                maximum=maximum,
                allowed=self.allowed(),
                parse_strings=True,
                error=ConfigError,
            )
        if self.kind is float:
            low, high, low_open, high_open = self._float_bounds()
            return check_float(
                self.name,
                value,
                low=low,
                high=high,
                low_open=low_open,
                high_open=high_open,
                allowed=self.allowed(),
                parse_strings=True,
                error=ConfigError,
            )
        return _check_text(self, value)


@functools.cache
def key_specs() -> tuple[KeySpec, ...]:
    """Every key of :class:`TrainConfig`, in declaration order, with its type, default and rules."""
    hints = typing.get_type_hints(TrainConfig)
    specs = []
    for f in dataclasses.fields(TrainConfig):
        kind, optional = hints[f.name], False
        if isinstance(kind, types.UnionType):  # "X | None"
            kind, optional = next(t for t in typing.get_args(kind) if t is not type(None)), True
        item_kind = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
        kind = typing.get_origin(kind) or kind
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        specs.append(KeySpec(f.name, kind, item_kind, optional, default, f.metadata[_SETTING]))
    return tuple(specs)


def key_spec(name: str) -> KeySpec:
    """The :class:`KeySpec` of the key ``name`` (KeyError for an unknown name)."""
    return _specs_by_name()[name]


@functools.cache
def _specs_by_name() -> dict[str, KeySpec]:
    return {key.name: key for key in key_specs()}


def config_keys() -> tuple[str, ...]:
    """Names of every configuration key, in declaration order."""
    return tuple(key.name for key in key_specs())


def describe_keys() -> dict[str, str]:
    """Map each key to its one-line description (the ``help`` of its :func:`setting`)."""
    return {key.name: key.help for key in key_specs()}


def check_device_name(device: Any) -> str:
    """The normalised device name (auto, cpu, cuda, cuda:N, mps); anything else raises ConfigError.

    The one check behind ``train``'s and ``eval``'s ``--device`` and the ``device`` config key.
    """
    return key_spec("device").check(device)


def yaml_text(value: Any) -> str:
    """``value`` on one line as a YAML config file writes it (``null``, ``true``, ``[0.5, 0.75]``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=YAML_LINE_WIDTH, allow_unicode=True)
    return text.strip().removesuffix("...").strip()


def format_config(config: TrainConfig) -> str:
    """``config`` as a YAML config file: one key per line in declaration order, each value that
    differs from the default followed by a comment naming the default (``--dry-run`` prints it)."""
    lines = []
    for key in key_specs():
        value = getattr(config, key.name)
        line = f"{key.name}: {yaml_text(value)}"
        if value != key.default:
            line += f"  # default: {yaml_text(key.default)}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def config_table() -> str:
    """The Markdown text of docs/CONFIG.md: one row per key with its flag, type, default, allowed
    values and help."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = []
    for key in key_specs():
        flags = f"`{key.flag}`, `--no-{key.flag[2:]}`" if key.kind is bool else f"`{key.flag}`"
        rows.append(
            f"| `{key.name}` | {flags} | {key.type_name()} | `{cell(yaml_text(key.default))}` "
            f"| {cell(key.allowed())} | {cell(key.help)} |"
        )
    return (
        "\n".join(
            [
                *CONFIG_TABLE_HEADER,
                "| key | flag | type | default | allowed | help |",
                "| --- | --- | --- | --- | --- | --- |",
                *rows,
            ]
        )
        + "\n"
    )


# The lines above the table of docs/CONFIG.md.
CONFIG_TABLE_HEADER = (
    "# Configuration keys",
    "",
    "<!-- Generated from the declarations in src/sphereconv/engine/config.py; do not edit by hand.",
    f"     Regenerate with: {CONFIG_TABLE_COMMAND} -->",
    "",
    "Every key of a training run (`sphereconv.engine.TrainConfig`). Set it in a YAML file given to",
    "`sphereconv train --config FILE` (keys may be written with `-` or `_`) or with its flag; flags",
    "override the file, the file overrides the defaults. `epochs` and `iterations` are exclusive:",
    "setting one clears the other. `batch_size` is global: the images of one optimizer step over all",
    "data-parallel processes (`torchrun`), split evenly between them. Mapping flags take YAML",
    "(`--loss-kwargs '{margin: 4}'`) or `KEY=VALUE` and may be repeated.",
    "",
)


# ------------------------------------------------------------------------------------------------
# Loading and saving


def _normalise_keys(values: Mapping[Any, Any], source: str) -> dict[str, Any]:
    keys = config_keys()
    result: dict[str, Any] = {}
    for raw_key, value in values.items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"{source}: key {short_repr(raw_key)} is not a string; allowed keys: {', '.join(keys)}")
        key = raw_key.strip().replace("-", "_")
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; allowed keys: {', '.join(keys)}"
            raise ConfigError(f"{source}: unknown key {short_repr(raw_key)}{hint}")
        if key in result:
            raise ConfigError(f"{source}: key {short_repr(key)} given twice")
        result[key] = value
    return result


def _apply_layer(values: dict[str, Any], layer: dict[str, Any], source: str) -> None:
    """Lay ``layer`` over ``values``; setting one of epochs/iterations clears the other."""
    if layer.get("epochs") is not None and layer.get("iterations") is not None:
        raise ConfigError(
            f"{source}: set either epochs ({short_repr(layer['epochs'])}) or iterations "
            f"({short_repr(layer['iterations'])}), not both"
        )
    if layer.get("epochs") is not None:
        values["iterations"] = None
    if layer.get("iterations") is not None:
        values["epochs"] = None
    values.update(layer)


def _clip(text: str, limit: int = MAX_PATH_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases and duplicate keys (:func:`read_yaml_config`).

    An alias repeats a node without copying it, so a few hundred bytes of nested aliases ("billion
    laughs") stand for billions of values; a config file never needs one. A key given twice would
    silently take its last value.
    """

    source = "config file"

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(
                f"{self.source} line {event.start_mark.line + 1}: YAML alias *{_clip(str(event.anchor))} is not "
                "allowed in config files (aliases can expand to billions of values); write the value out"
            )
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise ConfigError(
                    f"{self.source} line {line}: lists or mappings nested more than {MAX_CONFIG_DEPTH} "
                    "deep; a config file needs a few levels"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<" merges a mapping into this one; flatten_mapping handles it
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool, type(None))):
                    continue  # unhashable or unusual keys are reported by the key check
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise ConfigError(
                        f"{self.source} line {line}: key {short_repr(key)} given twice "
                        f"(first at line {first_line[key]}); keep one"
                    )
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml_text(text: str, source: str) -> Any:
    """The plain data of the YAML ``text``; ``source`` (e.g. ``config file 'a.yaml'``) starts the
    message of the ConfigError raised for any problem. No alias, duplicate key or Python object is
    allowed (:class:`_ConfigLoader`)."""
    loader = None
    try:
        loader = _ConfigLoader(text)  # the reader already refuses control characters here
        loader.source = source
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        elif isinstance(exc, yaml.reader.ReaderError):
            where = f" at line {text.count(chr(10), 0, exc.position) + 1}"
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or type(exc).__name__
        raise ConfigError(f"{source} is not valid YAML{where}: {_clip(str(problem))}") from None
    except ConfigError:
        raise
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise ConfigError(f"{source} holds a value that cannot be read: {_clip(str(exc))}") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping of config keys; raise ConfigError for any problem.

    Untrusted input is bounded: at most :data:`MAX_CONFIG_BYTES` are read (so ``/dev/zero`` fails at
    once), YAML aliases and keys given twice are refused (:class:`_ConfigLoader`), and only plain
    data is built (no YAML tag constructs a Python object).
    """
    path = Path(path)
    source = f"config file {short_repr(os.fspath(path), MAX_PATH_CHARS)}"
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{source} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {source}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{source} is larger than the {MAX_CONFIG_BYTES:,} bytes allowed; a config file is a few lines "
            "of key: value"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source} is not UTF-8 text (byte {exc.start}); is it a config file?") from None
    data = parse_yaml_text(text, source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


class _Null:
    """The type of :data:`NULL`."""

    def __repr__(self) -> str:
        return "NULL"


# An override that sets a key to null (``--grad-clip null``); a None override means "not given".
NULL = _Null()


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Resolve a :class:`TrainConfig`: defaults, then the YAML file at ``path``, then ``overrides``.

    ``overrides`` holds explicitly given values (command-line flags); ``None`` values are ignored,
    :data:`NULL` sets a key to null.
    Keys may use ``-`` or ``_``. Unknown keys raise ConfigError with the closest valid names.
    With ``resume`` set and no ``path``, the ``config.yaml`` of the run in ``out`` (if any), with
    the amendments of earlier resumes, is the file layer, so ``--out DIR --resume`` alone continues
    a run with its own settings.
    The result is validated.
    """
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides must be a mapping of keys to values, not {type(overrides).__name__}")
    given = {k: None if v is NULL else v for k, v in (overrides or {}).items() if v is not None}
    given = _normalise_keys(given, "overrides")
    values = config_to_dict(TrainConfig())
    if path is None and given.get("resume") is True:
        # Continue a run with the settings it was started with (and later amended).
        from .run_dir import resumed_config_values  # run_dir imports this module

        out = given.get("out", values["out"])
        run_values = resumed_config_values(out) if isinstance(out, (str, os.PathLike)) else None
        if run_values is not None:
            source = f"run config {short_repr(os.fspath(Path(out) / 'config.yaml'), MAX_PATH_CHARS)}"
            _apply_layer(values, _normalise_keys(run_values, source), source)
    if path is not None:
        source = f"config file {short_repr(os.fspath(path), MAX_PATH_CHARS)}"
        _apply_layer(values, _normalise_keys(read_yaml_config(path), source), source)
    _apply_layer(values, given, "overrides")
    return TrainConfig(**values).validate()


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain-Python dict of every key (lists and dicts copied), suitable for YAML or JSON."""
    return dataclasses.asdict(config)


def config_from_dict(values: Mapping[str, Any], check_environment: bool = True) -> TrainConfig:
    """Rebuild a validated config from :func:`config_to_dict` output; unknown keys -> ConfigError.

    Pass ``check_environment=False`` for a config saved on another machine (e.g. in a checkpoint
    written on a GPU), whose device need not exist here.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"a config must be a mapping of keys to values, not {type(values).__name__}")
    return TrainConfig(**_normalise_keys(values, "config")).validate(check_environment)


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=None)
    atomic_write_text(path, text)


def resolve_device_name(device: str) -> str:
    """Resolve ``auto`` to ``cuda`` (when available), ``mps`` (when available) or ``cpu``.

    Raises ConfigError for a name that is not a device (:func:`check_device_name`) and when an
    explicitly requested accelerator is not available.
    """
    import torch

    device = check_device_name(device)
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r} requested but CUDA is not available here; use device 'cpu' or 'auto'")
        if ":" in device and int(device.split(":", 1)[1]) >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("device='mps' requested but MPS is not available here; use device 'cpu' or 'auto'")
    return device
