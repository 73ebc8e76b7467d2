"""The base classes every classifier loss of ``sphereconv.losses`` is built on.

A loss here owns its classifier weight ``W`` of shape ``(num_classes, in_features)`` (the last,
"fc" layer of the network), computes training logits from features, and returns the softmax
cross-entropy of those logits. Liu et al., "Deep Hyperspherical Learning" (NIPS 2017), Sec. 2.2
(loss functions) describes the family: the weight-normalised softmax and the generalised angular
softmax both score class j through the angle theta_j between the feature x and the weight row w_j.

:class:`ClassifierLoss` holds the weight, the input checks and the cross-entropy (with optional
label smoothing). :class:`AngularSoftmaxLoss` adds the angular part shared by every margin loss:

    cos(theta_j) = <x, w_j> / (|x|_e |w_j|_e),   |v|_e = sqrt(sum v^2 + eps m_v^2),
    logit_j      = s(x) * a(theta_j)                 (prediction: no margin)
    logit_y      = s(x) * t(theta_y)                 (training: the true class y gets a margin)

with three small hooks a subclass overrides: :meth:`~AngularSoftmaxLoss.angular_score` (``a``, e.g.
g(theta) or cos theta), :meth:`~AngularSoftmaxLoss.target_logit` (``t``, the margin) and
:meth:`~AngularSoftmaxLoss.logit_scale` (``s``, the feature norm |x| or a fixed scale). The norms
are those of SphereConv (:mod:`sphereconv.nn.functional`): ``|v|_e = sqrt(sum v^2 + eps m_v^2)``
with ``m_v`` the largest |v| of the row (1 for an all-zero row) and eps the SphereConv default
(1e-4, reference code wy1iu/SphereNet), evaluated on rows rescaled by an exact power of two. So
cos theta is exactly invariant to the scale of a feature or a weight row at any finite magnitude
(no overflow of ``sum x^2``), ``|x|_e`` is exactly proportional to it (logits that use it scale
with the feature; they overflow only where ``|x|`` itself exceeds the dtype), and an all-zero
feature gives cos = 0 and finite gradients. The cosine is computed in float32 (float64 stays
float64) also under ``torch.autocast``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_float, check_int
from ..nn.angular import DEFAULT_EPS, check_positive
from ..nn.conv import Device
from ..nn.functional import power_of_two_scale

# He-normal initialisation, std = sqrt(2 / fan_in): the reference recipe's initialiser for every
# weight, the classifier included (wy1iu/SphereNet, the paper's Sec. 5 recipe).
HE_NORMAL_GAIN = 2.0


class ClassifierLoss(nn.Module):
    """A classifier weight ``W (num_classes, in_features)`` plus softmax cross-entropy.

    ``loss(features, labels)`` returns the mean of
    ``-(1 - ls) log p_y - (ls / C) sum_j log p_j`` with ``p = softmax(margin_logits(x, y))``
    (``ls`` = ``label_smoothing``, 0 by default: plain cross-entropy). ``logits(features)`` gives the
    margin-free ``(N, num_classes)`` logits for prediction. Subclasses implement :meth:`logits` and,
    where the training logits differ, :meth:`margin_logits`.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        label_smoothing: float = 0.0,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, minimum=1)
        self.num_classes = check_int("num_classes", num_classes, minimum=2)
        self.label_smoothing = check_float("label_smoothing", label_smoothing, low=0.0, high=1.0)
        self.weight = nn.Parameter(torch.empty((self.num_classes, self.in_features), device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal initialisation of the classifier weight: N(0, 2 / in_features)."""
        nn.init.normal_(self.weight, 0.0, math.sqrt(HE_NORMAL_GAIN / self.in_features))

    def check_features(self, features: Tensor) -> None:
        """Raise unless ``features`` is a floating tensor of shape ``(N >= 1, in_features)``."""
        if not isinstance(features, Tensor):
            raise TypeError(f"features must be a tensor; got {type(features).__name__}")
        if not features.is_floating_point():
            raise TypeError(f"features must be a floating-point tensor; got dtype {features.dtype}")
        if features.dim() != 2 or features.shape[1] != self.in_features or features.shape[0] == 0:
            raise ValueError(
                f"features must have shape (N >= 1, in_features = {self.in_features}); got {tuple(features.shape)}"
            )

    def check_labels(self, labels: Tensor, batch_size: int) -> Tensor:
        """Return ``labels`` as int64 after checking shape ``(batch_size,)`` and range [0, num_classes)."""
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a tensor of class indices; got {type(labels).__name__}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor of class indices; got dtype {labels.dtype}")
        if labels.shape != (batch_size,):
            raise ValueError(f"labels must have shape ({batch_size},), one per feature row; got {tuple(labels.shape)}")
        labels = labels.long()
        if not torch.compiler.is_compiling():
            out_of_range = (labels < 0) | (labels >= self.num_classes)
            if bool(out_of_range.any()):
                bad = sorted(set(labels[out_of_range].tolist()))[:8]
                raise ValueError(
                    f"labels must lie in [0, {self.num_classes - 1}] (num_classes = {self.num_classes}); got {bad}"
                )
        return labels

    def on_training_step(self) -> None:
        """Called once per forward in training mode, after the input checks; default: nothing."""

    def logits(self, features: Tensor) -> Tensor:
        """Margin-free ``(N, num_classes)`` logits for prediction."""
        raise NotImplementedError

    def margin_logits(self, features: Tensor, labels: Tensor) -> Tensor:
        """Training logits (with the margin on each sample's true class); default: :meth:`logits`."""
        return self.logits(features)

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        """Mean softmax cross-entropy (with label smoothing) of the training logits: a 0-d tensor."""
        self.check_features(features)
        labels = self.check_labels(labels, features.shape[0])
        if self.training:
            self.on_training_step()
        return F.cross_entropy(self.margin_logits(features, labels), labels, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, num_classes={self.num_classes}"
        return s + (f", label_smoothing={self.label_smoothing}" if self.label_smoothing else "")


class AngularSoftmaxLoss(ClassifierLoss):
    """Base of the angular softmax family: ``logit_j = s(x) a(theta_j)``, margin on the true class.

    ``cos(theta_j) = <x, w_j> / (|x|_e |w_j|_e)`` with ``|v|_e = sqrt(sum v^2 + eps m_v^2)``, clamped to
    [-1, 1]. Prediction logits are ``s(x) * a(theta_j)`` for every class; training logits replace
    the true class's entry with ``s(x) * t(theta_y)``. The hooks default to the plain cosine
    (``a = t = cos``) scaled by the feature norm (``s = |x|_e``), which makes this base, used
    directly, the weight-normalised softmax with cosine g.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        label_smoothing: float = 0.0,
        eps: float = DEFAULT_EPS,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, num_classes, label_smoothing=label_smoothing, device=device, dtype=dtype)
        self.eps = check_positive("eps", eps)

    def cosine(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(cos_theta (N, C) clamped to [-1, 1], feature_norm |x|_e (N, 1))`` in float32/float64."""
        dtype = (
            torch.float64 if torch.promote_types(features.dtype, self.weight.dtype) == torch.float64 else torch.float32
        )
        with torch.autocast(device_type=features.device.type, enabled=False):
            x, x_norm, x_scale = self._scaled_rows(features.to(dtype))
            w, w_norm, _ = self._scaled_rows(self.weight.to(dtype))
            cos_theta = (x @ (w / w_norm).t()) / x_norm
        return cos_theta.clamp(-1.0, 1.0), x_norm / x_scale

    def _scaled_rows(self, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(s v, |s v|_e, s)`` per row, ``s`` the power of two that brings the row's largest value
        into [1, 2) (exact: nothing overflows or underflows in the squares)."""
        scale, peak = power_of_two_scale(v.abs().amax(dim=1, keepdim=True))
        v = v * scale
        return v, (v.square().sum(dim=1, keepdim=True) + self.eps * peak.square()).sqrt(), scale

    def angular_score(self, cos_theta: Tensor) -> Tensor:
        """Margin-free score ``a(theta_j)`` of every class (before the scale); default ``cos theta``."""
        return cos_theta

    def target_logit(self, cos_target: Tensor, score_target: Tensor) -> Tensor:
        """Score of the true class with the margin applied (before the scale); default: no margin.

        ``cos_target`` and ``score_target`` (the margin-free score) have shape ``(N, 1)``.
        """
        return score_target

    def logit_scale(self, feature_norm: Tensor) -> Tensor | float:
        """Scale ``s(x)`` of every logit of a sample; default: the feature norm ``|x|_e`` (N, 1)."""
        return feature_norm

    def logits(self, features: Tensor) -> Tensor:
        """Prediction logits ``s(x) * a(theta_j)`` (no margin), shape ``(N, num_classes)``."""
        self.check_features(features)
        cos_theta, feature_norm = self.cosine(features)
        return self.logit_scale(feature_norm) * self.angular_score(cos_theta)

    def margin_logits(self, features: Tensor, labels: Tensor) -> Tensor:
        """Training logits: :meth:`logits` with entry ``(i, y_i)`` replaced by ``s(x_i) t(theta_{y_i})``."""
        cos_theta, feature_norm = self.cosine(features)
        scores = self.angular_score(cos_theta)
        index = labels.unsqueeze(1)
        target = self.target_logit(cos_theta.gather(1, index), scores.gather(1, index))
        return self.logit_scale(feature_norm) * scores.scatter(1, index, target.to(scores.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", eps={self.eps}" if self.eps != DEFAULT_EPS else "")


__all__ = ["ClassifierLoss", "AngularSoftmaxLoss", "HE_NORMAL_GAIN"]
