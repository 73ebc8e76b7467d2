"""Building blocks shared by every model: the conv-layer factory, BatchNorm and initialisation.

Liu et al., "Deep Hyperspherical Learning" (NIPS 2017): Sec. 2.1 (SphereConv), the networks of
Sec. 5 (every SphereConv followed by BatchNorm and ReLU) and SphereNorm. Where the paper is
silent the authors' reference code (wy1iu/SphereNet, ``spherenet.py`` and
``sphere_resnet/sphere_resnet_v1.py``) fixes the defaults: no convolution bias, He-normal filters
with std ``sqrt(2 / fan_in)``, BatchNorm with eps 1e-3. Its running averages of decay 0.999
(``REFERENCE_BN_MOMENTUM``) are set by the paper-recipe configs only: the models default to
PyTorch's momentum 0.1, which a run of a few hundred steps needs (see ``BN_MOMENTUM``).

One factory, :func:`conv_layer`, builds every convolution of every model, so that a model's
``operator`` switches all of its layers between ``nn.Conv2d`` (``"none"``: the CNN baseline),
``SphereConv2d`` and ``SphereNorm2d``.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .._validation import check_bool, check_float, check_int, fail
from ..nn.angular import (
    DEFAULT_SIGMOID_K,
    MODEL_OPERATORS,
    PLAIN_OPERATOR,
    SPHERE_OPERATORS,
    canonical_operator,
    check_positive,
)
from ..nn.conv import SphereConv2d
from ..nn.norm import SphereNorm2d

# Reference BatchNorm epsilon: ``tf.nn.batch_normalization(x, mean, var, beta, gamma, 1e-3)`` in
# ``SphereNet.batch_norm`` (wy1iu/SphereNet, spherenet.py and sphere_resnet_v1.py).
BN_EPS = 1e-3
# Reference running statistics: ``tf.train.ExponentialMovingAverage(decay=0.999)`` (same files).
# PyTorch's ``momentum`` is the weight of the new batch statistic, i.e. ``1 - decay``. Such an
# average remembers ~1000 steps: right for the reference's 64k iterations, but a run of a few
# hundred steps then evaluates with statistics of its first, untrained weights (test accuracy at
# chance while training accuracy is 85%). The paper-recipe configs set it (``bn_momentum: 0.001``).
REFERENCE_BN_DECAY = 0.999
REFERENCE_BN_MOMENTUM = round(1.0 - REFERENCE_BN_DECAY, 12)
# Default BatchNorm momentum of every model: PyTorch's own default (``nn.BatchNorm2d``), whose
# ~10-step memory follows the weights in short runs and costs nothing measurable in long ones.
BN_MOMENTUM = 0.1
# Images a training-mode BatchNorm needs per batch (per process under data parallelism): it
# normalises by the batch's variance, undefined for one value per channel, and the last
# convolution of SphereNet-9 (fc6) has a 1 x 1 output, so one image gives one value.
MIN_BATCH_NORM_BATCH = 2

ImageSize = int | tuple[int, int]


def check_image_size(value: ImageSize) -> tuple[int, int]:
    """``image_size`` as ``(height, width)``; an int means a square image."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise fail("image_size", value, "a positive integer or a (height, width) pair of them")
        return (check_int("image_size height", value[0], minimum=1), check_int("image_size width", value[1], minimum=1))
    size = check_int("image_size", value, minimum=1)
    return (size, size)


def scaled_width(base: int, width_mult: float) -> int:
    """Number of channels ``max(1, round(base * width_mult))`` for the width experiment."""
    return max(1, int(round(base * width_mult)))


def check_sphere_norm(sphere_norm: bool, operator: str) -> bool:
    """Validate ``sphere_norm``: SphereNorm is a hyperspherical layer, so it needs a sphere operator."""
    if check_bool("sphere_norm", sphere_norm) and operator == PLAIN_OPERATOR:
        raise fail(
            "sphere_norm",
            sphere_norm,
            f"False with operator={operator!r} (SphereNorm needs a SphereConv operator: {', '.join(SPHERE_OPERATORS)})",
        )
    return sphere_norm


def conv_layer(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    *,
    operator: str,
    sigmoid_k: float = DEFAULT_SIGMOID_K,
    sphere_norm: bool = False,
) -> nn.Conv2d:
    """The convolution every model is built from (no bias, as in the reference code).

    - ``operator="none"``: ``nn.Conv2d`` computing ``<w, x>``.
    - a SphereConv operator (``linear``, ``cosine``, ``sigmoid``, ``learnable_sigmoid``):
      ``SphereConv2d`` computing ``g(theta)``, ``cos(theta) = <w, x> / (|w| |x|)``.
    - the same with ``sphere_norm=True``: ``SphereNorm2d`` (SphereConv with learnable per-channel
      rescaling). ``sphere_norm`` has no effect on a plain layer.

    Weights keep PyTorch's default initialisation; models call :func:`init_weights` once built.
    """
    operator = canonical_operator(operator, MODEL_OPERATORS)
    if operator == PLAIN_OPERATOR:
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
    if sphere_norm:
        return SphereNorm2d(
            in_channels, out_channels, kernel_size, stride, padding, operator=operator, sigmoid_k=sigmoid_k
        )
    return SphereConv2d(in_channels, out_channels, kernel_size, stride, padding, operator=operator, sigmoid_k=sigmoid_k)


def batch_norm_layer(channels: int, enabled: bool, eps: float = BN_EPS, momentum: float = BN_MOMENTUM) -> nn.Module:
    """``nn.BatchNorm2d`` (eps 1e-3 as the reference, momentum 0.1), or ``nn.Identity`` when disabled.

    Pass ``momentum=REFERENCE_BN_MOMENTUM`` (decay 0.999) to reproduce the reference exactly; its
    running statistics need a few thousand iterations to settle.
    """
    if not enabled:
        return nn.Identity()
    return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)


def check_bn_hyperparameters(bn_eps: float, bn_momentum: float) -> tuple[float, float]:
    """Validate BatchNorm ``eps`` (> 0) and ``momentum`` (in (0, 1], PyTorch's ``1 - decay``)."""
    return check_positive("bn_eps", bn_eps), check_float("bn_momentum", bn_momentum, low=0.0, high=1.0, low_open=True)


class ConvUnit(nn.Sequential):
    """``conv -> BatchNorm (optional) -> ReLU (optional)``, the reference ``_conv_layer``.

    Children are always named ``conv``, ``bn`` and ``act`` (``nn.Identity`` where disabled), so
    state-dict keys do not depend on the options. The ReLU works in place only on BatchNorm's
    output, never directly on a (custom-autograd) convolution output.
    """

    def __init__(self, conv: nn.Module, bn: nn.Module, relu: bool) -> None:
        act = nn.ReLU(inplace=isinstance(bn, nn.BatchNorm2d)) if relu else nn.Identity()
        super().__init__(OrderedDict(conv=conv, bn=bn, act=act))


def he_normal_(weight: Tensor) -> None:
    """He-normal initialisation in place: ``N(0, std^2)``, ``std = sqrt(2 / fan_in)``.

    ``fan_in`` is the number of inputs of one output unit (``C_in/groups * kh * kw`` for a conv),
    as in the reference ``get_conv_filter(stddev=sqrt(2 / (ksize * ksize * n_input)))``.
    """
    nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")


def init_weights(model: nn.Module) -> None:
    """He-normal weights and zero biases for every convolution and linear layer of ``model``.

    BatchNorm keeps gamma = 1, beta = 0 (reference). Parameters other than ``weight``/``bias``
    (e.g. the learnable sigmoid k) keep their own initial values.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            he_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
