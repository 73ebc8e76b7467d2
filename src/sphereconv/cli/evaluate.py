"""``sphereconv eval``: test accuracy of a saved checkpoint (:func:`sphereconv.engine.evaluate`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CheckpointError
from .parsing import device_name, existing_directory, help_text, positive_int


def register(subparsers) -> None:
    """Add the ``eval`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser("eval", description=help_text(__doc__))
    parser.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="checkpoint file, or a run directory (its newest checkpoint)"
    )
    parser.add_argument(
        "--data-dir",
        type=existing_directory,
        default=None,
        help="folder holding the dataset files (default: where the run found them)",
    )
    parser.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--test-subset", type=positive_int, default=None, help="evaluate on N test images only (stratified)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=None, help="evaluation batch size (default: the run's)"
    )
    parser.set_defaults(func=run)


def resolve_checkpoint(path: str) -> Path:
    """``path`` itself, or the newest checkpoint of the run directory ``path``."""
    from ..engine.checkpoint import checkpoint_dir, list_checkpoints

    if not path.strip():
        raise CheckpointError("CHECKPOINT is empty: expected a checkpoint file or a run directory")
    candidate = Path(path)
    if not candidate.is_dir():
        return candidate
    found = list_checkpoints(checkpoint_dir(candidate)) or list_checkpoints(candidate)
    if not found:
        raise CheckpointError(f"run directory {path!r} holds no checkpoint (looked in {checkpoint_dir(candidate)})")
    return found[-1][1]


def run(args: argparse.Namespace) -> int:
    """Evaluate the checkpoint and print its test accuracy; returns the exit code."""
    from ..engine import evaluate

    checkpoint = resolve_checkpoint(args.checkpoint)
    result = evaluate(checkpoint, args.data_dir, args.device, batch_size=args.batch_size, subset_size=args.test_subset)
    print(
        f"test accuracy: {100 * result['accuracy']:.2f}% "
        f"({result['images']} {result['dataset']} {result['split']} images, "
        f"loss {result['loss']:.4f}, {result['model']} operator={result['operator']}, step {result['step']})"
    )
    return 0
