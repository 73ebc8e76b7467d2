"""Config names of the classifier losses and :func:`build_loss`.

The names are the ``loss`` values of a training config: ``softmax`` (plain linear classifier, the
CNN baseline), ``weight_normalized`` and ``ga_softmax`` (Liu et al., "Deep Hyperspherical
Learning", NIPS 2017, Sec. 2.2), ``a_softmax`` (SphereFace), ``cosface`` and ``arcface``.
"""

from __future__ import annotations

import inspect
from typing import Any

from .._validation import check_choice
from ..errors import InvalidArgumentTypeError
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
    listing the allowed ones.
    """
    cls = _loss_class(name)
    allowed = loss_options(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise InvalidArgumentTypeError(
            f"loss {name!r} does not accept option(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}"
        )
    return cls(in_features, num_classes, **kwargs)


__all__ = ["LOSSES", "list_losses", "loss_options", "build_loss"]
