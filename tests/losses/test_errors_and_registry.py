"""build_loss and the argument checks of every loss."""

from __future__ import annotations

import pytest
import torch

from sphereconv.losses import (
    ArcFaceLoss,
    ASoftmaxLoss,
    CosFaceLoss,
    GASoftmaxLoss,
    SoftmaxLoss,
    WeightNormalizedSoftmaxLoss,
    build_loss,
    list_losses,
)

# What an unknown classifier operator's error lists: the fixed angular functions g.
CLASSIFIER_G = "expected one of linear, cosine, sigmoid, square_cosine"


def test_build_loss_maps_every_config_name():
    expected = {
        "softmax": SoftmaxLoss,
        "weight_normalized": WeightNormalizedSoftmaxLoss,
        "ga_softmax": GASoftmaxLoss,
        "a_softmax": ASoftmaxLoss,
        "cosface": CosFaceLoss,
        "arcface": ArcFaceLoss,
    }
    assert list_losses() == list(expected)
    for name, cls in expected.items():
        loss = build_loss(name, 8, 3)
        assert type(loss) is cls and loss.weight.shape == (3, 8)
    ga = build_loss("ga_softmax", 8, 3, margin=2.5, operator="sigmoid", sigmoid_k=0.7)
    assert ga.margin == 2.5 and ga.operator == "sigmoid" and ga.sigmoid_k == 0.7
    assert build_loss("A-Softmax", 4, 2, margin=2).margin_int == 2


def test_build_loss_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match=r"invalid loss='focal': expected one of softmax, weight_normalized"):
        build_loss("focal", 8, 3)
    with pytest.raises(TypeError, match=r"'cosface' does not accept option\(s\) operator; allowed: scale, margin"):
        build_loss("cosface", 8, 3, operator="linear")


@pytest.mark.parametrize("name", ["softmax", "ga_softmax", "arcface"])
@pytest.mark.parametrize("device", ["cuda:99", "tpu", "cpu:x"])
def test_build_loss_names_a_device_it_cannot_use(name, device):
    # loss_kwargs: {device: cuda:3} in a config reached the weight's allocation: an AssertionError
    # ("Torch not compiled with CUDA enabled") or RuntimeError traceback, not a config error.
    with pytest.raises(ValueError, match=rf"^invalid device='{device}': cannot place the loss there \(.+\)$"):
        build_loss(name, 8, 3, device=device)
    assert build_loss(name, 8, 3, device="cpu").weight.device.type == "cpu"


@pytest.mark.parametrize("dtype", ["float16", torch.int64, torch.complex64])
def test_build_loss_names_a_dtype_that_is_not_floating_point(dtype):
    with pytest.raises(TypeError, match=r"^invalid dtype=.*: expected None or a floating-point torch.dtype"):
        build_loss("arcface", 8, 3, dtype=dtype)
    assert build_loss("arcface", 8, 3, dtype=torch.float64).weight.dtype == torch.float64


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: GASoftmaxLoss(4, 3, margin=0.5), r"invalid margin=0.5: expected a number in \[1, 64\]"),
        (lambda: GASoftmaxLoss(4, 3, margin=float("nan")), r"margin.*nan"),
        (lambda: GASoftmaxLoss(4, 3, operator="tanh"), rf"invalid operator='tanh': {CLASSIFIER_G}"),
        (
            lambda: WeightNormalizedSoftmaxLoss(4, 3, operator="learnable_sigmoid"),
            rf"invalid operator='learnable_sigmoid': {CLASSIFIER_G}",
        ),
        (
            lambda: WeightNormalizedSoftmaxLoss(4, 3, operator="sigmoid", sigmoid_k=0.0),
            r"invalid sigmoid_k=0.0: expected a number > 0",
        ),
        (lambda: GASoftmaxLoss(4, 3, sigmoid_k=-1.0), r"sigmoid_k.*-1.0"),
        (lambda: GASoftmaxLoss(4, 3, lambda_min=-1.0), r"invalid lambda_min=-1.0: expected a number >= 0"),
        (lambda: GASoftmaxLoss(4, 3, anneal_iterations=0), r"invalid anneal_iterations=0: expected a positive integer"),
        (
            lambda: ASoftmaxLoss(4, 3, margin=2.5),
            r"invalid margin=2.5: expected an integer from 1 to 64 "
            r"\(GASoftmaxLoss takes a real-valued margin in that range\)",
        ),
        (lambda: ASoftmaxLoss(4, 3, margin=0), r"invalid margin=0: expected an integer from 1 to 64"),
        (lambda: CosFaceLoss(4, 3, scale=0.0), r"invalid scale=0.0: expected a number > 0"),
        (lambda: CosFaceLoss(4, 3, margin=-0.1), r"invalid margin=-0.1: expected a number in \[0, 2\]"),
        (lambda: ArcFaceLoss(4, 3, scale=-2.0), r"scale.*-2.0"),
        (lambda: ArcFaceLoss(4, 3, margin=2.0), r"invalid margin=2.0: expected a number in \[0, 1.5708\]"),
        (lambda: SoftmaxLoss(4, 3, label_smoothing=1.5), r"invalid label_smoothing=1.5: expected a number in \[0, 1\]"),
        (lambda: SoftmaxLoss(4, 1), r"invalid num_classes=1: expected an integer >= 2"),
        (lambda: SoftmaxLoss(0, 3), r"invalid in_features=0: expected a positive integer"),
        (lambda: WeightNormalizedSoftmaxLoss(4, 3, eps=0.0), r"invalid eps=0.0: expected a number > 0"),
    ],
)
def test_bad_constructor_arguments_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: GASoftmaxLoss(4, 3, margin="2"), r"invalid margin='2': expected a number in \[1, 64\]"),
        (lambda: ASoftmaxLoss(4, 3, margin="4"), r"invalid margin='4': expected an integer from 1 to 64"),
        (lambda: GASoftmaxLoss(4, 3, anneal="yes"), r"invalid anneal='yes': expected true or false"),
        (lambda: SoftmaxLoss("4", 3), r"invalid in_features='4': expected a positive integer"),
        (lambda: SoftmaxLoss(4, 3, bias=1), r"invalid bias=1: expected true or false"),
        (lambda: WeightNormalizedSoftmaxLoss(4, 3, operator=None), r"invalid operator=None: expected one of linear"),
    ],
)
def test_bad_constructor_argument_types_raise_type_error(make, match):
    with pytest.raises(TypeError, match=match):
        make()


@pytest.mark.parametrize("name", list_losses())
def test_bad_inputs_raise_clear_errors(name):
    loss = build_loss(name, 4, 3)
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\] \(num_classes = 3\); got \[-1, 3\]"):
        loss(x, torch.tensor([0, 3, 1, -1, 2]))
    with pytest.raises(ValueError, match=r"features must have shape \(N >= 1, in_features = 4\); got \(5, 6\)"):
        loss(torch.randn(5, 6), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"features must have shape .* got \(5, 4, 1\)"):
        loss.logits(torch.randn(5, 4, 1))
    with pytest.raises(ValueError, match=r"labels must have shape \(5,\), one per feature row; got \(4,\)"):
        loss(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"labels must be an integer tensor of class indices; got dtype torch.float32"):
        loss(x, torch.zeros(5))
    with pytest.raises(TypeError, match=r"features must be a floating-point tensor; got dtype torch.int64"):
        loss(torch.zeros(5, 4, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    # int32 labels are accepted.
    assert torch.isfinite(loss(x, torch.tensor([0, 1, 2, 1, 0], dtype=torch.int32)))
