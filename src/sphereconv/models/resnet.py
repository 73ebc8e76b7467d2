"""SphereResNets: the wide CIFAR SphereResNet-32 and ImageNet-style SphereResNet-18/34.

Liu et al., "Deep Hyperspherical Learning" (NIPS 2017), Sec. 5 (SphereResNet on CIFAR-10+ and
ImageNet). SphereResNet-32 follows the reference ``sphere_resnet/sphere_resnet_v1.py`` of
wy1iu/SphereNet:

    stem: 3x3 SphereConv to 96 -> BN -> ReLU
    3 stages x 5 basic units, widths 96, 192, 384, stride 2 in the first unit of stages 2 and 3
    unit: conv(stride) -> BN -> ReLU -> conv -> BN, plus the shortcut, then ReLU
    shortcut: identity, or a plain 1x1 conv(stride) -> BN where the shape changes
    8x8 average pool (global), plain bias-free classifier

The ImageNet variants use the ResNet-18/34 layout of He et al. (2016): a 7x7 stride-2 stem and a
3x3 stride-2 max-pool, then four stages of basic blocks (widths 64, 128, 256, 512; [2, 2, 2, 2] or
[3, 4, 6, 3] blocks). SphereConv sits in the residual branches; the stem and the shortcuts are
plain convolutions unless ``stem_operator`` / ``shortcut_operator`` say otherwise.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._validation import check_bool, check_choice, check_int, fail
from ..nn.angular import DEFAULT_SIGMOID_K, MODEL_OPERATORS, canonical_operator, check_positive
from .contract import ModelOptions, Unpack
from .layers import (
    BN_EPS,
    BN_MOMENTUM,
    PLAIN_OPERATOR,
    ConvUnit,
    ImageSize,
    batch_norm_layer,
    check_bn_hyperparameters,
    check_image_size,
    check_sphere_norm,
    conv_layer,
    init_weights,
    scaled_width,
)
from .registry import register_model

# Reference SphereResNet-32 (sphere_resnet_v1.py): stem width 96, stages of 5 units, 96/192/384.
RESNET32_STEM_WIDTH = 96
RESNET32_STAGE_WIDTHS = (96, 192, 384)
RESNET32_BLOCKS = (5, 5, 5)
# ResNet-18/34 (He et al., CVPR 2016, Table 1): 64-wide stem, four stages 64..512.
IMAGENET_STEM_WIDTH = 64
IMAGENET_STAGE_WIDTHS = (64, 128, 256, 512)
RESNET18_BLOCKS = (2, 2, 2, 2)
RESNET34_BLOCKS = (3, 4, 6, 3)
# Stem geometry of He et al. (2016): 7x7 stride-2 conv, then 3x3 stride-2 max-pool.
IMAGENET_STEM_KERNEL, IMAGENET_STEM_STRIDE = 7, 2
IMAGENET_POOL_KERNEL, IMAGENET_POOL_STRIDE = 3, 2
STEM_STYLES = ("cifar", "imagenet")


def _is_sequence(value: object) -> bool:
    """Whether ``value`` is a sized iterable of entries (a tuple, list, array), not a string."""
    return hasattr(value, "__len__") and hasattr(value, "__iter__") and not isinstance(value, (str, bytes))


class BasicBlock(nn.Module):
    """Basic residual unit: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``.

    Both 3x3 convolutions use ``operator``; the shortcut is the identity when input and output
    shapes agree, else a 1x1 ``shortcut_operator`` convolution with the block's stride and BN.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        *,
        operator: str,
        shortcut_operator: str,
        sigmoid_k: float,
        sphere_norm: bool,
        batch_norm: bool,
        bn_eps: float,
        bn_momentum: float,
    ) -> None:
        super().__init__()

        def bn(channels: int) -> nn.Module:
            return batch_norm_layer(channels, batch_norm, bn_eps, bn_momentum)

        self.conv1 = conv_layer(
            in_channels, out_channels, 3, stride, 1, operator=operator, sigmoid_k=sigmoid_k, sphere_norm=sphere_norm
        )
        self.bn1 = bn(out_channels)
        # In place only on BatchNorm's output, never directly on a (custom-autograd) conv output.
        self.relu1 = nn.ReLU(inplace=batch_norm)
        self.conv2 = conv_layer(
            out_channels, out_channels, 3, 1, 1, operator=operator, sigmoid_k=sigmoid_k, sphere_norm=sphere_norm
        )
        self.bn2 = bn(out_channels)
        if stride != 1 or in_channels != out_channels:
            shortcut_conv = conv_layer(
                in_channels,
                out_channels,
                1,
                stride,
                0,
                operator=shortcut_operator,
                sigmoid_k=sigmoid_k,
                sphere_norm=sphere_norm,
            )
            self.shortcut: nn.Module = nn.Sequential(OrderedDict(conv=shortcut_conv, bn=bn(out_channels)))
        else:
            self.shortcut = nn.Identity()
        self.relu_out = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        residual = self.relu1(self.bn1(self.conv1(x)))
        residual = self.bn2(self.conv2(residual))
        return self.relu_out(residual + self.shortcut(x))


class SphereResNet(nn.Module):
    """Residual SphereNet of Liu et al. (2017) built from :class:`BasicBlock` units.

    Architecture arguments (fixed by each registered variant): ``blocks_per_stage``,
    ``stage_widths``, ``stem_width`` and ``stem`` (``"cifar"``: one 3x3 conv; ``"imagenet"``: 7x7
    stride-2 conv and 3x3 stride-2 max-pool). The first stage keeps the resolution, every later
    stage halves it in its first block. Widths are scaled by ``width_mult``.

    Layer arguments: ``operator`` for the residual branches (``"none"``: the plain ResNet),
    ``stem_operator`` (``None``: same as ``operator``) and ``shortcut_operator`` (default plain)
    for the other convolutions, ``sigmoid_k``, ``batch_norm``, ``sphere_norm``, ``bn_eps``,
    ``bn_momentum``. After global average pooling, ``feature_dim`` (if given) adds an embedding
    ``fc``: a 1x1 ``fc_operator`` conv (``None``: same as ``operator``) followed by BN and no ReLU,
    like SphereNet's fc6 (``fc_operator`` without ``feature_dim`` is an error: there is no fc layer
    for it to apply to); the 2-D feature experiment uses ``feature_dim=2``. The classifier is a
    bias-free ``nn.Linear``. ``image_size`` is accepted for the models' common interface but not
    needed: the global average pool makes any input size work (32x32 gives SphereResNet-32's 8x8).
    """

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        stage_widths: Sequence[int],
        stem_width: int,
        stem: str,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: ImageSize = 32,
        operator: str = "linear",
        sigmoid_k: float = DEFAULT_SIGMOID_K,
        width_mult: float = 1.0,
        batch_norm: bool = True,
        sphere_norm: bool = False,
        fc_operator: str | None = None,
        feature_dim: int | None = None,
        stem_operator: str | None = None,
        shortcut_operator: str = PLAIN_OPERATOR,
        bn_eps: float = BN_EPS,
        bn_momentum: float = BN_MOMENTUM,
    ) -> None:
        super().__init__()
        if not _is_sequence(blocks_per_stage) or len(blocks_per_stage) == 0:
            raise fail(
                "blocks_per_stage",
                blocks_per_stage,
                "a non-empty sequence of positive integers, one per stage",
                wrong_type=not _is_sequence(blocks_per_stage),
            )
        if not _is_sequence(stage_widths):
            raise fail(
                "stage_widths",
                stage_widths,
                f"a sequence of positive integers, one per entry of blocks_per_stage={tuple(blocks_per_stage)}",
                wrong_type=True,
            )
        if len(stage_widths) != len(blocks_per_stage):
            raise fail(
                "stage_widths",
                tuple(stage_widths),
                f"one width per entry of blocks_per_stage={tuple(blocks_per_stage)}",
            )
        for index, (count, width) in enumerate(zip(blocks_per_stage, stage_widths)):
            check_int(f"blocks_per_stage[{index}]", count, minimum=1)
            check_int(f"stage_widths[{index}]", width, minimum=1)
        check_int("stem_width", stem_width, minimum=1)
        stem = check_choice("stem", stem, STEM_STYLES)
        self.num_classes = check_int("num_classes", num_classes, minimum=1)
        self.in_channels = check_int("in_channels", in_channels, minimum=1)
        self.image_size = check_image_size(image_size)
        self.operator = canonical_operator(operator, MODEL_OPERATORS)

        def same_or_own(value: str | None, argument: str) -> str:  # None: the operator of the residual branches
            return self.operator if value is None else canonical_operator(value, MODEL_OPERATORS, argument=argument)

        self.stem_operator = same_or_own(stem_operator, "stem_operator")
        self.shortcut_operator = canonical_operator(shortcut_operator, MODEL_OPERATORS, argument="shortcut_operator")
        self.fc_operator = same_or_own(fc_operator, "fc_operator")
        sigmoid_k = check_positive("sigmoid_k", sigmoid_k)
        width_mult = check_positive("width_mult", width_mult)
        check_bool("batch_norm", batch_norm)
        check_sphere_norm(sphere_norm, self.operator)
        bn_eps, bn_momentum = check_bn_hyperparameters(bn_eps, bn_momentum)
        if feature_dim is not None:
            check_int("feature_dim", feature_dim, minimum=1)
        elif fc_operator is not None:
            # Without feature_dim there is no fc layer: an fc_operator would be accepted and ignored.
            raise fail("fc_operator", fc_operator, "None unless feature_dim adds the fc layer it applies to")

        def bn(channels: int) -> nn.Module:
            return batch_norm_layer(channels, batch_norm, bn_eps, bn_momentum)

        def unit(c_in: int, c_out: int, kernel: int, stride: int, padding: int, op: str, relu: bool) -> ConvUnit:
            conv = conv_layer(
                c_in, c_out, kernel, stride, padding, operator=op, sigmoid_k=sigmoid_k, sphere_norm=sphere_norm
            )
            return ConvUnit(conv, bn(c_out), relu)

        channels = scaled_width(stem_width, width_mult)
        if stem == "cifar":
            self.stem: nn.Module = unit(self.in_channels, channels, 3, 1, 1, self.stem_operator, True)
        else:
            self.stem = nn.Sequential(
                unit(
                    self.in_channels,
                    channels,
                    IMAGENET_STEM_KERNEL,
                    IMAGENET_STEM_STRIDE,
                    IMAGENET_STEM_KERNEL // 2,
                    self.stem_operator,
                    True,
                ),
                nn.MaxPool2d(IMAGENET_POOL_KERNEL, IMAGENET_POOL_STRIDE, IMAGENET_POOL_KERNEL // 2),
            )

        stages: OrderedDict[str, nn.Module] = OrderedDict()
        for index, (count, base_width) in enumerate(zip(blocks_per_stage, stage_widths), start=1):
            out = scaled_width(base_width, width_mult)
            blocks = []
            for b in range(count):
                stride = 2 if (b == 0 and index > 1) else 1
                blocks.append(
                    BasicBlock(
                        channels,
                        out,
                        stride,
                        operator=self.operator,
                        shortcut_operator=self.shortcut_operator,
                        sigmoid_k=sigmoid_k,
                        sphere_norm=sphere_norm,
                        batch_norm=batch_norm,
                        bn_eps=bn_eps,
                        bn_momentum=bn_momentum,
                    )
                )
                channels = out
            stages[f"stage{index}"] = nn.Sequential(*blocks)
        self.stages = nn.Sequential(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        if feature_dim is None:
            self.fc: nn.Module = nn.Identity()
            self.num_features = channels
        else:
            self.fc = unit(channels, feature_dim, 1, 1, 0, self.fc_operator, False)
            self.num_features = feature_dim
        self.classifier = nn.Linear(self.num_features, self.num_classes, bias=False)
        init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``(N, in_channels, H, W)`` -> pooled (and embedded) features ``(N, num_features)``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects images of shape (N, {self.in_channels}, H, W); got {tuple(x.shape)}"
            )
        x = self.pool(self.stages(self.stem(x)))
        return torch.flatten(self.fc(x), 1)

    def forward_head(self, features: Tensor) -> Tensor:
        """Features ``(N, num_features)`` -> logits ``(N, num_classes)``."""
        return self.classifier(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class SphereResNetOptions(ModelOptions, total=False):
    """Keyword arguments of the registered SphereResNets: :class:`SphereResNet`'s layer arguments."""

    stem_operator: str | None
    shortcut_operator: str


@register_model("sphere_resnet32")
def sphere_resnet32(**options: Unpack[SphereResNetOptions]) -> SphereResNet:
    """Wide SphereResNet-32 of the reference code (CIFAR-10+): 3x3 stem to 96, 3 stages x 5 units
    (96, 192, 384), linear SphereConv by default, stem SphereConv, plain 1x1 shortcuts.
    ``operator='none'`` gives the wide ResNet-32 baseline; ``options`` as in :class:`SphereResNet`.
    """
    return SphereResNet(RESNET32_BLOCKS, RESNET32_STAGE_WIDTHS, RESNET32_STEM_WIDTH, "cifar", **options)


@register_model("sphere_resnet18")
def sphere_resnet18(**options: Unpack[SphereResNetOptions]) -> SphereResNet:
    """ImageNet-style SphereResNet-18 ([2, 2, 2, 2] basic blocks, widths 64..512): SphereConv in the
    residual branches, plain stem and shortcuts by default; ``options`` as in :class:`SphereResNet`.
    """
    options.setdefault("stem_operator", PLAIN_OPERATOR)
    return SphereResNet(RESNET18_BLOCKS, IMAGENET_STAGE_WIDTHS, IMAGENET_STEM_WIDTH, "imagenet", **options)


@register_model("sphere_resnet34")
def sphere_resnet34(**options: Unpack[SphereResNetOptions]) -> SphereResNet:
    """ImageNet-style SphereResNet-34 ([3, 4, 6, 3] basic blocks, widths 64..512): SphereConv in the
    residual branches, plain stem and shortcuts by default; ``options`` as in :class:`SphereResNet`.
    """
    options.setdefault("stem_operator", PLAIN_OPERATOR)
    return SphereResNet(RESNET34_BLOCKS, IMAGENET_STAGE_WIDTHS, IMAGENET_STEM_WIDTH, "imagenet", **options)
