"""Additive margins on normalised features: CosFace and ArcFace.

Both normalise the feature as well as the classifier rows and use a fixed logit scale s, on the
same angular base as GA-Softmax (Liu et al., "Deep Hyperspherical Learning", NIPS 2017, Sec. 2.2):

* CosFace / large margin cosine loss (Wang et al., CVPR 2018, arXiv:1801.09414, Sec. 3.2):
  true-class logit ``s (cos theta_y - m)``, defaults s = 30, m = 0.35 (the paper's choice);
* ArcFace / additive angular margin (Deng et al., CVPR 2019, arXiv:1801.07698, Sec. 3.1):
  true-class logit ``s cos(theta_y + m)``, defaults s = 64, m = 0.5 (the paper's choice).

Every other class gets ``s cos theta_j``; prediction logits use no margin.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._validation import check_float
from ..nn.angular import DEFAULT_EPS, check_positive, safe_acos
from ..nn.conv import Device
from .base import AngularSoftmaxLoss

# Defaults of the CosFace paper (Sec. 4.1: s = 30, m = 0.35) and the ArcFace paper (s = 64, m = 0.5).
COSFACE_SCALE = 30.0
COSFACE_MARGIN = 0.35
ARCFACE_SCALE = 64.0
ARCFACE_MARGIN = 0.5
# Largest ArcFace margin accepted: up to pi/2 the fallback below keeps the target logit decreasing.
ARCFACE_MAX_MARGIN = 0.5 * math.pi


class _FixedScaleLoss(AngularSoftmaxLoss):
    """Angular softmax on normalised features: ``logit_j = s cos(theta_j)`` with a fixed scale s."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        scale: float,
        margin: float,
        label_smoothing: float,
        eps: float,
        device: Device,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__(in_features, num_classes, label_smoothing=label_smoothing, eps=eps, device=device, dtype=dtype)
        self.scale = check_positive("scale", scale)
        self.margin = margin

    def logit_scale(self, feature_norm: Tensor) -> float:
        """The fixed scale s: the feature norm is discarded (features live on the unit sphere)."""
        return self.scale

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale:g}, margin={self.margin:g}"


class CosFaceLoss(_FixedScaleLoss):
    """CosFace (additive cosine margin): true-class logit ``s (cos theta_y - m)``, others ``s cos theta_j``.

    ``margin`` m must lie in [0, 2] (cos theta - m spans [-1 - m, 1 - m]); ``scale`` s > 0.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        scale: float = COSFACE_SCALE,
        margin: float = COSFACE_MARGIN,
        label_smoothing: float = 0.0,
        eps: float = DEFAULT_EPS,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        margin = check_float("margin", margin, low=0.0, high=2.0)
        super().__init__(
            in_features,
            num_classes,
            scale=scale,
            margin=margin,
            label_smoothing=label_smoothing,
            eps=eps,
            device=device,
            dtype=dtype,
        )

    def target_logit(self, cos_target: Tensor, score_target: Tensor) -> Tensor:
        """``cos theta_y - m``."""
        return cos_target - self.margin


class ArcFaceLoss(_FixedScaleLoss):
    """ArcFace (additive angular margin): true-class logit ``s cos(theta_y + m)``, others ``s cos theta_j``.

    ``cos(theta + m)`` stops decreasing once ``theta + m > pi``; there the usual fallback of the
    ArcFace reference implementation (insightface) is used: ``cos theta - m sin m``, which keeps the
    target logit decreasing in theta and below ``cos theta`` (it joins ``cos(theta + m)`` at
    ``theta = pi - m`` with a downward step of ``cos m + m sin m - 1``, positive for m in
    (0, pi/2]). ``margin`` m lies in [0, pi/2] (beyond about 2.33 that step turns upwards and the
    target logit would no longer decrease); ``scale`` s > 0.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        scale: float = ARCFACE_SCALE,
        margin: float = ARCFACE_MARGIN,
        label_smoothing: float = 0.0,
        eps: float = DEFAULT_EPS,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        margin = check_float("margin", margin, low=0.0, high=ARCFACE_MAX_MARGIN)
        super().__init__(
            in_features,
            num_classes,
            scale=scale,
            margin=margin,
            label_smoothing=label_smoothing,
            eps=eps,
            device=device,
            dtype=dtype,
        )
        # theta + m <= pi  <=>  cos theta >= cos(pi - m); fallback offset m sin m (= m sin(pi - m)).
        self._threshold = math.cos(math.pi - margin)
        self._fallback_offset = margin * math.sin(margin)

    def target_logit(self, cos_target: Tensor, score_target: Tensor) -> Tensor:
        """``cos(theta_y + m)`` where ``theta_y + m <= pi``, else ``cos theta_y - m sin m``."""
        shifted = torch.cos(safe_acos(cos_target) + self.margin)
        return torch.where(cos_target >= self._threshold, shifted, cos_target - self._fallback_offset)


__all__ = ["CosFaceLoss", "ArcFaceLoss"]
