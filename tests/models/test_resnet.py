"""SphereResNet-32 (wide, reference layout) and ImageNet-style SphereResNet-18/34."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sphereconv.models import SphereResNet, create_model
from sphereconv.models.layers import BN_EPS, BN_MOMENTUM
from sphereconv.models.resnet import BasicBlock
from sphereconv.nn import SPHERE_CONV_TYPES, SphereConv2d


def blocks(model: nn.Module) -> list[BasicBlock]:
    return [m for m in model.modules() if isinstance(m, BasicBlock)]


def test_resnet32_layout_matches_the_reference():
    model = create_model("sphere_resnet32")
    assert model.operator == "linear"  # reference default operator
    assert isinstance(model.stem.conv, SphereConv2d) and model.stem.conv.out_channels == 96
    units = blocks(model)
    assert len(units) == 15
    assert [b.conv1.out_channels for b in units] == [96] * 5 + [192] * 5 + [384] * 5
    strides = [b.conv1.stride[0] for b in units]
    assert strides == [1] * 5 + [2] + [1] * 4 + [2] + [1] * 4
    # Projection shortcuts only where the shape changes: plain 1x1 conv with the stride, then BN.
    projections = [b for b in units if not isinstance(b.shortcut, nn.Identity)]
    assert projections == [units[5], units[10]]
    for b in projections:
        assert type(b.shortcut.conv) is nn.Conv2d and b.shortcut.conv.kernel_size == (1, 1)
        assert b.shortcut.conv.stride == (2, 2) and isinstance(b.shortcut.bn, nn.BatchNorm2d)
    # 32 conv layers: stem + 2 per unit, plus 2 shortcut projections; all branch convs linear SphereConv.
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 30 + 2
    assert sum(isinstance(c, SphereConv2d) and c.operator == "linear" for c in convs) == 31
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 33 and all(bn.eps == BN_EPS and bn.momentum == BN_MOMENTUM for bn in bns)
    assert model.num_features == 384 and model.classifier.bias is None


def test_resnet32_final_map_is_8x8_at_32x32_input():
    model = create_model("sphere_resnet32", width_mult=0.125).eval()
    maps = model.stages(model.stem(torch.randn(2, 3, 32, 32)))
    assert maps.shape == (2, 48, 8, 8)


def test_resnet32_parameter_count_matches_hand_count():
    def conv(c_in, c_out, k):
        return c_in * c_out * k * k

    total = conv(3, 96, 3) + 2 * 96
    c_in = 96
    for width in (96, 192, 384):
        for _unit in range(5):
            total += conv(c_in, width, 3) + conv(width, width, 3) + 4 * width
            if c_in != width:
                total += conv(c_in, width, 1) + 2 * width
            c_in = width
    total += 384 * 10
    model = create_model("sphere_resnet32", operator="none")
    assert sum(p.numel() for p in model.parameters()) == total


@pytest.mark.parametrize("name, counts", [("sphere_resnet18", [2, 2, 2, 2]), ("sphere_resnet34", [3, 4, 6, 3])])
def test_imagenet_resnets_have_the_standard_layout(name, counts):
    model = create_model(name, width_mult=0.125)
    assert [len(stage) for stage in model.stages] == counts
    assert [stage[0].conv1.out_channels for stage in model.stages] == [8, 16, 32, 64]
    stem_conv = model.stem[0].conv
    assert type(stem_conv) is nn.Conv2d and stem_conv.kernel_size == (7, 7) and stem_conv.stride == (2, 2)
    assert isinstance(model.stem[1], nn.MaxPool2d)
    # SphereConv in every residual branch, plain stem and shortcuts by default.
    for b in blocks(model):
        assert isinstance(b.conv1, SphereConv2d) and isinstance(b.conv2, SphereConv2d)
        if not isinstance(b.shortcut, nn.Identity):
            assert type(b.shortcut.conv) is nn.Conv2d
    assert len([b for b in blocks(model) if not isinstance(b.shortcut, nn.Identity)]) == 3


def test_stem_and_shortcut_operators_are_configurable():
    model = create_model(
        "sphere_resnet18", width_mult=0.125, operator="cosine", stem_operator="sigmoid", shortcut_operator="linear"
    )
    assert isinstance(model.stem[0].conv, SphereConv2d) and model.stem[0].conv.operator == "sigmoid"
    shortcut_ops = {b.shortcut.conv.operator for b in blocks(model) if not isinstance(b.shortcut, nn.Identity)}
    assert shortcut_ops == {"linear"}
    plain_stem = create_model("sphere_resnet32", width_mult=0.125, stem_operator="none")
    assert type(plain_stem.stem.conv) is nn.Conv2d


def test_operator_none_is_the_plain_resnet():
    for name in ("sphere_resnet32", "sphere_resnet18"):
        model = create_model(name, operator="none", width_mult=0.125)
        assert not any(isinstance(m, SPHERE_CONV_TYPES) for m in model.modules())


@pytest.mark.parametrize("size", [32, 64, 40])
def test_imagenet_resnet_accepts_small_inputs(size):
    model = create_model("sphere_resnet34", width_mult=0.0625, num_classes=5)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 5)


def test_feature_dim_adds_an_embedding_like_fc6():
    model = create_model("sphere_resnet32", width_mult=0.125, feature_dim=2, fc_operator="cosine")
    assert isinstance(model.fc.conv, SphereConv2d) and model.fc.conv.operator == "cosine"
    assert model.fc.conv.out_channels == 2 and isinstance(model.fc.bn, nn.BatchNorm2d)
    x = torch.randn(3, 3, 32, 32)
    assert model.forward_features(x).shape == (3, 2) and model(x).shape == (3, 10)


@pytest.mark.parametrize("name", ["sphere_resnet32", "sphere_resnet18"])
def test_fc_operator_without_feature_dim_is_refused_not_ignored(name):
    # Without feature_dim there is no fc layer, so an fc_operator would have no effect at all.
    with pytest.raises(ValueError, match="invalid fc_operator='cosine': expected None unless feature_dim"):
        create_model(name, width_mult=0.125, fc_operator="cosine")
    assert isinstance(create_model(name, width_mult=0.125, fc_operator=None).fc, nn.Identity)


def test_wrong_channel_count_is_reported():
    model = create_model("sphere_resnet18", width_mult=0.125, in_channels=1)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\); got \(2, 3, 32, 32\)"):
        model(torch.randn(2, 3, 32, 32))


def test_bad_resnet_arguments():
    with pytest.raises(ValueError, match="invalid shortcut_operator='cos': expected one of none, linear, cosine"):
        create_model("sphere_resnet18", shortcut_operator="cos")
    with pytest.raises(ValueError, match="invalid stem_operator="):
        create_model("sphere_resnet32", stem_operator="relu")
    with pytest.raises(ValueError, match="invalid sphere_norm=True: expected False with operator='none'"):
        create_model("sphere_resnet32", operator="none", sphere_norm=True)


@pytest.mark.parametrize(
    "blocks_per_stage,stage_widths,error,message",
    [
        (3, (16,), TypeError, r"invalid blocks_per_stage=3: expected a non-empty sequence of positive integers"),
        ("22", (16, 16), TypeError, r"invalid blocks_per_stage='22': expected a non-empty sequence"),
        ((), (), ValueError, r"invalid blocks_per_stage=\(\): expected a non-empty sequence"),
        ((1,), None, TypeError, r"invalid stage_widths=None: expected a sequence of positive integers"),
        ((1, 1), (16,), ValueError, r"invalid stage_widths=\(16,\): expected one width per entry"),
    ],
)
def test_bad_stage_layout_of_a_custom_resnet_is_one_line(blocks_per_stage, stage_widths, error, message):
    # SphereResNet is public: an int or None here was "object of type 'int' has no len()".
    with pytest.raises(error, match=message):
        SphereResNet(blocks_per_stage, stage_widths, 16, "cifar")


def test_sphere_norm_replaces_the_sphere_convolutions_only():
    from sphereconv.nn.norm import SphereNorm2d

    model = create_model("sphere_resnet18", width_mult=0.125, sphere_norm=True, batch_norm=False)
    for b in blocks(model):
        assert isinstance(b.conv1, SphereNorm2d) and isinstance(b.conv2, SphereNorm2d)
    assert type(model.stem[0].conv) is nn.Conv2d  # plain stem stays plain
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(p.grad).all() for p in model.parameters())
