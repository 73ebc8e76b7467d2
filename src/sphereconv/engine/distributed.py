"""Data-parallel training through ``torchrun``: process-group setup, device choice, reductions.

``torchrun`` (torch.distributed.run) starts one process per device and sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; when they are present with ``WORLD_SIZE > 1`` the trainer joins a
process group (NCCL on CUDA, gloo on CPU) and wraps the model in ``DistributedDataParallel``. Each
rank reads its own shard of every batch; gradients are averaged by DDP; only rank 0 logs and writes
files.

Every collective runs under a timeout (``SPHERECONV_DIST_TIMEOUT`` seconds, default
:data:`DEFAULT_TIMEOUT_S`), so when one rank dies the others fail with an error within bounded
time instead of hanging. With gloo a dead peer usually surfaces at once as a closed connection.

Leaving the group cleanly: a gloo group that DDP wrapped keeps its worker threads after
``destroy_process_group`` until the process exits, and a worker that still holds the tensors of
the last collective when the interpreter shuts down must take the GIL to release Python-owned
tensors, which aborts the process ("terminate called without an active exception", exit code -6,
after a run that finished and wrote its summary; about one two-rank run in twelve on two loaded
cores). So the run's last collectives broadcast the buffers through tensors that only C++ owns,
and after a run that ended normally every rank waits at a barrier (the GIL released) before
leaving.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .config import resolve_device_name

# Environment variable and default (seconds) of the collective timeout. Ten minutes matches
# NCCL's own default and leaves room for a slow evaluation or checkpoint on rank 0.
TIMEOUT_ENV = "SPHERECONV_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
# Bytes per flat buffer of the coalesced buffer broadcast: DDP's default for its start-up
# broadcast of the module states (250 MiB); a model's BatchNorm statistics fit in one.
BROADCAST_BUCKET_BYTES = 250 * 1024 * 1024


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer (torchrun sets it)") from None


def collective_timeout() -> timedelta:
    """The collective timeout from ``SPHERECONV_DIST_TIMEOUT`` (seconds, > 0)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"environment variable {TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return timedelta(seconds=seconds)


# Fragments of the messages with which gloo and NCCL report a peer that died or stopped answering.
_PEER_FAILURE_MARKERS = ("gloo", "nccl", "connection reset", "connection closed", "broken pipe", "timed out", "timeout")


def is_peer_failure(exc: BaseException) -> bool:
    """True for the errors a collective raises when another rank died or hung."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _PEER_FAILURE_MARKERS)


@dataclass
class DistributedContext:
    """Where this process sits in a (possibly single-process) data-parallel run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when a process group with more than one rank is active."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that logs and writes files."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (no-op in a single process); returns it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather_int(self, value: int) -> list[int]:
        """``value`` of every rank, in rank order (``[value]`` in a single process)."""
        if not self.enabled:
            return [int(value)]
        local = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        gathered = [torch.zeros_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        return [int(t.item()) for t in gathered]

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

        DDP broadcasts them at the start of each forward pass, so after a step every rank holds the
        statistics of its own last batch; this makes the ranks agree before evaluating or saving.
        The copy goes through flat buffers that only C++ owns (as DDP's own start-up broadcast
        does), so no gloo worker needs the GIL to release them (see the module docstring).
        """
        if not self.enabled:
            return
        buffers = [buffer.detach() for buffer in module.buffers()]
        group = dist.group.WORLD
        if buffers and group is not None:
            dist._broadcast_coalesced(group, buffers, BROADCAST_BUCKET_BYTES, 0)

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.enabled:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self) -> None:
        """Leave the process group (if this context joined one)."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
        self.backend = None


def setup_distributed(device: str = "auto") -> DistributedContext:
    """Detect ``torchrun`` from the environment and join its process group with a timeout.

    Single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``): returns a context on the resolved
    ``device``. Otherwise: CUDA available and ``device`` not ``cpu`` -> NCCL on ``cuda:LOCAL_RANK``;
    else gloo on the CPU.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    name = resolve_device_name(device)
    if world_size == 1:
        if name == "cuda":
            name = f"cuda:{torch.cuda.current_device()}"
        return DistributedContext(device=torch.device(name))
    timeout = collective_timeout()
    if name.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        # Let NCCL abort a collective that passes the timeout instead of blocking forever.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
        backend = "nccl"
        dist.init_process_group(backend, timeout=timeout, device_id=torch_device)
    elif name == "cpu":
        torch_device = torch.device("cpu")
        backend = "gloo"
        dist.init_process_group(backend, timeout=timeout)
    else:
        raise ConfigError(f"data-parallel training supports CUDA (nccl) or CPU (gloo) devices, not {name!r}")
    return DistributedContext(
        rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device, backend=backend
    )
