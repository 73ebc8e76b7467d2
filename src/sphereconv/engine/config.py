"""Training configuration: the :class:`TrainConfig` dataclass, its validation and YAML I/O.

The defaults are the training recipe of the experiments of Liu et al., "Deep Hyperspherical
Learning" (NIPS 2017, Sec. 5) as the authors' code runs them (wy1iu/SphereNet): Adam,
lr 1e-3 divided by 10 at iterations 34k and 54k of 64k, batch 128, orthogonality penalty 1e-4 on
SphereConv filters, weight decay 5e-4 everywhere except SphereConv filters.

A configuration is resolved in three layers: the dataclass defaults, then a YAML file, then
overrides (the command-line flags that were given). ``epochs`` and ``iterations`` are mutually
exclusive: a layer that sets one clears the other from the layers below it. Every value is checked
by :meth:`TrainConfig.validate` before any work starts; problems raise
:class:`~sphereconv.errors.ConfigError` naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import ConfigError, short_repr
from ..nn.angular import MODEL_OPERATORS, OPERATOR_ALIASES
from .atomic import atomic_write_text

# Choices of the enumerated keys.
LOSSES = ("softmax", "weight_normalized", "ga_softmax", "a_softmax", "cosface", "arcface")
AUGMENTATIONS = ("none", "flip", "crop_flip")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("step", "cosine", "onecycle", "constant")
AMP_MODES = ("none", "bf16", "fp16")
# MODEL_OPERATORS ("none" = the plain-convolution CNN baseline, then the SphereConv operators) is
# the set every model accepts, shared with the layers (sphereconv.nn.angular).
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

# Reference schedule (wy1iu/SphereNet): lr divided by 10 at iterations 34k and 54k of 64k,
# written here as fractions of the run so that shorter runs keep the same shape.
REFERENCE_MILESTONES = (34000 / 64000, 54000 / 64000)


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class TrainConfig:
    """Every setting of a training run (defaults: the reference recipe of the paper's code).

    The ``help`` metadata of each field documents it; :func:`describe_keys` lists them.
    """

    # --- model -------------------------------------------------------------------------------
    model: str = field(default="spherenet9", metadata=_help("registered model name (sphereconv list-models)"))
    operator: str = field(default="cosine", metadata=_help(
        "SphereConv operator g(theta): linear, cosine, sigmoid, learnable_sigmoid (lr_sigmoid); "
        "'none' = plain-convolution CNN baseline"))
    sigmoid_k: float = field(default=0.3, metadata=_help("k of the sigmoid operator (reference 0.3)"))
    fc_operator: str | None = field(default=None, metadata=_help(
        "operator of the fully connected SphereConv (fc6); null = same as operator"))
    width_mult: float = field(default=1.0, metadata=_help("multiplier of every layer width"))
    batch_norm: bool = field(default=True, metadata=_help("BatchNorm after every convolution"))
    bn_momentum: float = field(default=0.1, metadata=_help(
        "BatchNorm running-average momentum: 0.1 (PyTorch's) suits runs of any length; the reference "
        "recipe's 0.001 (decay 0.999, set in the paper configs) needs thousands of iterations"))
    sphere_norm: bool = field(default=False, metadata=_help("use SphereNorm layers (paper Sec. 3.4)"))
    feature_dim: int | None = field(default=None, metadata=_help(
        "width of the penultimate layer (2 for the 2-D feature experiment); null = model default"))
    model_kwargs: dict = field(default_factory=dict, metadata=_help("extra keyword arguments of create_model"))
    # --- loss --------------------------------------------------------------------------------
    loss: str = field(default="softmax", metadata=_help(
        "softmax | weight_normalized | ga_softmax | a_softmax | cosface | arcface", choices=LOSSES))
    loss_kwargs: dict = field(default_factory=dict, metadata=_help("extra keyword arguments of build_loss (e.g. margin)"))
    label_smoothing: float = field(default=0.0, metadata=_help("label smoothing of the softmax loss, in [0, 1)"))
    # --- data --------------------------------------------------------------------------------
    dataset: str = field(default="fashion-mnist", metadata=_help("dataset name (fashion-mnist, mnist, cifar10, cifar100, folder)"))
    data_dir: str | None = field(default=None, metadata=_help("where the dataset files are; null = search the usual places"))
    download: bool = field(default=False, metadata=_help("download the dataset when it is missing"))
    train_subset: int | None = field(default=None, metadata=_help("use only the first N training images"))
    test_subset: int | None = field(default=None, metadata=_help("evaluate on only the first N test images"))
    image_size: int | None = field(default=None, metadata=_help(
        "image folders: resize every image to image_size x image_size when loading; null = keep the images' "
        "own size when they share one of at most 64 pixels a side, else 32"))
    augment: str = field(default="none", metadata=_help(
        "per-batch augmentation: none | flip | crop_flip (pad 4 + random crop + flip)", choices=AUGMENTATIONS))
    # --- optimisation ------------------------------------------------------------------------
    optimizer: str = field(default="adam", metadata=_help(
        "adam (L2 weight decay, as the reference) | adamw (decoupled) | sgd (momentum)", choices=OPTIMIZERS))
    lr: float = field(default=1e-3, metadata=_help("peak learning rate"))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum"))
    weight_decay: float = field(default=5e-4, metadata=_help(
        "weight decay of BN parameters, classifier/loss weights and all filters of plain CNNs"))
    sphere_weight_decay: float = field(default=0.0, metadata=_help(
        "weight decay of SphereConv filters (reference: none)"))
    orthogonality: float = field(default=1e-4, metadata=_help(
        "coefficient of ||W^T W - I||_F^2 on SphereConv filters; 0 disables"))
    grad_clip: float | None = field(default=None, metadata=_help("clip the gradient norm to this value; null = off"))
    schedule: str = field(default="step", metadata=_help("step | cosine | onecycle | constant", choices=SCHEDULES))
    lr_milestones: list = field(default_factory=lambda: list(REFERENCE_MILESTONES), metadata=_help(
        "step schedule: fractions of the run at which lr is multiplied by lr_gamma (reference 34k, 54k of 64k)"))
    lr_gamma: float = field(default=0.1, metadata=_help("step schedule: factor applied at each milestone"))
    iterations: int | None = field(default=64000, metadata=_help("optimizer steps of the run (exclusive with epochs)"))
    epochs: float | None = field(default=None, metadata=_help("passes over the training set (exclusive with iterations)"))
    batch_size: int = field(default=128, metadata=_help("global mini-batch size, split evenly over data-parallel ranks"))
    # --- evaluation, checkpoints and logging ---------------------------------------------------
    eval_every: int = field(default=500, metadata=_help("evaluate every N steps (0 = only at the end); reference 500"))
    eval_batch_size: int = field(default=1000, metadata=_help("batch size of evaluation"))
    checkpoint_every: int = field(default=500, metadata=_help("checkpoint every N steps (0 = only at the end)"))
    keep_checkpoints: int = field(default=3, metadata=_help("keep the newest K checkpoints"))
    out: str = field(default="runs/train", metadata=_help("output directory"))
    resume: bool = field(default=False, metadata=_help(
        "continue from the newest intact checkpoint in out; only the keys of run_dir.RESUMABLE_KEYS may change"))
    overwrite: bool = field(default=False, metadata=_help(
        "start afresh even if out holds a run (only its own files are deleted) or other files (kept)"))
    tensorboard: bool = field(default=False, metadata=_help("write TensorBoard logs to out/tensorboard"))
    layer_stats_every: int = field(default=0, metadata=_help(
        "record per-layer statistics (cos theta, activations, gradients) into out/layer_stats.jsonl "
        "every N steps, at most 100 times (see 'sphereconv inspect'); 0 = off"))
    progress: bool = field(default=True, metadata=_help("show a progress bar"))
    # --- execution ---------------------------------------------------------------------------
    device: str = field(default="auto", metadata=_help("auto | cpu | cuda | cuda:N | mps"))
    amp: str = field(default="none", metadata=_help("mixed precision: none | bf16 | fp16 (CUDA only)", choices=AMP_MODES))
    compile: bool = field(default=False, metadata=_help("torch.compile the model"))
    channels_last: bool = field(default=False, metadata=_help("channels-last memory format"))
    seed: int = field(default=0, metadata=_help("seed of torch, numpy and python random"))
    max_nonfinite_steps: int = field(default=20, metadata=_help(
        "stop after this many consecutive steps with a non-finite loss or gradient"))

    def validate(self, check_environment: bool = True) -> "TrainConfig":
        """Check types, ranges, choices and conflicts in place; return ``self``.

        Raises :class:`ConfigError` naming the first bad key, its value and what is allowed.
        Numeric strings (YAML reads ``1e-3`` as a string) and integral floats are converted.
        ``check_environment=False`` skips the checks that depend on this machine (is the device
        there, does it support the chosen precision), e.g. to read a config saved elsewhere.
        """
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_field(f.name, getattr(self, f.name)))
        self._check_conflicts(check_environment)
        return self

    def _check_conflicts(self, check_environment: bool) -> None:
        if (self.iterations is None) == (self.epochs is None):
            raise ConfigError(
                f"set exactly one of iterations and epochs; got iterations={short_repr(self.iterations)}, epochs={short_repr(self.epochs)}")
        if check_environment:
            device = resolve_device_name(self.device)
            if self.amp == "fp16" and not device.startswith("cuda"):
                raise ConfigError(f"amp='fp16' needs a CUDA device, but device resolves to {device!r}; "
                                  "use amp='bf16' or 'none'")
        if self.sphere_norm and self.operator == "none":
            raise ConfigError("sphere_norm=True needs a SphereConv operator, but operator='none'; "
                              "choose operator linear, cosine, sigmoid or learnable_sigmoid, or set sphere_norm false")
        if self.batch_size < 2 and self.batch_norm:
            raise ConfigError(f"batch_size={self.batch_size} is too small for BatchNorm (needs >= 2); raise batch_size or set batch_norm false")


# ------------------------------------------------------------------------------------------------
# Field checks

def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"invalid {key}={short_repr(value)}: expected {allowed}")


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _fail(key, value, "true or false")


def _as_int(key: str, value: Any, minimum: int, allowed: str) -> int:
    if isinstance(value, bool):
        raise _fail(key, value, allowed)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _fail(key, value, allowed) from None
        if not (math.isfinite(number) and number.is_integer()):
            raise _fail(key, value, allowed)
        value = int(number)
    if not isinstance(value, int) or value < minimum:
        raise _fail(key, value, allowed)
    return value


def _as_float(key: str, value: Any, allowed: str, low: float, high: float = math.inf,
              low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool):
        raise _fail(key, value, allowed)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _fail(key, value, allowed) from None
    if not isinstance(value, (int, float)):
        raise _fail(key, value, allowed)
    value = float(value)
    if not math.isfinite(value):
        raise _fail(key, value, allowed)
    if value < low or (low_open and value == low) or value > high or (high_open and value == high):
        raise _fail(key, value, allowed)
    return value


def _as_choice(key: str, value: Any, choices: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> str:
    if not isinstance(value, str):
        raise _fail(key, value, "one of " + ", ".join(choices))
    name = value.strip().lower()
    if aliases:
        name = aliases.get(name, name)
    if name not in choices:
        close = difflib.get_close_matches(name, choices, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"invalid {key}={short_repr(value)}: expected one of {', '.join(choices)}{hint}")
    return name


def _as_str(key: str, value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise _fail(key, value, "a non-empty string")
    return value


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


def _as_kwargs(key: str, value: Any) -> dict:
    if value is None:
        return {}
    allowed = "a mapping of keyword-argument names to values"
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.isidentifier() for k in value):
        raise _fail(key, value, allowed)
    if _count_plain_values(value, MAX_KWARGS_VALUES) < 0:
        raise _fail(key, value, f"{allowed}: at most {MAX_KWARGS_VALUES} plain values (numbers, strings, "
                                f"booleans, null, lists, mappings) nested at most {MAX_CONFIG_DEPTH} deep")
    return dict(value)


def _as_milestones(key: str, value: Any) -> list[float]:
    allowed = "an increasing list of fractions of the run, each in (0, 1)"
    if not isinstance(value, (list, tuple)):
        raise _fail(key, value, allowed)
    fractions = [_as_float(key, v, allowed, 0.0, 1.0, low_open=True, high_open=True) for v in value]
    if any(b <= a for a, b in zip(fractions, fractions[1:])):
        raise _fail(key, value, allowed)
    return fractions


def _as_device(key: str, value: Any) -> str:
    allowed = "auto, cpu, cuda, cuda:N or mps"
    if not isinstance(value, str):
        raise _fail(key, value, allowed)
    name = value.strip().lower()
    if name in DEVICE_NAMES:
        return name
    if name.startswith("cuda:") and name[5:].isascii() and name[5:].isdigit() and len(name) <= MAX_DEVICE_CHARS:
        return name
    raise _fail(key, value, allowed)


def check_device_name(device: Any) -> str:
    """The normalised device name (auto, cpu, cuda, cuda:N, mps); anything else raises ConfigError.

    The one check behind ``train``'s and ``eval``'s ``--device`` and the ``device`` config key.
    """
    return _as_device("device", device)


def _as_model(key: str, value: Any) -> str:
    from ..models import list_models

    name = _as_str(key, value).strip().lower().replace("-", "_")
    return _as_choice(key, name, tuple(list_models()))


def _as_dataset(key: str, value: Any) -> str:
    from ..data.registry import canonical_name, list_datasets
    from ..errors import DatasetError

    name = _as_str(key, value)
    try:
        return canonical_name(name)
    except DatasetError:
        return _as_choice(key, name, tuple(list_datasets()))


def _as_image_size(key: str, value: Any) -> int:
    from ..data.image_folder import MAX_IMAGE_SIZE

    allowed = f"an integer in [1, {MAX_IMAGE_SIZE}] or null"
    size = _as_int(key, value, 1, allowed)
    if size > MAX_IMAGE_SIZE:
        raise _fail(key, value, allowed)
    return size


def _optional(check):
    def wrapped(key: str, value: Any):
        return None if value is None else check(key, value)
    return wrapped


_POSITIVE_INT = "a positive integer"
_NONNEG_FLOAT = "a number >= 0"

# One check per key; each returns the normalised value or raises ConfigError.
_CHECKS: dict[str, Any] = {
    "model": lambda k, v: _as_model(k, v),
    "operator": lambda k, v: _as_choice(k, v, MODEL_OPERATORS, OPERATOR_ALIASES),
    "sigmoid_k": lambda k, v: _as_float(k, v, "a number > 0", 0.0, low_open=True),
    "fc_operator": _optional(lambda k, v: _as_choice(k, v, MODEL_OPERATORS, OPERATOR_ALIASES)),
    "width_mult": lambda k, v: _as_float(k, v, "a number in (0, 16]", 0.0, 16.0, low_open=True),
    "batch_norm": _as_bool,
    "bn_momentum": lambda k, v: _as_float(k, v, "a number in (0, 1]", 0.0, 1.0, low_open=True),
    "sphere_norm": _as_bool,
    "feature_dim": _optional(lambda k, v: _as_int(k, v, 1, _POSITIVE_INT + " or null")),
    "model_kwargs": _as_kwargs,
    "loss": lambda k, v: _as_choice(k, v, LOSSES),
    "loss_kwargs": _as_kwargs,
    "label_smoothing": lambda k, v: _as_float(k, v, "a number in [0, 1)", 0.0, 1.0, high_open=True),
    "dataset": lambda k, v: _as_dataset(k, v),
    "data_dir": _optional(_as_str),
    "download": _as_bool,
    "train_subset": _optional(lambda k, v: _as_int(k, v, 1, _POSITIVE_INT + " or null")),
    "test_subset": _optional(lambda k, v: _as_int(k, v, 1, _POSITIVE_INT + " or null")),
    "image_size": _optional(lambda k, v: _as_image_size(k, v)),
    "augment": lambda k, v: _as_choice(k, v, AUGMENTATIONS),
    "optimizer": lambda k, v: _as_choice(k, v, OPTIMIZERS),
    "lr": lambda k, v: _as_float(k, v, "a number > 0", 0.0, low_open=True),
    "momentum": lambda k, v: _as_float(k, v, "a number in [0, 1)", 0.0, 1.0, high_open=True),
    "weight_decay": lambda k, v: _as_float(k, v, _NONNEG_FLOAT, 0.0),
    "sphere_weight_decay": lambda k, v: _as_float(k, v, _NONNEG_FLOAT, 0.0),
    "orthogonality": lambda k, v: _as_float(k, v, _NONNEG_FLOAT, 0.0),
    "grad_clip": _optional(lambda k, v: _as_float(k, v, "a number > 0 or null", 0.0, low_open=True)),
    "schedule": lambda k, v: _as_choice(k, v, SCHEDULES),
    "lr_milestones": _as_milestones,
    "lr_gamma": lambda k, v: _as_float(k, v, "a number in (0, 1]", 0.0, 1.0, low_open=True),
    "iterations": _optional(lambda k, v: _as_int(k, v, 1, _POSITIVE_INT + " or null")),
    "epochs": _optional(lambda k, v: _as_float(k, v, "a number > 0 or null", 0.0, low_open=True)),
    "batch_size": lambda k, v: _as_int(k, v, 1, _POSITIVE_INT),
    "eval_every": lambda k, v: _as_int(k, v, 0, "an integer >= 0 (0 = only at the end)"),
    "eval_batch_size": lambda k, v: _as_int(k, v, 1, _POSITIVE_INT),
    "checkpoint_every": lambda k, v: _as_int(k, v, 0, "an integer >= 0 (0 = only at the end)"),
    "keep_checkpoints": lambda k, v: _as_int(k, v, 1, _POSITIVE_INT),
    "out": _as_str,
    "resume": _as_bool,
    "overwrite": _as_bool,
    "tensorboard": _as_bool,
    "layer_stats_every": lambda k, v: _as_int(k, v, 0, "an integer >= 0 (0 = off)"),
    "progress": _as_bool,
    "device": _as_device,
    "amp": lambda k, v: _as_choice(k, v, AMP_MODES),
    "compile": _as_bool,
    "channels_last": _as_bool,
    # numpy seeds must fit in 32 bits.
    "seed": lambda k, v: _check_seed(k, _as_int(k, v, 0, "an integer in [0, 2**32)")),
    "max_nonfinite_steps": lambda k, v: _as_int(k, v, 1, _POSITIVE_INT),
}


def _check_seed(key: str, value: int) -> int:
    if value >= 2**32:
        raise _fail(key, value, "an integer in [0, 2**32)")
    return value


def _check_field(key: str, value: Any) -> Any:
    return _CHECKS[key](key, value)


# ------------------------------------------------------------------------------------------------
# Loading and saving

def config_keys() -> tuple[str, ...]:
    """Names of every configuration key, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig))


def describe_keys() -> dict[str, str]:
    """Map each key to its one-line description (the dataclass field's ``help`` metadata)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(TrainConfig)}


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
        raise ConfigError(f"{source}: set either epochs ({short_repr(layer['epochs'])}) or iterations "
                          f"({short_repr(layer['iterations'])}), not both")
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
                "allowed in config files (aliases can expand to billions of values); write the value out")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise ConfigError(f"{self.source} line {line}: lists or mappings nested more than {MAX_CONFIG_DEPTH} "
                                  "deep; a config file needs a few levels")
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
                    raise ConfigError(f"{self.source} line {line}: key {short_repr(key)} given twice "
                                      f"(first at line {first_line[key]}); keep one")
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


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
        raise ConfigError(f"{source} is larger than the {MAX_CONFIG_BYTES:,} bytes allowed; a config file is a few lines "
                          "of key: value")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source} is not UTF-8 text (byte {exc.start}); is it a config file?") from None
    loader = None
    try:
        loader = _ConfigLoader(text)  # the reader already refuses control characters here
        loader.source = source
        data = loader.get_single_data()
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
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Resolve a :class:`TrainConfig`: defaults, then the YAML file at ``path``, then ``overrides``.

    ``overrides`` holds explicitly given values (command-line flags); ``None`` values are ignored.
    Keys may use ``-`` or ``_``. Unknown keys raise ConfigError with the closest valid names.
    With ``resume`` set and no ``path``, the ``config.yaml`` of the run in ``out`` (if any), with
    the amendments of earlier resumes, is the file layer, so ``--out DIR --resume`` alone continues
    a run with its own settings.
    The result is validated.
    """
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides must be a mapping of keys to values, not {type(overrides).__name__}")
    given = _normalise_keys({k: v for k, v in (overrides or {}).items() if v is not None}, "overrides")
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
