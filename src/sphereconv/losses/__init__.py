"""Classifier losses and regularisers for hyperspherical learning.

Liu et al., "Deep Hyperspherical Learning" (NIPS 2017, arXiv:1711.03189), Sec. 2.2: weight-normalised
softmax and generalised angular softmax (GA-Softmax), with A-Softmax (SphereFace), CosFace and
ArcFace on the same angular base; plus the orthogonality penalty on SphereConv filters. Every loss
is an ``nn.Module`` owning its classifier weight ``(num_classes, in_features)``: call it as
``loss(features, labels) -> scalar`` and use ``loss.logits(features)`` for prediction.
"""

from .additive_margin import ArcFaceLoss, CosFaceLoss
from .angular_softmax import (
    A_SOFTMAX_MARGIN,
    GA_SOFTMAX_MARGIN,
    ASoftmaxLoss,
    GASoftmaxLoss,
    WeightNormalizedSoftmaxLoss,
)
from .base import AngularSoftmaxLoss, ClassifierLoss
from .registry import build_loss, list_losses
from .regularizers import orthogonality_penalty
from .softmax import SoftmaxLoss

__all__ = [
    "ClassifierLoss",
    "AngularSoftmaxLoss",
    "SoftmaxLoss",
    "WeightNormalizedSoftmaxLoss",
    "GASoftmaxLoss",
    "ASoftmaxLoss",
    "CosFaceLoss",
    "ArcFaceLoss",
    "GA_SOFTMAX_MARGIN",
    "A_SOFTMAX_MARGIN",
    "build_loss",
    "list_losses",
    "orthogonality_penalty",
]
