"""Weight-decay groups, optimizers and learning-rate schedules of the reference recipe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sphereconv.engine import load_config
from sphereconv.engine.optim import build_optimizer, build_scheduler, milestone_steps, parameter_groups
from sphereconv.losses import build_loss
from sphereconv.models import create_model
from sphereconv.nn import SPHERE_CONV_TYPES


def _model(operator: str) -> nn.Module:
    return create_model("spherenet9", num_classes=10, in_channels=1, image_size=28, operator=operator,
                        width_mult=0.0625)


def test_sphere_filters_get_no_weight_decay():
    model = _model("learnable_sigmoid")
    loss = build_loss("ga_softmax", model.num_features, 10)
    groups = {g["name"]: g for g in parameter_groups([model, loss], 5e-4, 0.0)}
    sphere_ids = {id(p) for p in groups["sphere"]["params"]}
    default_ids = {id(p) for p in groups["default"]["params"]}
    assert groups["sphere"]["weight_decay"] == 0.0 and groups["default"]["weight_decay"] == 5e-4
    conv_weights = [m.weight for m in model.modules() if isinstance(m, SPHERE_CONV_TYPES)]
    assert conv_weights and all(id(w) in sphere_ids for w in conv_weights)
    learnable_k = [m.sigmoid_k_raw for m in model.modules() if isinstance(m, SPHERE_CONV_TYPES)]
    assert all(id(k) in sphere_ids for k in learnable_k)
    bn_params = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    assert bn_params and all(id(p) in default_ids for p in bn_params)
    assert id(loss.weight) in default_ids
    # Every trainable parameter is in exactly one group.
    every = [p for m in (model, loss) for p in m.parameters()]
    assert sphere_ids.isdisjoint(default_ids) and len(sphere_ids | default_ids) == len(every)


def test_plain_cnn_filters_all_get_weight_decay():
    model = _model("none")
    groups = parameter_groups([model], 5e-4, 0.0)
    assert [g["name"] for g in groups] == ["default"]
    assert len(groups[0]["params"]) == len(list(model.parameters()))


def test_adam_adds_l2_and_adamw_decouples():
    # One step from w = 1 with zero gradient: Adam's L2 term moves w (gradient = wd * w), AdamW
    # shrinks it by lr * wd directly.
    for name, expected in (("adam", 1.0 - 0.1), ("adamw", 1.0 - 0.1 * 0.5)):
        weight = nn.Parameter(torch.ones(1))
        config = load_config(None, {"optimizer": name, "lr": 0.1})
        optimizer = build_optimizer(config, [{"params": [weight], "weight_decay": 0.5}])
        weight.grad = torch.zeros(1)
        optimizer.step()
        assert weight.item() == pytest.approx(expected, rel=1e-4), name
    config = load_config(None, {"optimizer": "sgd", "momentum": 0.5})
    assert build_optimizer(config, [{"params": [nn.Parameter(torch.ones(1))]}]).defaults["momentum"] == 0.5


def _lrs(overrides: dict, steps: int) -> list[float]:
    config = load_config(None, {"lr": 1.0, **overrides})
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(config, optimizer, steps)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_step_schedule_uses_fractions_of_the_run():
    assert milestone_steps([34000 / 64000, 54000 / 64000], 64000) == [34000, 54000]
    lrs = _lrs({"schedule": "step"}, 64)  # milestones at 34 and 54 of 64
    assert lrs[33] == 1.0 and lrs[34] == pytest.approx(0.1) and lrs[53] == pytest.approx(0.1)
    assert lrs[54] == pytest.approx(0.01)


def test_other_schedules():
    assert set(_lrs({"schedule": "constant"}, 10)) == {1.0}
    cosine = _lrs({"schedule": "cosine"}, 100)
    assert cosine[0] == 1.0 and cosine[50] == pytest.approx(0.5) and cosine[-1] < 0.01
    onecycle = _lrs({"schedule": "onecycle", "optimizer": "sgd"}, 100)
    peak = max(range(100), key=onecycle.__getitem__)
    assert onecycle[peak] == pytest.approx(1.0, rel=1e-3) and 20 <= peak <= 35 and onecycle[-1] < 1e-3
