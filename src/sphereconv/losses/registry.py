"""Config names of the classifier losses and :func:`build_loss`.

The names are the ``loss`` values of a training config: ``softmax`` (plain linear classifier, the
CNN baseline), ``weight_normalized`` and ``ga_softmax`` (Liu et al., "Deep Hyperspherical
Learning", NIPS 2017, Sec. 2.2), ``a_softmax`` (SphereFace), ``cosface`` and ``arcface``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .._validation import check_choice, fail
from ..errors import InvalidArgumentError, InvalidArgumentTypeError, short_repr
from .additive_margin import ArcFaceLoss, CosFaceLoss
from .angular_softmax import ASoftmaxLoss, GASoftmaxLoss, WeightNormalizedSoftmaxLoss
from .base import ClassifierLoss
from .softmax import SoftmaxLoss

LOSSES: dict[str, type[ClassifierLoss]] = {
    "softmax": SoftmaxLoss,
    "weight_normalized": WeightNormalizedSoftmaxLoss,
    "ga_softmax": GASoftmaxLoss,
    "a_softmax": ASoftmaxLoss,
    "cosface": CosFaceLoss,
    "arcface": ArcFaceLoss,
}


def list_losses() -> list[str]:
    """The config names :func:`build_loss` accepts."""
    return list(LOSSES)


def loss_options(name: str) -> list[str]:
    """The keyword options the loss ``name`` accepts (besides in_features and num_classes)."""
    cls = _loss_class(name)
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _loss_class(name: str) -> type[ClassifierLoss]:
    key = name.replace("-", "_") if isinstance(name, str) else name
    return LOSSES[check_choice("loss", key, list(LOSSES))]


def build_loss(name: str, in_features: int, num_classes: int, **kwargs: Any) -> ClassifierLoss:
    """Construct the loss registered as ``name`` (``softmax``, ``weight_normalized``, ``ga_softmax``,
    ``a_softmax``, ``cosface``, ``arcface``) with the given options.

    Raises ``ValueError`` for an unknown name and ``TypeError`` for an option that loss does not take,
    listing the allowed ones; a ``dtype`` that is not a floating-point ``torch.dtype`` is a
    ``TypeError`` and a ``device`` torch cannot allocate on a ``ValueError``, each naming the value.
    """
    cls = _loss_class(name)
    allowed = loss_options(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise InvalidArgumentTypeError(
            f"loss {name!r} does not accept option(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}"
        )
    dtype, device = kwargs.get("dtype"), kwargs.get("device")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise fail("dtype", dtype, "None or a floating-point torch.dtype such as torch.float32", wrong_type=True)
    try:
        return cls(in_features, num_classes, **kwargs)
    except (AssertionError, RuntimeError) as exc:
        if device is None:
            raise
        # torch reports a device it cannot place the weight on (a bad name, a CUDA device without
        # CUDA, an index past the last GPU) from inside the allocation, as these two types.
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InvalidArgumentError(
            f"invalid device={short_repr(device)}: cannot place the loss there ({reason})"
        ) from None


__all__ = ["LOSSES", "list_losses", "loss_options", "build_loss"]
