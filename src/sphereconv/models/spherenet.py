"""The plain SphereNet family: SphereNet-9/18/36/69 and their CNN baselines.

Liu et al., "Deep Hyperspherical Learning" (NIPS 2017), Sec. 5 (CIFAR-10 experiments, including
the width, depth and ultra-deep studies) and the reference network ``SphereNet.build`` of
wy1iu/SphereNet (``spherenet.py``):

    3 stages x L convs 3x3 (widths 128, 192, 256), each conv -> BN -> ReLU, 2x2 max-pool per stage
    fc6: a conv whose kernel covers the whole remaining map (4x4 at 32x32 input) -> BN, no ReLU
    classifier: a 1x1 conv (here the equivalent bias-free ``nn.Linear``) on the fc6 output

BatchNorm after fc6 follows the specification's "BatchNorm after every SphereConv" and the
reference's linear and sigmoid examples (``examples/spherenet_*_sphereconv.py``: ``bn=True``); the
reference's cosine network (``spherenet.py``) and its CNN-9 (``baseline/baseline_cnn.py``) leave fc6
without it (``bn=False``). Here every network of the family has it, so that the operators and the CNN
are compared with one architecture.

with L = 3, 6, 12, 23 conv layers per stage for SphereNet-9, -18, -36 and -69. With
``operator="none"`` every layer is a plain convolution (CNN-9 etc.), otherwise a SphereConv.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn

from .._validation import check_bool, check_int
from ..nn.angular import DEFAULT_SIGMOID_K, MODEL_OPERATORS, canonical_operator, check_positive
from .contract import ModelOptions, Unpack
from .layers import (
    BN_EPS,
    BN_MOMENTUM,
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

# Stage widths of the reference SphereNet-9 (``n_out = 128, 192, 256`` in spherenet.py).
SPHERENET_STAGE_WIDTHS = (128, 192, 256)
# Width of fc6 in the reference (``_conv_layer(feat, 4, 256, ...)``), scaled by ``width_mult``.
SPHERENET_FEATURE_DIM = 256
# Conv layers per stage of the depth family (paper Sec. 5: SphereNet-9/18/36/69).
SPHERENET_DEPTHS = {9: 3, 18: 6, 36: 12, 69: 23}


def pooled_size(size: int) -> int:
    """Spatial size after the reference 2x2/stride-2 max-pool with TensorFlow ``'SAME'`` padding.

    ``'SAME'`` keeps a partial window at an odd border, so the result is ``ceil(size / 2)``
    (32 -> 16 -> 8 -> 4, and 28 -> 14 -> 7 -> 4); PyTorch's ``ceil_mode=True`` matches it.
    """
    return math.ceil(size / 2)


class SphereNet(nn.Module):
    """Plain (non-residual) SphereNet of Liu et al. (2017), and its CNN baseline.

    Three stages of ``layers_per_stage`` 3x3 convolutions (widths 128, 192, 256 times
    ``width_mult``), each followed by BatchNorm (if ``batch_norm``) and ReLU, a 2x2 max-pool after
    each stage, then fc6: a convolution whose kernel equals the remaining map (so its output is
    1x1) with ``feature_dim`` outputs and BatchNorm but no ReLU, then a bias-free linear classifier.
    The pools keep a partial window at odd borders (the reference's ``'SAME'`` padding), so the
    final map is ``ceil(image_size / 8)``: 4x4 for both 32x32 and 28x28 inputs.

    Each convolution computes ``g(theta)`` with ``cos(theta) = <w, x> / (|w| |x|)`` for a
    SphereConv ``operator`` (``linear``, ``cosine``, ``sigmoid``, ``learnable_sigmoid``) or the
    plain ``<w, x>`` for ``operator="none"``. Arguments:

    - ``fc_operator``: operator of fc6 (``None``: same as ``operator``).
    - ``feature_dim``: fc6 outputs = ``num_features`` (``None``: 256 scaled by ``width_mult``, as
      the reference's 256 at width 1; 2 for the 2-D feature visualisation).
    - ``sphere_norm``: use ``SphereNorm2d`` for every hyperspherical layer.
    - ``bn_eps``, ``bn_momentum``: BatchNorm hyperparameters (eps 1e-3 as the reference; momentum
      0.1 by default, the reference's 1 - 0.999 = ``REFERENCE_BN_MOMENTUM`` in the paper configs).

    ``forward_features(x)`` returns the flattened fc6 output ``(N, num_features)``,
    ``forward_head(features)`` the logits ``(N, num_classes)``.
    """

    def __init__(
        self,
        layers_per_stage: int,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: ImageSize = 32,
        operator: str = "cosine",
        sigmoid_k: float = DEFAULT_SIGMOID_K,
        width_mult: float = 1.0,
        batch_norm: bool = True,
        sphere_norm: bool = False,
        fc_operator: str | None = None,
        feature_dim: int | None = None,
        bn_eps: float = BN_EPS,
        bn_momentum: float = BN_MOMENTUM,
    ) -> None:
        super().__init__()
        check_int("layers_per_stage", layers_per_stage, minimum=1)
        self.num_classes = check_int("num_classes", num_classes, minimum=1)
        self.in_channels = check_int("in_channels", in_channels, minimum=1)
        self.image_size = check_image_size(image_size)
        self.operator = canonical_operator(operator, MODEL_OPERATORS)
        self.fc_operator = (
            self.operator
            if fc_operator is None
            else canonical_operator(fc_operator, MODEL_OPERATORS, argument="fc_operator")
        )
        sigmoid_k = check_positive("sigmoid_k", sigmoid_k)
        width_mult = check_positive("width_mult", width_mult)
        check_bool("batch_norm", batch_norm)
        check_sphere_norm(sphere_norm, self.operator)
        bn_eps, bn_momentum = check_bn_hyperparameters(bn_eps, bn_momentum)
        if feature_dim is None:
            feature_dim = scaled_width(SPHERENET_FEATURE_DIM, width_mult)
        self.num_features = check_int("feature_dim", feature_dim, minimum=1)

        def unit(c_in: int, c_out: int, kernel: int | tuple[int, int], padding: int, op: str, relu: bool) -> ConvUnit:
            conv = conv_layer(
                c_in, c_out, kernel, padding=padding, operator=op, sigmoid_k=sigmoid_k, sphere_norm=sphere_norm
            )
            return ConvUnit(conv, batch_norm_layer(c_out, batch_norm, bn_eps, bn_momentum), relu)

        stages: OrderedDict[str, nn.Module] = OrderedDict()
        channels = self.in_channels
        height, width = self.image_size
        for index, base_width in enumerate(SPHERENET_STAGE_WIDTHS, start=1):
            out = scaled_width(base_width, width_mult)
            layers = [
                unit(channels if i == 0 else out, out, 3, 1, self.operator, True) for i in range(layers_per_stage)
            ]
            stages[f"stage{index}"] = nn.Sequential(*layers)
            stages[f"pool{index}"] = nn.MaxPool2d(2, 2, ceil_mode=True)
            channels = out
            height, width = pooled_size(height), pooled_size(width)
        self.features = nn.Sequential(stages)
        # fc6 covers the whole final map (4x4 at 32x32 input), as the reference's VALID 4x4 conv.
        self.final_map_size = (height, width)
        self.fc6 = unit(channels, self.num_features, self.final_map_size, 0, self.fc_operator, False)
        self.classifier = nn.Linear(self.num_features, self.num_classes, bias=False)
        init_weights(self)

    @property
    def depth(self) -> int:
        """Number of 3x3 conv layers (9, 18, 36 or 69 for the registered variants)."""
        return sum(len(stage) for stage in self.features.children() if isinstance(stage, nn.Sequential))

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``(N, in_channels, H, W)`` -> fc6 features ``(N, num_features)``."""
        if x.dim() != 4 or (x.shape[1], *x.shape[-2:]) != (self.in_channels, *self.image_size):
            raise ValueError(
                f"{type(self).__name__} was built for images of shape (N, {self.in_channels}, "
                f"{self.image_size[0]}, {self.image_size[1]}) (image_size); got {tuple(x.shape)}"
            )
        return torch.flatten(self.fc6(self.features(x)), 1)

    def forward_head(self, features: Tensor) -> Tensor:
        """fc6 features ``(N, num_features)`` -> logits ``(N, num_classes)``."""
        return self.classifier(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model("spherenet9")
def spherenet9(**options: Unpack[ModelOptions]) -> SphereNet:
    """SphereNet-9, 3 conv layers per stage (``operator="none"``: CNN-9); ``options`` as in :class:`SphereNet`."""
    return SphereNet(SPHERENET_DEPTHS[9], **options)


@register_model("spherenet18")
def spherenet18(**options: Unpack[ModelOptions]) -> SphereNet:
    """SphereNet-18, 6 conv layers per stage (``operator="none"``: CNN-18); ``options`` as in :class:`SphereNet`."""
    return SphereNet(SPHERENET_DEPTHS[18], **options)


@register_model("spherenet36")
def spherenet36(**options: Unpack[ModelOptions]) -> SphereNet:
    """SphereNet-36, 12 conv layers per stage (``operator="none"``: CNN-36); ``options`` as in :class:`SphereNet`."""
    return SphereNet(SPHERENET_DEPTHS[36], **options)


@register_model("spherenet69")
def spherenet69(**options: Unpack[ModelOptions]) -> SphereNet:
    """SphereNet-69, 23 conv layers per stage (``operator="none"``: CNN-69); ``options`` as in :class:`SphereNet`."""
    return SphereNet(SPHERENET_DEPTHS[69], **options)
