"""Weight-decay groups, optimizers and learning-rate schedules of the reference recipe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sphereconv.engine import load_config
from sphereconv.engine.optim import build_optimizer, build_scheduler, milestone_steps, parameter_groups
from sphereconv.losses import build_loss, list_losses
from sphereconv.models import create_model, list_models
from sphereconv.nn import DecoupledConv2d, SphereLinear

# The weight-decay group of every parameter, by the type of the layer that owns it and the
# parameter's name (optim's module docstring gives the reasons; the paper's Sec. 5 and
# wy1iu/SphereNet give the reference recipe).
GROUP_TABLE = {
    ("Conv2d", "weight"): "default",  # CNN filters, stems and projection shortcuts
    ("BatchNorm2d", "weight"): "default",
    ("BatchNorm2d", "bias"): "default",
    ("Linear", "weight"): "default",  # the model's own classifier
    ("SphereConv2d", "weight"): "sphere",
    ("SphereConv2d", "sigmoid_k_raw"): "no_decay",
    ("SphereNorm2d", "weight"): "sphere",
    ("SphereNorm2d", "sigmoid_k_raw"): "no_decay",
    ("SphereNorm2d", "magnitude_logit"): "no_decay",
    ("SphereNorm2d", "gamma"): "default",  # rescaling factors, decayed like BatchNorm's
    ("SphereNorm2d", "beta"): "default",
    ("SphereLinear", "weight"): "sphere",
    ("SphereLinear", "sigmoid_k_raw"): "no_decay",
    ("DecoupledConv2d", "weight"): "sphere",
    ("DecoupledConv2d", "sigmoid_k_raw"): "no_decay",
    ("DecoupledConv2d", "alpha"): "no_decay",
    ("DecoupledConv2d", "beta"): "no_decay",
    ("DecoupledConv2d", "radius"): "no_decay",
    ("SoftmaxLoss", "weight"): "default",
    ("SoftmaxLoss", "bias"): "default",
    ("WeightNormalizedSoftmaxLoss", "weight"): "default",
    ("GASoftmaxLoss", "weight"): "default",
    ("ASoftmaxLoss", "weight"): "default",
    ("CosFaceLoss", "weight"): "default",
    ("ArcFaceLoss", "weight"): "default",
}
DECAY = {"sphere": 0.0, "no_decay": 0.0, "default": 5e-4}


def _model(name: str = "spherenet9", **kwargs) -> nn.Module:
    return create_model(name, num_classes=10, in_channels=1, image_size=28, width_mult=0.0625, **kwargs)


def _assert_groups_match_table(modules: list[nn.Module]) -> set[tuple[str, str]]:
    """Every parameter is in exactly one group, the one GROUP_TABLE names; returns the rows used."""
    groups = parameter_groups(modules, DECAY["default"], DECAY["sphere"])
    group_of = {id(p): g["name"] for g in groups for p in g["params"]}
    assert all(g["weight_decay"] == DECAY[g["name"]] for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(group_of)  # no parameter twice
    used = set()
    for module in modules:
        for layer in module.modules():
            for name, param in layer.named_parameters(recurse=False):
                row = (type(layer).__name__, name)
                assert row in GROUP_TABLE, f"parameter {row} is missing from the table"
                assert group_of[id(param)] == GROUP_TABLE[row], row
                used.add(row)
    assert len(group_of) == sum(len(list(m.parameters())) for m in modules)
    return used


@pytest.mark.parametrize("model_name", list_models())
def test_every_parameter_of_every_model_and_loss_is_in_its_table_group(model_name):
    used = set()
    for kwargs in (
        {"operator": "none"},
        {"operator": "learnable_sigmoid"},
        {"operator": "learnable_sigmoid", "sphere_norm": True, "batch_norm": False},
    ):
        model = _model(model_name, feature_dim=8, **kwargs)
        for loss_name in list_losses():
            loss = build_loss(loss_name, model.num_features, 10)
            used |= _assert_groups_match_table([model, loss])
    assert ("SphereNorm2d", "magnitude_logit") in used and ("SphereConv2d", "sigmoid_k_raw") in used
    assert {("GASoftmaxLoss", "weight"), ("ArcFaceLoss", "weight")} <= used


def test_sphere_linear_and_decoupled_layers_follow_the_table():
    net = nn.Sequential(
        DecoupledConv2d(1, 4, 3, magnitude="seg", operator="learnable_sigmoid", learnable=True),
        DecoupledConv2d(4, 4, 3, magnitude="tanh", learnable=True),
        nn.Flatten(),
        SphereLinear(16, 10, operator="learnable_sigmoid"),
    )
    used = _assert_groups_match_table([net])
    assert {("DecoupledConv2d", n) for n in ("weight", "alpha", "beta", "radius", "sigmoid_k_raw")} <= used
    assert ("SphereLinear", "weight") in used


def test_sphere_norm_mix_is_not_pulled_by_weight_decay():
    # With a zero loss gradient only weight decay moves parameters: the mix s = sigmoid(logit) must
    # stay at its initial 0.02 (in the decay group it drifted towards 0.5).
    model = _model(operator="cosine", sphere_norm=True)
    config = load_config(None, {"lr": 1e-3})
    optimizer = build_optimizer(config, parameter_groups([model], 5e-4, 0.0))
    before = [m.magnitude_mix().detach().clone() for m in model.modules() if hasattr(m, "magnitude_mix")]
    for _ in range(10):
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
        optimizer.step()
    after = [m.magnitude_mix().detach() for m in model.modules() if hasattr(m, "magnitude_mix")]
    assert before and all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(float(b.mean()) == pytest.approx(0.02) for b in before)


def test_plain_cnn_filters_all_get_weight_decay():
    model = _model(operator="none")
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


def test_milestones_of_a_short_run_each_apply_once():
    # The reference fractions on runs of 1 to 4 steps: at least step 1, never merged.
    assert [milestone_steps([34000 / 64000, 54000 / 64000], n) for n in (1, 2, 3, 4)] == [
        [1, 2],
        [1, 2],
        [2, 3],
        [2, 3],
    ]
    assert _lrs({"schedule": "step"}, 2) == [1.0, pytest.approx(0.1)]
    # 0.5 and 0.6 of 4 steps both round to step 2: the second drop follows one step later.
    assert milestone_steps([0.5, 0.6], 4) == [2, 3]
    lrs = _lrs({"schedule": "step", "lr_milestones": [0.5, 0.6]}, 4)
    assert lrs == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.01)]


def test_other_schedules():
    assert set(_lrs({"schedule": "constant"}, 10)) == {1.0}
    cosine = _lrs({"schedule": "cosine"}, 100)
    assert cosine[0] == 1.0 and cosine[50] == pytest.approx(0.5) and cosine[-1] < 0.01
    onecycle = _lrs({"schedule": "onecycle", "optimizer": "sgd"}, 100)
    peak = max(range(100), key=onecycle.__getitem__)
    assert onecycle[peak] == pytest.approx(1.0, rel=1e-3) and 20 <= peak <= 35 and onecycle[-1] < 1e-3
