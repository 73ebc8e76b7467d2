"""One training step (engine/step.py): a finite step updates the weights and reports its totals; a
step with a non-finite loss is skipped and leaves weights, BatchNorm buffers and optimizer state as
they were."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sphereconv.engine.objective import TrainingModule
from sphereconv.engine.step import StepResult, TrainStep
from sphereconv.nn import SphereConv2d

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
    # The same network stepped by hand: cross-entropy of its logits, then w - lr * grad.
    twin = copy.deepcopy(module)
    logits = twin.model(images)
    expected_loss = F.cross_entropy(logits, labels)
    expected_loss.backward()
    expected_correct = int((logits.argmax(dim=1) == labels).sum())
    assert expected_correct != BATCH - expected_correct  # a count of the wrong predictions would differ
    result = TrainStep(module, optimizer)(images, labels)
    assert isinstance(result, StepResult) and not result.skipped and not result.stop_requested
    assert result.images == BATCH and result.correct == expected_correct
    assert result.loss_sum == pytest.approx(BATCH * float(expected_loss.detach()), rel=1e-6)
    assert math.isfinite(result.loss) and result.loss == pytest.approx(float(expected_loss.detach()), rel=1e-6)
    for (name, param), reference in zip(module.named_parameters(), twin.parameters()):
        torch.testing.assert_close(param.detach(), reference.detach() - 0.1 * reference.grad, msg=name)
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

    seen, dtypes = [], []
    module.model[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    module.model[0].register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    step = TrainStep(
        module, optimizer, amp="bf16", channels_last=True, orthogonality=1e-4, all_reduce_sum=all_reduce_sum
    )
    result = step(*_batch())
    assert len(reduced) == 1 and reduced[0].dtype == torch.float64
    assert result.images == 2 * BATCH and math.isfinite(result.loss) and not result.skipped
    # The reported totals are the reduced ones: twice this rank's loss sum and correct predictions.
    assert result.loss_sum == pytest.approx(2 * float(reduced[0][2])) and result.correct == 2 * int(reduced[0][3])
    assert seen == [True]
    assert dtypes == [torch.bfloat16]  # the convolution ran under bf16 autocast


def test_orthogonality_penalty_adds_its_gradient_to_the_sphereconv_filters():
    torch.manual_seed(0)
    model = nn.Sequential(
        SphereConv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, CLASSES)
    )
    plain = TrainingModule(model).train()
    penalised = copy.deepcopy(plain)
    filters = model[0].weight.detach().clone().reshape(4, -1)  # W^T: one filter per row
    lr, coefficient = 0.1, 0.1
    for module, orthogonality in ((plain, 0.0), (penalised, coefficient)):
        step = TrainStep(module, torch.optim.SGD(module.parameters(), lr=lr), orthogonality=orthogonality)
        assert not step(*_batch()).skipped
    # d/dW ||W^T W - I||_F^2 = 4 (W^T W - I) W^T in rows of filters; the classifier is not penalised.
    gram = filters @ filters.t()
    penalty_grad = 4.0 * (gram - torch.eye(4)) @ filters
    moved = (penalised.model[0].weight - plain.model[0].weight).detach().reshape(4, -1)
    torch.testing.assert_close(moved, -lr * coefficient * penalty_grad, rtol=1e-4, atol=1e-6)
    assert float(penalty_grad.abs().max()) > 1e-2
    torch.testing.assert_close(penalised.model[3].weight, plain.model[3].weight, rtol=0, atol=0)
