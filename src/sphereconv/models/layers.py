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
from typing import Union

from torch import nn

from ..nn.angular import DEFAULT_SIGMOID_K, PLAIN_OPERATOR, SPHERE_OPERATORS, canonical_operator, check_positive
from ..nn.conv import SphereConv2d

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

ImageSize = Union[int, tuple[int, int]]


def resolve_operator(value: str, name: str = "operator") -> str:
    """Canonical operator name for a model layer: ``"none"`` (plain conv) or a SphereConv operator.

    Accepts the aliases of :func:`sphereconv.nn.angular.canonical_operator` (``lr_sigmoid``).
    Raises ``TypeError`` for a non-string and ``ValueError`` naming the allowed values otherwise.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {(PLAIN_OPERATOR,) + SPHERE_OPERATORS}; got {type(value).__name__} {value!r}")
    if value.lower() == PLAIN_OPERATOR:
        return PLAIN_OPERATOR
    try:
        return canonical_operator(value, SPHERE_OPERATORS)
    except ValueError:
        raise ValueError(
            f"unknown {name} {value!r}; allowed: {PLAIN_OPERATOR} (plain convolution), "
            f"{', '.join(SPHERE_OPERATORS)} (alias lr_sigmoid)"
        ) from None


def check_positive_int(name: str, value) -> int:
    """Return ``value`` if it is an int >= 1, else raise ``TypeError``/``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int; got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """Return ``value`` if it is a bool, else raise ``TypeError`` naming it."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r}")
    return value


def check_image_size(value: ImageSize) -> tuple[int, int]:
    """``image_size`` as ``(height, width)``; an int means a square image."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"image_size must be an int or a (height, width) pair; got {value!r}")
        return (check_positive_int("image_size height", value[0]), check_positive_int("image_size width", value[1]))
    size = check_positive_int("image_size", value)
    return (size, size)


def scaled_width(base: int, width_mult: float) -> int:
    """Number of channels ``max(1, round(base * width_mult))`` for the width experiment."""
    return max(1, int(round(base * width_mult)))


def check_width_mult(width_mult) -> float:
    """Return ``width_mult`` as a float if it is a positive finite number."""
    check_positive("width_mult", width_mult)
    return float(width_mult)


def check_sphere_norm(sphere_norm, operator: str) -> bool:
    """Validate ``sphere_norm``: SphereNorm is a hyperspherical layer, so it needs a sphere operator."""
    check_bool("sphere_norm", sphere_norm)
    if sphere_norm and operator == PLAIN_OPERATOR:
        raise ValueError(
            f"sphere_norm=True needs a SphereConv operator ({', '.join(SPHERE_OPERATORS)}); got operator={operator!r}"
        )
    return sphere_norm


def _sphere_norm_class() -> type:
    """``sphereconv.nn.SphereNorm2d``, imported on first use."""
    try:
        from ..nn import norm
    except ImportError as exc:  # pragma: no cover - only when the layer is absent from the install
        raise ImportError("sphere_norm=True needs sphereconv.nn.norm.SphereNorm2d, which cannot be imported") from exc
    return norm.SphereNorm2d


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
    operator = resolve_operator(operator)
    if operator == PLAIN_OPERATOR:
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
    if sphere_norm:
        return _sphere_norm_class()(
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


def check_bn_hyperparameters(bn_eps, bn_momentum) -> tuple[float, float]:
    """Validate BatchNorm ``eps`` (> 0) and ``momentum`` (in (0, 1])."""
    check_positive("bn_eps", bn_eps)
    check_positive("bn_momentum", bn_momentum)
    if bn_momentum > 1:
        raise ValueError(f"bn_momentum must be in (0, 1] (PyTorch convention: 1 - decay); got {bn_momentum!r}")
    return float(bn_eps), float(bn_momentum)


class ConvUnit(nn.Sequential):
    """``conv -> BatchNorm (optional) -> ReLU (optional)``, the reference ``_conv_layer``.

    Children are always named ``conv``, ``bn`` and ``act`` (``nn.Identity`` where disabled), so
    state-dict keys do not depend on the options. The ReLU works in place only on BatchNorm's
    output, never directly on a (custom-autograd) convolution output.
    """

    def __init__(self, conv: nn.Module, bn: nn.Module, relu: bool) -> None:
        act = nn.ReLU(inplace=isinstance(bn, nn.BatchNorm2d)) if relu else nn.Identity()
        super().__init__(OrderedDict(conv=conv, bn=bn, act=act))


def he_normal_(weight) -> None:
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

