"""Plain softmax cross-entropy on a linear classifier: the CNN baseline's loss.

The baseline of Liu et al., "Deep Hyperspherical Learning" (NIPS 2017), Sec. 5: ``logit_j = <w_j, x>
(+ b_j)``. The reference code (wy1iu/SphereNet) trains it with label smoothing 0.01; here label
smoothing is an option, off by default, and the classifier has no bias by default (SphereNet-9's
classifier is a 1x1 convolution without bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_bool
from ..nn.conv import Device
from .base import ClassifierLoss


class SoftmaxLoss(ClassifierLoss):
    """Linear classifier + cross-entropy: ``logits = x W^T (+ b)``, loss = mean CE with optional
    label smoothing ``-(1 - ls) log p_y - (ls / C) sum_j log p_j``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        bias: bool = False,
        label_smoothing: float = 0.0,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_bool("bias", bias)
        super().__init__(in_features, num_classes, label_smoothing=label_smoothing, device=device, dtype=dtype)
        if bias:
            self.bias = nn.Parameter(torch.zeros(num_classes, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """He-normal weight (see :class:`ClassifierLoss`), zero bias."""
        super().reset_parameters()
        if getattr(self, "bias", None) is not None:
            nn.init.zeros_(self.bias)

    def logits(self, features: Tensor) -> Tensor:
        """``x W^T (+ b)``, shape ``(N, num_classes)``."""
        self.check_features(features)
        return F.linear(features, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bias={self.bias is not None}"


__all__ = ["SoftmaxLoss"]
