"""Keep freed memory in the process for reuse (glibc's malloc; Linux).

A training step frees and allocates the same activation-sized blocks (megabytes each) at every step.
With its default settings glibc returns such blocks to the system (those above its dynamic mmap
threshold, and the top of the heap beyond its trim threshold) and the next step maps them again,
paying one page fault per 4 KiB page it touches: on the virtual machines measured in BENCHMARKS.md,
1.8 us per page, up to 28 ms per step of SphereNet-9 at the quick start's shape. PyTorch's CUDA
allocator caches its blocks for the same reason; on CPU it calls ``malloc`` and ``free`` directly.

:func:`keep_freed_memory` raises both thresholds, so that freed blocks stay in the heap for the next
step. The process then holds on to its peak memory, which a training process reaches at every step
anyway. The command line calls it at start; it leaves glibc's defaults in place where the user set
the glibc variables themselves (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``GLIBC_TUNABLES``) or ``SPHERECONV_KEEP_FREED_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import os
import sys

KEEP_FREED_MEMORY_ENV = "SPHERECONV_KEEP_FREED_MEMORY"
# glibc's own settings, each of which means the user chose the malloc behaviour.
_GLIBC_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap: glibc's largest dynamic mmap threshold on 64-bit
# systems (DEFAULT_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * sizeof(long)), above any activation of the
# models run here; larger ones are still mapped and unmapped.
MMAP_THRESHOLD_BYTES = 32 * 2**20
# Free memory at the top of the heap kept before trimming: the largest value mallopt accepts (int).
TRIM_THRESHOLD_BYTES = 2**31 - 1


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks (up to :data:`MMAP_THRESHOLD_BYTES`) for reuse by this
    process; True if the settings were made, False where they are not (not glibc, or the user chose:
    see the module docstring)."""
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1") == "0" or any(name in os.environ for name in _GLIBC_MALLOC_ENV):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc; musl and others have no mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
