"""``sphereconv train``: train one model from a YAML config plus flag overrides.

The YAML file (``--config``, e.g. one of configs/) gives the defaults, the flags actually given on
the command line override it key by key, and the engine validates the result
(:func:`sphereconv.engine.load_config`). ``--dry-run`` stops after validation and prints the
resolved config.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from .parsing import CommandLineError, finite_float, non_negative_int, positive_float, positive_int

# Exit code of a run stopped by a signal (the CLI's convention for interrupts).
EXIT_INTERRUPTED = 1

# Flags that map one-to-one to a TrainConfig key: (flag, key, argparse keywords, help).
VALUE_FLAGS: tuple[tuple[str, str, dict, str], ...] = (
    ("--model", "model", {}, "registered model name (see 'sphereconv list-models')"),
    ("--operator", "operator", {}, "SphereConv operator: linear, cosine, sigmoid, learnable_sigmoid, or none (plain CNN)"),
    ("--dataset", "dataset", {}, "dataset name (see 'sphereconv list-datasets')"),
    ("--data-dir", "data_dir", {}, "folder holding the dataset files"),
    ("--epochs", "epochs", {"type": positive_int}, "train for this many epochs (exclusive with --iterations)"),
    ("--iterations", "iterations", {"type": positive_int}, "train for this many iterations (exclusive with --epochs)"),
    ("--batch-size", "batch_size", {"type": positive_int}, "mini-batch size (per process)"),
    ("--lr", "lr", {"type": positive_float}, "base learning rate"),
    ("--optimizer", "optimizer", {}, "adam, adamw or sgd"),
    ("--schedule", "schedule", {}, "learning-rate schedule: step, cosine, onecycle or constant"),
    ("--width-mult", "width_mult", {"type": positive_float}, "multiply every layer width by this"),
    ("--sigmoid-k", "sigmoid_k", {"type": positive_float}, "k of the sigmoid operator (reference 0.3)"),
    ("--bn-momentum", "bn_momentum", {"type": positive_float},
     "BatchNorm running-average momentum in (0, 1] (default 0.1; the reference recipe's 0.001 needs ~64k iterations)"),
    ("--weight-decay", "weight_decay", {"type": finite_float}, "weight decay of BN, classifier and plain-conv weights (>= 0)"),
    ("--label-smoothing", "label_smoothing", {"type": finite_float}, "label smoothing of the loss, in [0, 1)"),
    ("--loss", "loss", {}, "softmax, weight_normalized, ga_softmax, a_softmax, cosface or arcface"),
    ("--train-subset", "train_subset", {"type": positive_int}, "use only the first N training images"),
    ("--test-subset", "test_subset", {"type": positive_int}, "use only the first N test images"),
    ("--image-size", "image_size", {"type": positive_int},
     "image folders: resize every image to N x N pixels when loading (default: own size if one and <= 64, else 32)"),
    ("--augment", "augment", {}, "none, flip or crop_flip"),
    ("--eval-every", "eval_every", {"type": positive_int}, "evaluate on the test set every N iterations"),
    ("--checkpoint-every", "checkpoint_every", {"type": non_negative_int}, "save a checkpoint every N iterations (0: only at the end)"),
    ("--layer-stats-every", "layer_stats_every", {"type": non_negative_int}, "record per-layer statistics every N iterations into --out/layer_stats.jsonl (0: off)"),
    ("--device", "device", {}, "auto, cpu, cuda, cuda:N or mps"),
    ("--amp", "amp", {}, "mixed precision: none, bf16 or fp16"),
    ("--seed", "seed", {"type": non_negative_int}, "random seed"),
    ("--out", "out", {}, "output directory"),
)
# Boolean switches: (flag, key, value the key gets when the flag is given, help).
SWITCH_FLAGS: tuple[tuple[str, str, bool, str], ...] = (
    ("--download", "download", True, "download the dataset if it is missing"),
    ("--compile", "compile", True, "compile the model with torch.compile"),
    ("--channels-last", "channels_last", True, "use the channels_last memory format"),
    ("--resume", "resume", True, "continue the run in --out from its newest intact checkpoint; only its length, "
     "evaluation/checkpoint cadence, logging and device may change (recorded in amendments.json)"),
    ("--overwrite", "overwrite", True, "start afresh even if --out already holds a run (deletes only that run's own "
     "files) or other files (kept; never replaced)"),
    ("--tensorboard", "tensorboard", True, "also write TensorBoard logs into --out"),
    ("--no-progress", "progress", False, "no progress bar"),
)


def register(subparsers) -> None:
    """Add the ``train`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser("train", help="train a model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", metavar="FILE.yaml", default=None, help="YAML config (configs/ has one per paper experiment)")
    for flag, key, kwargs, help_text in VALUE_FLAGS:
        parser.add_argument(flag, dest=key, default=argparse.SUPPRESS, help=help_text, **kwargs)
    parser.add_argument("--margin", type=finite_float, default=argparse.SUPPRESS, help="angular margin of the loss (loss_kwargs.margin)")
    for flag, key, value, help_text in SWITCH_FLAGS:
        parser.add_argument(flag, dest=key, action="store_const", const=value, default=argparse.SUPPRESS, help=help_text)
    parser.add_argument("--dry-run", action="store_true", help="validate and print the resolved config without training")
    parser.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """TrainConfig overrides for exactly the flags given on the command line."""
    given = vars(args)
    if "epochs" in given and "iterations" in given:
        raise CommandLineError("--epochs and --iterations are mutually exclusive; give one of them")
    keys = [key for _, key, _, _ in VALUE_FLAGS] + [key for _, key, _, _ in SWITCH_FLAGS]
    # A length given here replaces the config file's length of the other kind (load_config does it).
    return {key: given[key] for key in keys if key in given}


def resolve_config(args: argparse.Namespace):
    """The validated TrainConfig of ``args`` (config file, then flags, then ``--margin``)."""
    from ..engine import load_config

    overrides = overrides_from_args(args)
    config = load_config(args.config, overrides)
    if "margin" in vars(args):
        loss_kwargs = dict(getattr(config, "loss_kwargs", None) or {})
        loss_kwargs["margin"] = args.margin
        config = load_config(args.config, {**overrides, "loss_kwargs": loss_kwargs})
    return config


def config_as_yaml(config) -> str:
    """The resolved config as YAML text."""
    from ..engine import config_to_dict

    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


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


def check_names(config) -> None:
    """Fail early (before any data is read) on an unknown model or dataset name."""
    from ..data import dataset_info
    from ..models.registry import get_model_factory

    get_model_factory(config.model)
    dataset_info(config.dataset, config.data_dir, image_size=config.image_size)


def run(args: argparse.Namespace) -> int:
    """Resolve the config, then train (or only print it with ``--dry-run``); returns the exit code."""
    config = resolve_config(args)
    check_names(config)
    if args.dry_run:
        sys.stdout.write(config_as_yaml(config))
        print("config is valid (dry run: nothing trained)")
        return 0
    from ..engine import train

    summary = train(config)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return EXIT_INTERRUPTED if summary.get("interrupted") else 0
    if summary.get("interrupted"):
        print(f"stopped at step {summary.get('steps')} ({summary['interrupted']}); continue with --resume --out {config.out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"done: {format_summary(summary)}; results in {config.out}")
    return 0
