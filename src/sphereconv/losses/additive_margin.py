"""Additive margins on normalised features: CosFace and ArcFace.

Both normalise the feature as well as the classifier rows and use a fixed logit scale s, on the
same angular base as GA-Softmax (Liu et al., "Deep Hyperspherical Learning", NIPS 2017, Sec. 2.2):

* CosFace / large margin cosine loss (Wang et al., CVPR 2018, arXiv:1801.09414, Sec. 3.2):
  true-class logit ``s (cos theta_y - m)``, defaults s = 30, m = 0.35 (the additive-margin
  softmax's choice; CosFace's face-recognition runs use m = 0.35 with s = 64);
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

# CosFace defaults: m = 0.35 as in the CosFace paper, s = 30 as in the additive-margin softmax paper
# (Wang et al., "Additive Margin Softmax for Face Verification", arXiv:1801.05599), the smaller of the
# two published scales (CosFace's own runs use s = 64 for thousands of identities; a smaller scale
# suits the tens of classes trained here). ArcFace: the ArcFace paper's s = 64, m = 0.5.
COSFACE_SCALE = 30.0
COSFACE_MARGIN = 0.35
ARCFACE_SCALE = 64.0
ARCFACE_MARGIN = 0.5
# Largest ArcFace margin accepted: up to pi/2 the fallback below keeps the target logit decreasing.
ARCFACE_MAX_MARGIN = 0.5 * math.pi
# Largest CosFace margin accepted: at m = 2 the target's best score 1 - m already equals the lowest
# score -1 of any other class (cos theta - m spans [-1 - m, 1 - m]).
COSFACE_MAX_MARGIN = 2.0


class _FixedScaleLoss(AngularSoftmaxLoss):
    """Angular softmax on normalised features: ``logit_j = s cos(theta_j)`` with a fixed scale s.

    ``margin`` may be reassigned after construction (a margin warm-up); every assignment is checked
    against ``[0, max_margin]``.
    """

    # Largest margin a subclass accepts.
    max_margin: float

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
        margin = check_float("margin", margin, low=0.0, high=self.max_margin)
        super().__init__(in_features, num_classes, label_smoothing=label_smoothing, eps=eps, device=device, dtype=dtype)
        self.scale = check_positive("scale", scale)
        self.margin = margin

    @property
    def margin(self) -> float:
        """The additive margin m, in ``[0, max_margin]``."""
        return self._margin

    @margin.setter
    def margin(self, value: float) -> None:
        self._margin = check_float("margin", value, low=0.0, high=self.max_margin)

    def logit_scale(self, feature_norm: Tensor) -> float:
        """The fixed scale s: the feature norm is discarded (features live on the unit sphere)."""
        return self.scale

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale:g}, margin={self.margin:g}"


class CosFaceLoss(_FixedScaleLoss):
    """CosFace (additive cosine margin): true-class logit ``s (cos theta_y - m)``, others ``s cos theta_j``.

    ``margin`` m must lie in [0, 2] (cos theta - m spans [-1 - m, 1 - m]); ``scale`` s > 0.
    """

    max_margin = COSFACE_MAX_MARGIN

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

    max_margin = ARCFACE_MAX_MARGIN

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
        """``cos(theta_y + m)`` where ``theta_y + m <= pi``, else ``cos theta_y - m sin m``."""
        margin = self.margin  # read at every call: a reassigned margin moves threshold and offset too
        # theta + m <= pi  <=>  cos theta >= cos(pi - m); fallback offset m sin m (= m sin(pi - m)).
        threshold, fallback_offset = math.cos(math.pi - margin), margin * math.sin(margin)
        shifted = torch.cos(safe_acos(cos_target) + margin)
        return torch.where(cos_target >= threshold, shifted, cos_target - fallback_offset)


__all__ = ["CosFaceLoss", "ArcFaceLoss"]
