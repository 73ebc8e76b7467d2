"""Orthogonality regulariser on SphereConv filters.

Liu et al., "Deep Hyperspherical Learning" (NIPS 2017): the experiments (Sec. 5, orthogonality
ablation) add ``||W^T W - I||_F^2`` for every SphereConv layer, W holding the layer's raw
(unnormalised) filters as columns. The reference code (wy1iu/SphereNet) weights it by 1e-4,
written there as ``2e-4 * tf.nn.l2_loss(W^T W - I)`` (l2_loss halves the sum of squares), and
applies it to the SphereConv layers only: not to the classifier and not to plain convolutions.
Here "SphereConv layers" are every layer with that operator: SphereConv (and SphereNorm, a
subclass), SphereLinear (the operator on whole vectors), and the decoupled convolutions, which the
Decoupled Networks code (wy1iu/DCNets, ``orth=True`` on every decoupled layer) penalises too.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .._validation import check_float
from ..nn import SPHERE_CONV_TYPES, DecoupledConv2d, SphereLinear

# Reference weight of the orthogonality term (wy1iu/SphereNet: 2e-4 * l2_loss = 1e-4 * ||.||_F^2).
ORTHOGONALITY_COEFFICIENT = 1e-4
# Layers whose filters are penalised (and, in the optimiser, left undecayed).
PENALISED_TYPES = (*SPHERE_CONV_TYPES, SphereLinear, DecoupledConv2d)


def filter_orthogonality_error(weight: Tensor) -> Tensor:
    """``||W^T W - I||_F^2`` for one layer, W = the filters as columns, shape ``(in * kernel, out)``.

    ``weight`` is a convolution weight ``(out, in / groups, *kernel)`` (or a linear weight
    ``(out, in)``); ``W^T W`` is the ``(out, out)`` Gram matrix of the flattened filters. Computed in
    float32 (float64 stays float64), outside autocast.
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"expected a weight tensor; got {type(weight).__name__}")
    if weight.dim() < 2:
        raise ValueError(
            f"a filter weight needs at least 2 dimensions (out, in, *kernel); got shape {tuple(weight.shape)} "
            "(pass a module to penalise its SphereConv layers only)"
        )
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=weight.device.type, enabled=False):
        filters = weight.reshape(weight.shape[0], -1).to(dtype)  # rows = filters = columns of W
        gram = filters @ filters.t()  # W^T W
        identity = torch.eye(gram.shape[0], dtype=dtype, device=gram.device)
        return (gram - identity).square().sum()


def _sphere_conv_weights(module: nn.Module) -> list[Tensor]:
    return [m.weight for m in module.modules() if isinstance(m, PENALISED_TYPES)]


def _default_device(module_or_params) -> torch.device:
    if isinstance(module_or_params, nn.Module):
        for tensor in module_or_params.parameters():
            return tensor.device
        for buffer in module_or_params.buffers():
            return buffer.device
    return torch.device("cpu")


def orthogonality_penalty(
    module_or_params: nn.Module | Tensor | Iterable[Tensor], coefficient: float = ORTHOGONALITY_COEFFICIENT
) -> Tensor:
    """``coefficient * sum_layers ||W^T W - I||_F^2`` over SphereConv filters.

    ``module_or_params`` is a module (every instance of ``PENALISED_TYPES`` inside it is penalised:
    SphereConv, SphereNorm, SphereLinear, decoupled convolutions; classifier, plain convolutions
    and other layers are not), a weight tensor, or
    an iterable of weight tensors (each penalised as the filters of one layer). Returns a 0-d tensor
    on the weights' device, differentiable w.r.t. them; 0 when there is nothing to penalise.
    ``coefficient`` defaults to the reference 1e-4 and must be >= 0.
    """
    coefficient = check_float("coefficient", coefficient, low=0.0)
    if isinstance(module_or_params, nn.Module):
        weights = _sphere_conv_weights(module_or_params)
    elif isinstance(module_or_params, Tensor):
        weights = [module_or_params]
    elif isinstance(module_or_params, Iterable) and not isinstance(module_or_params, (str, bytes)):
        weights = list(module_or_params)
    else:
        raise TypeError(
            "orthogonality_penalty expects a module, a weight tensor or an iterable of weight tensors; "
            f"got {type(module_or_params).__name__}"
        )
    if not weights:
        return torch.zeros((), device=_default_device(module_or_params))
    total = filter_orthogonality_error(weights[0])
    for weight in weights[1:]:
        total = total + filter_orthogonality_error(weight).to(total.device)
    return coefficient * total


__all__ = ["ORTHOGONALITY_COEFFICIENT", "PENALISED_TYPES", "filter_orthogonality_error", "orthogonality_penalty"]
