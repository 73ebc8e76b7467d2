"""``sphereconv selftest``: verify the installation on this machine's hardware.

Every SphereConv operator and layer type (Liu et al., NIPS 2017, Sec. 2.1) through the default
(fused) path against the float64 reference path, forward and backward, in every dtype the device
supports; the kernel path of each case; a few training steps of a tiny SphereNet-9 (Sec. 5) with a
decreasing loss. Prints a table and exits with code 1 when any check fails (see
:mod:`sphereconv.selftest`).
"""

from __future__ import annotations

import argparse
import sys
import time

from .parsing import CommandLineError

EXIT_FAILED = 1


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``selftest`` subcommand to ``subparsers``; sets ``func(args) -> int``."""
    parser = subparsers.add_parser(
        "selftest",
        description=(
            "Runs every operator and layer type (1d/2d/3d, linear, learnable k, groups, stride, dilation, "
            "padding modes) through the default path, forward and backward, in every dtype the device supports, "
            "against the float64 reference path; then a few SphereNet-9 training steps. Prints a table; exit "
            "code 1 if any check fails."
        ),
    )
    parser.add_argument("--device", default="auto", help="auto (default: CUDA if available), cpu, cuda or cuda:N")
    parser.set_defaults(func=run_command)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run the self-test on ``args.device``; prints the table, returns 0 or :data:`EXIT_FAILED`."""
    import torch

    from .. import selftest
    from ..bench import machine_description, resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise CommandLineError(f"--device: {exc}") from None
    machine = machine_description(device)
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['threads']} threads"
    print(f"sphereconv selftest on {device} ({where}), torch {torch.__version__}", flush=True)
    start = time.perf_counter()
    results = selftest.run(
        device, progress=lambda message: print(f"  checking {message} ...", file=sys.stderr, flush=True)
    )
    print(selftest.format_table(results))
    for line in selftest.kernel_summary():
        print(line)
    failed = selftest.failures(results)
    seconds = time.perf_counter() - start
    if failed:
        names = ", ".join(f"{r.case} [{r.dtype}]" for r in failed[:10]) + (" ..." if len(failed) > 10 else "")
        print(f"selftest FAILED: {len(failed)} of {len(results)} checks ({seconds:.1f} s): {names}")
        return EXIT_FAILED
    print(f"selftest passed: {len(results)} checks in {seconds:.1f} s")
    return 0
