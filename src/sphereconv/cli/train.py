"""``sphereconv train``: train one model from a YAML config plus flag overrides.

The YAML file (``--config``: a file, or a preset of :mod:`sphereconv.configs` by name) gives the
defaults, the flags actually given on the command line override it key by key, and the engine
validates the result (:func:`sphereconv.engine.load_config`). ``--dry-run`` stops after validation
and prints the resolved config.

Every config key has a flag of the same name (``batch_size``: ``--batch-size``), generated from the
key's declaration (:func:`sphereconv.engine.config.key_specs`): the same type, its default and
allowed values in the help. Booleans have ``--KEY``/``--no-KEY``, mappings take YAML text or
``KEY=VALUE`` (repeatable), lists one or more numbers. A flag parses only its type; the value is
checked by the config key's own check, and a bad value is reported naming the flag.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import ConfigError
from .parsing import EXIT_INTERRUPTED, CommandLineError, Nullable, finite_float, help_text, mapping_text

# Placeholder of a flag's value in the usage line, by the key's type.
METAVARS = {int: "N", float: "X", str: "TEXT"}


class MergeMappings(argparse.Action):
    """Action of a mapping flag: each occurrence adds its keys to the mapping (a later one wins)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest, None) or {}), **values})


def flag_help(key) -> str:
    """Help text of the flag of ``key`` (a :class:`~sphereconv.engine.config.KeySpec`)."""
    from ..engine.config import yaml_text

    text = f"{key.help}; {key.allowed()} (default: {yaml_text(key.default)})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_key_flag(parser: argparse.ArgumentParser, key) -> argparse.Action:
    """Add the flag of config key ``key``; it sets ``key.name`` only when given."""
    options = dict(dest=key.name, default=argparse.SUPPRESS, help=flag_help(key))
    if key.kind is bool:
        return parser.add_argument(key.flag, action=argparse.BooleanOptionalAction, **options)
    if key.kind is dict:
        return parser.add_argument(
            key.flag, type=mapping_text, action=MergeMappings, metavar="YAML|KEY=VALUE", **options
        )
    if key.kind is list:
        return parser.add_argument(key.flag, type=key.item_kind, nargs="+", metavar=METAVARS[key.item_kind], **options)
    metavar = "NAME" if key.choices() is not None else METAVARS[key.kind]
    kind = Nullable(key.kind) if key.optional else key.kind  # "--grad-clip null" resets a config file's value
    return parser.add_argument(key.flag, type=kind, metavar=metavar, **options)


def register(subparsers) -> None:
    """Add the ``train`` subcommand to ``subparsers``: one flag per config key plus a few of its own."""
    from ..configs import list_presets
    from ..engine.config import key_specs

    parser = subparsers.add_parser("train", description=help_text(__doc__.split("\n\n")[0]))
    parser.add_argument(
        "--config",
        metavar="NAME_OR_FILE",
        default=None,
        help=f"YAML config file, or the name of a preset shipped with the package: {', '.join(list_presets())}",
    )
    for key in key_specs():
        add_key_flag(parser, key)
    parser.add_argument(
        "--margin",
        type=finite_float,
        default=argparse.SUPPRESS,
        help="angular margin of the loss (sets loss_kwargs.margin)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="validate and print the resolved config without training"
    )
    parser.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """TrainConfig overrides for exactly the flags given on the command line, each checked by its
    key's check (a bad value is a one-line error naming the flag)."""
    from ..engine.config import NULL, key_specs

    given = vars(args)
    if "epochs" in given and "iterations" in given:
        raise CommandLineError("--epochs and --iterations are mutually exclusive; give one of them")
    overrides = {}
    for key in key_specs():
        if key.name in given:
            try:
                value = key.check(given[key.name])
            except ConfigError as exc:
                raise CommandLineError(f"argument {key.flag}: {exc}") from None
            overrides[key.name] = NULL if value is None else value  # "--grad-clip null" resets the key
    # A length given here replaces the config file's length of the other kind (load_config does it).
    return overrides


def resolve_config(args: argparse.Namespace):
    """The validated TrainConfig of ``args`` (config file, then flags, then ``--margin``)."""
    from ..configs import find_config
    from ..engine import load_config

    config_file = find_config(args.config) if args.config is not None else None
    overrides = overrides_from_args(args)
    if "margin" in vars(args):
        given = overrides.get("loss_kwargs")
        loss_kwargs = given if given is not None else load_config(config_file, overrides).loss_kwargs
        overrides["loss_kwargs"] = {**loss_kwargs, "margin": args.margin}
    return load_config(config_file, overrides)


def format_summary(summary: dict) -> str:
    """The one-line summary printed when training ends."""
    parts = []
    if summary.get("final_test_acc") is not None:
        parts.append(f"final test acc {100 * summary['final_test_acc']:.2f}%")
    if summary.get("best_test_acc") is not None:
        best = f"best {100 * summary['best_test_acc']:.2f}%"
        if summary.get("best_step") is not None:
            best += f" at step {summary['best_step']}"
        parts.append(best)
    if summary.get("steps") is not None:
        parts.append(f"{summary['steps']} steps")
    if summary.get("images_per_second") is not None:
        parts.append(f"{summary['images_per_second']:,.0f} images/s")
    return ", ".join(parts)


def check_names(config):
    """Fail early (before any data is read) on an unknown model or dataset name; returns the
    dataset's :class:`~sphereconv.data.DatasetInfo`."""
    from ..data import dataset_info
    from ..models.registry import get_model_factory

    get_model_factory(config.model)
    return dataset_info(config.dataset, config.data_dir, image_size=config.image_size)


def check_network(config, info) -> None:
    """Build the network and its loss for the dataset ``info`` on the meta device (no memory, no
    weights), so that a bad ``model_kwargs`` or ``loss_kwargs`` fails the dry run as it would fail
    the run."""
    import torch

    from ..engine.objective import build_loss_module, build_model

    with torch.device("meta"):
        model = build_model(config, info.num_classes, info.in_channels, info.image_size)
        build_loss_module(config, model, info.num_classes)


def run(args: argparse.Namespace) -> int:
    """Resolve the config, then train (or only print it with ``--dry-run``); returns the exit code."""
    config = resolve_config(args)
    info = check_names(config)
    if args.dry_run:
        from ..engine.config import format_config

        check_network(config, info)

        sys.stdout.write(format_config(config))
        print("config is valid (dry run: nothing trained)")
        return 0
    from ..engine import train
    from ..engine.callbacks import PrintProgress

    # Without the bar (--no-progress, output to a log file), plain lines say where the run stands.
    summary = train(config, () if config.progress else (PrintProgress(),))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return EXIT_INTERRUPTED if summary.get("interrupted") else 0
    if summary.get("interrupted"):
        print(
            f"stopped at step {summary.get('steps')} ({summary['interrupted']}); "
            f"continue with --resume --out {config.out}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(f"done: {format_summary(summary)}; results in {config.out}")
    return 0
