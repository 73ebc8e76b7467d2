"""One optimizer step: forward, loss, backward, a skip when anything is not finite, the update.

The objective is the classification loss of Liu et al., "Deep Hyperspherical Learning" (NIPS 2017,
Sec. 2.2) plus the orthogonality penalty on SphereConv filters (Sec. 5). A step whose loss or
gradient is not finite on any data-parallel rank is skipped on every rank: the gradients are
dropped and the buffers that the forward pass changed (BatchNorm statistics, a margin loss's
iteration counter) are restored, so weights, statistics and optimizer state stay as they were. With
fp16 the gradient scaler owns non-finite gradients (it skips its step and lowers the scale).

One all-reduce per step agrees on the skip and on a requested stop across ranks and totals the loss
and the correct predictions; reading it is the step's one wait for the device (with fp16 the
gradient scaler's own check of its inf/NaN flag adds a second).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..losses import orthogonality_penalty
from .objective import TrainingModule
from .runtime import autocast


@dataclass(frozen=True)
class StepResult:
    """What one step did, totalled over every data-parallel rank."""

    loss_sum: float
    """The step's loss times its images (the sum of per-image losses)."""
    correct: int
    """Training predictions that matched their labels."""
    images: int
    """Images the step consumed."""
    skipped: bool
    """True when the loss or gradient was not finite and nothing was updated."""
    stop_requested: bool
    """True when any rank received a stop signal before the step's reduction."""

    @property
    def loss(self) -> float:
        """Mean loss per image (NaN for an empty step)."""
        return self.loss_sum / self.images if self.images else float("nan")


def _identity(tensor: Tensor) -> Tensor:
    return tensor


class TrainStep:
    """``step(images, labels, stop_requested) -> StepResult`` for a fixed module and optimizer.

    ``module`` is the :class:`~sphereconv.engine.objective.TrainingModule` whose parameters and
    buffers are trained; ``net`` is what runs the forward pass (``module`` itself, or ``module``
    under ``DistributedDataParallel`` / ``torch.compile``). ``all_reduce_sum`` totals a tensor over
    data-parallel ranks (the identity in a single process).
    """

    def __init__(
        self,
        module: TrainingModule,
        optimizer: torch.optim.Optimizer,
        *,
        net: nn.Module | None = None,
        scaler: torch.GradScaler | None = None,
        amp: str = "none",
        grad_clip: float | None = None,
        orthogonality: float = 0.0,
        channels_last: bool = False,
        all_reduce_sum: Callable[[Tensor], Tensor] = _identity,
    ) -> None:
        self.module = module
        self.net = module if net is None else net
        self.optimizer = optimizer
        self.scaler = scaler
        self.amp = amp
        self.grad_clip = grad_clip
        self.orthogonality = orthogonality
        self.channels_last = channels_last
        self.all_reduce_sum = all_reduce_sum
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.buffers = list(module.buffers())
        self._buffer_backup = [b.detach().clone() for b in self.buffers]

    def __call__(self, images: Tensor, labels: Tensor, stop_requested: bool = False) -> StepResult:
        optimizer, scaler = self.optimizer, self.scaler
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        if self.buffers:
            torch._foreach_copy_(self._buffer_backup, self.buffers)
        with autocast(images.device, self.amp):
            loss, logits = self.net(images, labels)
        objective = loss
        if self.orthogonality > 0:
            objective = loss + orthogonality_penalty(self.module.model, self.orthogonality)
        if scaler is not None:
            scaler.scale(objective).backward()
            scaler.unscale_(optimizer)
        else:
            objective.backward()
        nonfinite = ~torch.isfinite(loss.detach())
        norm = self._gradient_norm()
        if norm is not None and scaler is None:
            nonfinite = nonfinite | ~torch.isfinite(norm)
        count = labels.shape[0]
        totals = torch.zeros(5, dtype=torch.float64, device=loss.device)
        totals[0] = nonfinite.double()
        totals[1] = float(stop_requested)
        totals[2] = loss.detach().double() * count
        totals[3] = (logits.detach().argmax(dim=1) == labels).sum().double()
        totals[4] = count
        n_nonfinite, n_stop, loss_sum, correct, images_total = self.all_reduce_sum(totals).tolist()
        skipped = n_nonfinite > 0
        if skipped:
            optimizer.zero_grad(set_to_none=True)
            if self.buffers:
                torch._foreach_copy_(self.buffers, self._buffer_backup)
            if scaler is not None:
                scaler.update()
        elif scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return StepResult(
            loss_sum=loss_sum,
            correct=int(correct),
            images=int(images_total),
            skipped=skipped,
            stop_requested=n_stop > 0,
        )

    def _gradient_norm(self) -> Tensor | None:
        """Clip to ``grad_clip`` and return the total norm; without clipping, the norm only when it decides a skip."""
        if self.grad_clip is not None:
            return torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.scaler is None and grads:
            return torch.nn.utils.get_total_norm(grads)
        return None
