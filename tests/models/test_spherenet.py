"""SphereNet-9/18/36/69: layer counts, widths, fc6 geometry, BatchNorm, initialisation, operators."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sphereconv.models import BN_MOMENTUM, REFERENCE_BN_MOMENTUM, create_model
from sphereconv.models.layers import BN_EPS
from sphereconv.nn import SPHERE_CONV_TYPES, SphereConv2d

# Paper Sec. 5 / reference spherenet.py (wy1iu/SphereNet): stage widths and fc6 width.
WIDTHS = (128, 192, 256)
FC6 = 256


def convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def hand_count_spherenet9(in_channels: int, num_classes: int) -> int:
    """Parameters of SphereNet-9 at width 1 from the paper's widths (no conv bias, BN gamma+beta)."""
    total, c_in = 0, in_channels
    for width in WIDTHS:
        for _ in range(3):
            total += c_in * width * 3 * 3 + 2 * width  # 3x3 filters + BN gamma/beta
            c_in = width
    total += WIDTHS[-1] * FC6 * 4 * 4 + 2 * FC6  # fc6 covers the 4x4 map, then BN
    total += FC6 * num_classes  # bias-free classifier
    return total


@pytest.mark.parametrize("operator", ["none", "cosine"])
def test_spherenet9_parameter_count_matches_hand_count(operator):
    model = create_model("spherenet9", operator=operator)
    assert sum(p.numel() for p in model.parameters()) == hand_count_spherenet9(3, 10)
    gray = create_model("spherenet9", operator=operator, in_channels=1, num_classes=7, image_size=28)
    assert sum(p.numel() for p in gray.parameters()) == hand_count_spherenet9(1, 7)


def test_learnable_sigmoid_adds_one_k_per_output_channel():
    plain = sum(p.numel() for p in create_model("spherenet9", operator="sigmoid").parameters())
    learnable = sum(p.numel() for p in create_model("spherenet9", operator="lr_sigmoid").parameters())
    assert learnable - plain == 3 * sum(WIDTHS) + FC6


@pytest.mark.parametrize("depth", [9, 18, 36, 69])
def test_depth_is_the_number_of_3x3_conv_layers(depth):
    model = create_model(f"spherenet{depth}", width_mult=0.0625)
    three_by_three = [c for c in convs(model) if c.kernel_size == (3, 3)]
    assert len(three_by_three) == depth == model.depth
    # plus fc6; the classifier is the only linear layer
    assert len(convs(model)) == depth + 1
    assert [m for m in model.modules() if isinstance(m, nn.Linear)] == [model.classifier]


def test_stage_widths_and_width_mult_rounding():
    model = create_model("spherenet9", width_mult=0.3)
    widths = [c.out_channels for c in convs(model)]
    expected = [round(w * 0.3) for w in WIDTHS for _ in range(3)] + [round(FC6 * 0.3)]
    assert widths == expected
    assert model.num_features == round(FC6 * 0.3)
    tiny = create_model("spherenet9", width_mult=0.001)
    assert {c.out_channels for c in convs(tiny)} == {1}


@pytest.mark.parametrize(
    "image_size, final", [(32, (4, 4)), (28, (4, 4)), (20, (3, 3)), (8, (1, 1)), ((32, 20), (4, 3))]
)
def test_fc6_kernel_covers_the_final_map(image_size, final):
    model = create_model("spherenet9", image_size=image_size, width_mult=0.0625, in_channels=1)
    assert model.fc6.conv.kernel_size == final == model.final_map_size
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    x = torch.randn(2, 1, h, w)
    maps = model.features(x)
    assert tuple(maps.shape[-2:]) == final
    assert model.fc6(maps).shape[-2:] == (1, 1)


def test_fc6_has_batch_norm_but_no_relu():
    model = create_model("spherenet9", width_mult=0.125)
    assert isinstance(model.fc6.bn, nn.BatchNorm2d)
    assert not any(isinstance(m, nn.ReLU) for m in model.fc6.modules())
    model.train()
    features = model.forward_features(torch.randn(8, 3, 32, 32))
    assert (features < 0).any()  # BN output without ReLU takes both signs


def test_feature_dim_two_gives_two_dimensional_features():
    model = create_model("spherenet9", feature_dim=2, width_mult=0.125, in_channels=1, image_size=28)
    x = torch.randn(4, 1, 28, 28)
    assert model.num_features == 2
    assert model.forward_features(x).shape == (4, 2)
    assert model(x).shape == (4, 10)
    assert model.classifier.in_features == 2


def test_batch_norm_uses_reference_eps_and_short_run_momentum():
    assert BN_EPS == 1e-3
    assert BN_MOMENTUM == 0.1  # PyTorch's default; the reference's decay 0.999 is opt-in
    assert REFERENCE_BN_MOMENTUM == pytest.approx(1 - 0.999)
    model = create_model("spherenet9", width_mult=0.125)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 10  # after each of the 9 convs and after fc6
    assert all(bn.eps == BN_EPS and bn.momentum == BN_MOMENTUM for bn in bns)
    custom = create_model("spherenet9", width_mult=0.125, bn_momentum=REFERENCE_BN_MOMENTUM, bn_eps=1e-5)
    assert all(
        m.momentum == REFERENCE_BN_MOMENTUM and m.eps == 1e-5 for m in custom.modules() if isinstance(m, nn.BatchNorm2d)
    )


def test_batch_norm_false_removes_every_batch_norm():
    model = create_model("spherenet18", batch_norm=False, width_mult=0.125)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert torch.isfinite(out).all()


def test_no_convolution_has_a_bias():
    for operator in ("none", "linear"):
        model = create_model("spherenet9", operator=operator, width_mult=0.125)
        assert all(c.bias is None for c in convs(model))
        assert model.classifier.bias is None


def test_he_normal_initialisation():
    model = create_model("spherenet9", operator="cosine")
    for layer in [*convs(model), model.classifier]:
        weight = layer.weight.detach()
        fan_in = weight[0].numel()
        expected = math.sqrt(2.0 / fan_in)
        # Smallest layer (3 x 128 x 9 = 3456 values) has a sampling error of about 1.2% on the std.
        assert weight.std().item() == pytest.approx(expected, rel=0.05)
        assert abs(weight.mean().item()) < 0.05 * expected


def test_operator_none_has_no_sphere_layers_and_sphere_operator_has_only_sphere_convs():
    cnn = create_model("spherenet9", operator="none", width_mult=0.125)
    assert not any(isinstance(m, SPHERE_CONV_TYPES) for m in cnn.modules())
    sphere = create_model("spherenet9", operator="sigmoid", sigmoid_k=0.5, width_mult=0.125)
    assert all(isinstance(c, SphereConv2d) for c in convs(sphere))
    assert {c.operator for c in convs(sphere)} == {"sigmoid"}
    assert {c.sigmoid_k for c in convs(sphere)} == {0.5}
    assert type(sphere.classifier) is nn.Linear


def test_fc_operator_changes_only_fc6():
    model = create_model("spherenet9", operator="cosine", fc_operator="none", width_mult=0.125)
    assert type(model.fc6.conv) is nn.Conv2d
    assert all(isinstance(c, SphereConv2d) and c.operator == "cosine" for c in convs(model.features))
    mixed = create_model("spherenet9", operator="none", fc_operator="linear", width_mult=0.125)
    assert isinstance(mixed.fc6.conv, SphereConv2d) and mixed.fc6.conv.operator == "linear"


def test_sphere_outputs_are_invariant_to_rescaling_the_input():
    # Every layer up to fc6 is a SphereConv and BN is in eval mode, so 5 x input gives the same logits.
    model = create_model("spherenet9", operator="linear", width_mult=0.125).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(5.0 * x), model(x), atol=1e-4, rtol=1e-4)
    cnn = create_model("spherenet9", operator="none", width_mult=0.125).eval()
    assert not torch.allclose(cnn(5.0 * x), cnn(x), atol=1e-3)


def test_wrong_input_shape_names_the_expected_shape():
    model = create_model("spherenet9", width_mult=0.125, image_size=28, in_channels=1)
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\).*got \(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))


@pytest.mark.parametrize("operator", ["none", "cosine"])
def test_rgb_images_given_to_a_greyscale_model_name_the_expected_shape(operator):
    # The check covered the image size only: the CNN failed inside torch's convolution
    # ("weight of size [16, 1, 3, 3], expected input ... to have 1 channels"), not with this message.
    model = create_model("spherenet9", operator=operator, width_mult=0.0625, image_size=28, in_channels=1)
    with pytest.raises(ValueError, match=r"built for images of shape \(N, 1, 28, 28\).*got \(2, 3, 28, 28\)"):
        model(torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"operator": "square"}, ValueError, "invalid operator='square': expected one of none, linear"),
        ({"operator": 3}, TypeError, "invalid operator=3: expected one of none"),
        ({"fc_operator": "tanh"}, ValueError, "invalid fc_operator='tanh': expected one of none"),
        ({"width_mult": 0}, ValueError, "invalid width_mult=0: expected a number > 0"),
        ({"num_classes": 0}, ValueError, "invalid num_classes=0: expected a positive integer"),
        ({"in_channels": 2.5}, ValueError, "invalid in_channels=2.5: expected a positive integer"),
        ({"in_channels": "2"}, TypeError, "invalid in_channels='2': expected a positive integer"),
        (
            {"image_size": (28, 28, 3)},
            ValueError,
            r"invalid image_size=\(28, 28, 3\): expected a positive integer or a",
        ),
        ({"feature_dim": -2}, ValueError, "invalid feature_dim=-2: expected a positive integer"),
        ({"batch_norm": "yes"}, TypeError, "invalid batch_norm='yes': expected true or false"),
        (
            {"sphere_norm": True, "operator": "none"},
            ValueError,
            "invalid sphere_norm=True: expected False with operator='none' \\(SphereNorm needs a SphereConv operator",
        ),
        ({"sigmoid_k": -1.0}, ValueError, "invalid sigmoid_k=-1.0: expected a number > 0"),
        ({"bn_momentum": 1.5}, ValueError, r"invalid bn_momentum=1.5: expected a number in \(0, 1\]"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        create_model("spherenet9", **kwargs)


def test_sphere_norm_builds_sphere_norm_layers():
    from sphereconv.nn.norm import SphereNorm2d

    model = create_model("spherenet9", operator="cosine", sphere_norm=True, batch_norm=False, width_mult=0.125)
    assert all(isinstance(c, SphereNorm2d) for c in convs(model))
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
