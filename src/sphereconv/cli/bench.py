"""``sphereconv bench``: time SphereConv against the plain convolution it replaces.

Forward + backward of ``SphereConv2d`` for every operator against ``nn.Conv2d`` at the SphereNet-9
layer shapes and a ResNet stage shape (Liu et al., NIPS 2017, Sec. 5), interleaved, medians of
many rounds, fp32 and bf16 autocast; ``--models`` adds one training step of ``spherenet9`` per
operator against its CNN baseline. Prints a table; ``--json FILE`` writes the records (see
:mod:`sphereconv.bench`).
"""

from __future__ import annotations

import argparse
import os
import sys

from .parsing import CommandLineError, non_negative_int, output_file, positive_float, positive_int


def _csv(allowed: tuple[str, ...], what: str):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        aliases = {"lr_sigmoid": "learnable_sigmoid"}
        items = list(dict.fromkeys(aliases.get(item, item) for item in items))  # each once, in order
        bad = [item for item in items if item not in allowed]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(bad) or repr(text)}; allowed: {', '.join(allowed)}"
            )
        return items

    return parse


def _shape(text: str):
    from ..bench import parse_shape

    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``subparsers``; sets ``func(args) -> int``."""
    from ..bench import DTYPES
    from ..nn.angular import SPHERE_OPERATORS

    parser = subparsers.add_parser(
        "bench",
        description=(
            "Forward+backward of SphereConv2d for every operator against nn.Conv2d of the same shape, "
            "interleaved in one run, warm-up excluded, medians of many rounds. Default shapes: the "
            "SphereNet-9 layers (batch 128; 16 on CPU) and a 256-channel 56x56 ResNet stage (batch 64; 2 on CPU)."
        ),
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument(
        "--dtypes",
        type=_csv(tuple(DTYPES), "dtype"),
        default=None,
        help="comma-separated: fp32, bf16 (autocast); default both, fp32 only on a CPU without fast bfloat16 units",
    )
    parser.add_argument(
        "--operators",
        type=_csv(SPHERE_OPERATORS, "operator"),
        default=list(SPHERE_OPERATORS),
        help="comma-separated SphereConv operators; default all",
    )
    parser.add_argument(
        "--shape",
        dest="shapes",
        type=_shape,
        action="append",
        default=None,
        metavar="NxCINxCOUTxHW",
        help="a layer shape to time instead of the defaults (3x3 kernel, padding 1); repeatable",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help="measured rounds per shape and dtype (default 25 on CUDA; on CPU 7, fewer where "
        "needed to finish within about 2 minutes)",
    )
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="warm-up rounds, not measured (default 2)")
    parser.add_argument(
        "--models", action="store_true", help="also time one training step of spherenet9 vs its CNN baseline"
    )
    parser.add_argument("--models-only", action="store_true", help="time only the training steps (implies --models)")
    parser.add_argument(
        "--model-batch", type=positive_int, default=None, help="training-step batch (default 128 on CUDA, 16 on CPU)"
    )
    parser.add_argument(
        "--model-width-mult",
        type=positive_float,
        default=1.0,
        help="width multiplier of the benchmarked spherenet9 (default 1.0)",
    )
    parser.add_argument(
        "--reference", action="store_true", help="also time the unfused reference implementation of every operator"
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument(
        "--timer",
        choices=("wall", "cpu"),
        default="wall",
        help="CPU only: wall-clock time (default) or process CPU time, which waiting for a core "
        "on a loaded machine does not inflate (use with --threads 1)",
    )
    parser.add_argument(
        "--json",
        dest="json_path",
        type=output_file,
        default=None,
        metavar="FILE",
        help="write the records as JSON to FILE",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed of weights and inputs")
    parser.set_defaults(func=run_command)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run the benchmark described by the parsed ``args``; prints the table, returns 0."""
    import torch

    from .. import bench

    try:
        device = bench.resolve_device(args.device)
    except ValueError as exc:
        raise CommandLineError(f"--device: {exc}") from None
    max_threads = os.cpu_count() or 1
    if args.threads is not None and args.threads > max_threads:
        raise CommandLineError(
            f"--threads must be at most {max_threads} (the CPUs of this machine); got {args.threads}"
        )
    if args.json_path is not None:
        _check_writable(args.json_path)
    config = bench.BenchConfig(
        device=str(device),
        dtypes=args.dtypes,
        operators=args.operators,
        shapes=args.shapes,
        repeats=args.repeats,
        warmup=args.warmup,
        models=args.models or args.models_only,
        model_batch=args.model_batch,
        model_width_mult=args.model_width_mult,
        layers=not args.models_only,
        reference=args.reference,
        seed=args.seed,
        timer=args.timer,
    )
    try:  # every value and the memory of every workload, before anything is allocated
        bench.validate(config)
    except ValueError as exc:
        raise CommandLineError(str(exc)) from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    machine = bench.machine_description(device)
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['threads']} threads"
    print(f"sphereconv bench on {device.type} ({where}), torch {machine['torch']}", flush=True)
    notes: list[str] = []
    try:
        records = bench.run(
            config, notes=notes, progress=lambda message: print(f"  timing {message} ...", file=sys.stderr, flush=True)
        )
    except (MemoryError, RuntimeError) as exc:  # the memory estimate is rough: a failed allocation is one line
        text = " ".join(str(exc).split())
        if not isinstance(exc, MemoryError) and "alloc" not in text.lower() and "out of memory" not in text.lower():
            raise
        raise CommandLineError(
            f"out of memory on {device.type}: {text[:200]}; use a smaller --shape or --model-batch"
        ) from None
    print(bench.format_table(records))
    for note in notes:
        print(f"note: {note}")
    if args.json_path:
        bench.write_json(records, args.json_path)
        print(f"wrote {len(records)} records to {args.json_path}")
    return 0


def _check_writable(path: str) -> None:
    """One-line error now, not after the whole run, if ``--json`` cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CommandLineError(f"--json: {path} is a directory; give a file name")
    if not os.path.isdir(folder):
        raise CommandLineError(f"--json: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise CommandLineError(f"--json: {path} is not writable")
