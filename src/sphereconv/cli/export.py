"""``sphereconv export``: a trained network as an ONNX, ``torch.export`` or safetensors file for
inference (:func:`sphereconv.engine.export.export_checkpoint`)."""

from __future__ import annotations

import argparse

from .evaluate import resolve_checkpoint
from .parsing import existing_directory, help_text, output_file

FORMATS = ("onnx", "pt2", "safetensors")


def register(subparsers) -> None:
    """Add the ``export`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser(
        "export",
        description=help_text(__doc__),
        epilog="The exported network takes uint8 images (batch, channels, height, width) as the dataset "
        "stores them and returns class scores; the pixel scaling of training is inside it. The file is "
        "loaded again and checked against the checkpoint's network before the command succeeds.",
    )
    parser.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="checkpoint file, or a run directory (its newest checkpoint)"
    )
    parser.add_argument(
        "--out",
        type=output_file,
        required=True,
        help="file to write: .onnx, .pt2 or .safetensors (the extension picks the format)",
    )
    parser.add_argument("--format", choices=FORMATS, default=None, help="the format, whatever the extension of --out")
    parser.add_argument(
        "--data-dir",
        type=existing_directory,
        default=None,
        help="folder holding the dataset files, for an image folder dataset (default: where the run found them)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export and print what was written; returns the exit code."""
    from ..engine.export import export_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)
    result = export_checkpoint(checkpoint, args.out, args.format, args.data_dir)
    meta = result.metadata
    print(
        f"exported {meta['model']} (operator={meta['operator']}, step {meta['step']}) from {checkpoint} to "
        f"{result.path} ({result.format})\n"
        f"  input: {meta['input']}; output: {meta['output']}\n"
        f"  checked on random pixels: largest difference from the checkpoint's network {result.max_difference:.2g}"
    )
    return 0
