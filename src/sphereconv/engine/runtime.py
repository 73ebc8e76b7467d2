"""What a training process needs around the model: seeds, stop signals, precision, placement, failures.

The training recipe is that of Liu et al., "Deep Hyperspherical Learning" (NIPS 2017, Sec. 5); this
module holds the parts that belong to the process running it rather than to the recipe:

- :func:`seed_everything` seeds every generator a run draws from;
- :class:`StopSignals` turns SIGINT / SIGTERM into a request to checkpoint and stop;
- :func:`autocast` and :func:`grad_scaler` select mixed precision (``amp`` none / bf16 / fp16);
- :func:`place_on_device` and :func:`wrap_for_training` put the modules on the run's device and wrap
  them for data parallelism and ``torch.compile``;
- :func:`oom_message`, :func:`divergence_message` and :func:`peer_failure_message` say in one line
  what went wrong and what to try.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import EXCERPT_CHARS
from .config import TrainConfig
from .distributed import DistributedContext

logger = logging.getLogger(__name__)

# Signals that ask a run to checkpoint and stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StopSignals:
    """Context manager: the first SIGINT/SIGTERM sets :attr:`received`; a second aborts at once.

    Handlers are installed only in the main thread (Python allows no other) and restored on exit.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str | None:
        """The name of the signal received (``"SIGTERM"``), or None."""
        return signal.Signals(self.received).name if self.received is not None else None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            self.__exit__(None, None, None)
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without a checkpoint")
        self.received = signum
        logger.warning(
            "received %s: finishing the current step, writing a checkpoint and stopping "
            "(send it again to abort at once)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` (``bf16``/``fp16``) on ``device``; a null context for ``none``."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: str) -> torch.GradScaler | None:
    """The gradient scaler fp16 needs against underflow; None for ``none`` and ``bf16``."""
    return torch.GradScaler(device.type) if amp == "fp16" else None


def place_on_device(model: nn.Module, loss_module: nn.Module | None, device: torch.device, channels_last: bool) -> None:
    """Move the network and its loss module to ``device``; ``channels_last`` makes the network NHWC."""
    model.to(device)
    if loss_module is not None:
        loss_module.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from torch's stubs


def wrap_for_training(
    module: nn.Module, ctx: DistributedContext, compile: bool, find_unused_parameters: bool
) -> nn.Module:
    """``module`` under ``DistributedDataParallel`` (several ranks) and ``torch.compile`` (if asked)."""
    net = module
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            net,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )
    if compile:
        net = torch.compile(net)  # type: ignore[assignment]  # an nn.Module, typed as a plain callable
    return net


def oom_message(config: TrainConfig, phase: str, world_size: int) -> str:
    """One line for a CUDA out-of-memory error during ``phase``, naming the batch size to lower."""
    if phase == "evaluation":
        return (
            f"out of memory during evaluation with eval_batch_size={config.eval_batch_size}; "
            f"try a smaller --eval-batch-size (e.g. {max(1, config.eval_batch_size // 2)})"
        )
    where = f" ({config.batch_size // world_size} per process)" if world_size > 1 else ""
    hint = " or --amp bf16" if config.amp == "none" else ""
    return (
        f"out of memory during {phase} with batch size {config.batch_size}{where}; "
        f"try a smaller --batch-size (e.g. {max(1, config.batch_size // 2)}){hint}"
    )


def divergence_message(
    config: TrainConfig, step: int, consecutive: int, last_checkpoint: str | os.PathLike | None
) -> str:
    """One line for a run stopped after ``consecutive`` non-finite steps: likely causes and what is left."""
    causes = [f"a learning rate too high for this model (lr={config.lr:g}; try a smaller --lr)"]
    if config.amp == "fp16":
        causes.append("fp16 overflow (try --amp bf16)")
    causes.append("non-finite values in the input data")
    where = (
        f"the last good checkpoint {str(last_checkpoint)!r} is intact"
        if last_checkpoint is not None
        else "no checkpoint had been written yet"
    )
    return (
        f"training diverged at step {step}: {consecutive} consecutive steps had a non-finite loss or "
        f"gradient (all skipped); likely cause: {' or '.join(causes)}; {where}"
    )


def peer_failure_message(rank: int, phase: str, exc: BaseException) -> str:
    """One line for a collective that failed because another data-parallel rank died or hung."""
    first_line = " ".join(str(exc).split())[:EXCERPT_CHARS]
    return (
        f"rank {rank} lost contact with another data-parallel rank during {phase} ({first_line}); "
        "another process probably died: check its log"
    )
