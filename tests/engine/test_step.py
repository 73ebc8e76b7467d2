"""One training step (engine/step.py): a finite step updates the weights and reports its totals; a
step with a non-finite loss is skipped and leaves weights, BatchNorm buffers and optimizer state as
they were."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sphereconv.engine.objective import TrainingModule
from sphereconv.engine.step import StepResult, TrainStep

BATCH = 8
CLASSES = 3


def _module() -> TrainingModule:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, CLASSES),
    )
    return TrainingModule(model).train()


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 1, 6, 6, generator=generator), torch.randint(0, CLASSES, (BATCH,), generator=generator)


def _snapshot(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    state.update({f"opt.{i}.{k}": v.clone() for i, s in optimizer.state.items() for k, v in s.items()})
    return state


def test_finite_step_updates_weights_and_reports_its_totals():
    module = _module()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    before = _snapshot(module, optimizer)
    images, labels = _batch()
    result = TrainStep(module, optimizer)(images, labels)
    assert isinstance(result, StepResult) and not result.skipped and not result.stop_requested
    assert result.images == BATCH and 0 <= result.correct <= BATCH
    assert math.isfinite(result.loss) and result.loss == pytest.approx(result.loss_sum / BATCH)
    after = module.state_dict()
    assert not torch.equal(before["model.0.weight"], after["model.0.weight"])
    assert not torch.equal(before["model.1.running_mean"], after["model.1.running_mean"])
    assert int(after["model.1.num_batches_tracked"]) == 1
    with pytest.raises(AttributeError):
        result.skipped = True  # frozen


def test_nonfinite_loss_is_skipped_and_leaves_everything_untouched():
    module = _module()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    step = TrainStep(module, optimizer, grad_clip=1.0)
    images, labels = _batch()
    assert not step(images, labels).skipped  # Adam moments exist now
    before = _snapshot(module, optimizer)
    result = step(torch.full_like(images, float("nan")), labels, stop_requested=True)
    assert result.skipped and result.stop_requested and math.isnan(result.loss)
    after = _snapshot(module, optimizer)
    assert before.keys() == after.keys() and any("running_var" in k for k in before)
    for key in before:  # weights, BatchNorm statistics (and counter) and Adam moments
        assert torch.equal(before[key], after[key]), key
    assert all(p.grad is None for p in module.parameters())
    assert not step(images, labels).skipped  # training continues after a skipped step


def test_nonfinite_gradient_with_finite_loss_is_skipped():
    module = _module()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    weight = module.model[5].weight
    weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    before = _snapshot(module, optimizer)
    result = TrainStep(module, optimizer)(*_batch())
    assert result.skipped and math.isfinite(result.loss)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_step_totals_go_through_the_reduction_and_channels_last_and_bf16_apply():
    module = _module()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    reduced = []

    def all_reduce_sum(tensor):
        reduced.append(tensor.clone())
        return tensor * 2  # as if a second rank had the same totals

    seen = []
    module.model[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    step = TrainStep(
        module, optimizer, amp="bf16", channels_last=True, orthogonality=1e-4, all_reduce_sum=all_reduce_sum
    )
    result = step(*_batch())
    assert len(reduced) == 1 and reduced[0].dtype == torch.float64
    assert result.images == 2 * BATCH and math.isfinite(result.loss) and not result.skipped
    assert seen == [True]
