"""Hyperspherical layers mirroring ``torch.nn``.

SphereConv, SphereLinear and SphereNorm follow Liu et al., "Deep Hyperspherical Learning" (NIPS 2017,
Sec. 2.1 and the normalisation discussion); the decoupled operators follow Liu et al., "Decoupled
Networks" (CVPR 2018, Sec. 3).

:func:`set_kernel_backend` / ``$SPHERECONV_KERNELS`` (``auto``, ``triton``, ``cpp``, ``aten``) choose
the fused epilogue's kernels (Triton on CUDA, C++ on CPU), and :func:`kernel_status` reports which
ones each case uses (see :mod:`sphereconv.nn._fused`: both are checked against ATen at first use).
"""

from . import functional
from ._fused import KERNEL_BACKENDS, kernel_backend, kernel_status, set_kernel_backend
from .angular import SPHERE_OPERATORS
from .conv import SPHERE_CONV_TYPES, SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear
from .decoupled import MAGNITUDES, DecoupledConv2d, decoupled_conv2d, magnitude_function
from .functional import sphere_conv1d, sphere_conv2d, sphere_conv3d, sphere_cosine, sphere_linear
from .norm import SPHERE_NORM_TYPES, SphereNorm1d, SphereNorm2d, SphereNorm3d

__all__ = [
    "SphereConv1d",
    "SphereConv2d",
    "SphereConv3d",
    "SphereLinear",
    "SphereNorm1d",
    "SphereNorm2d",
    "SphereNorm3d",
    "DecoupledConv2d",
    "SPHERE_CONV_TYPES",
    "SPHERE_NORM_TYPES",
    "SPHERE_OPERATORS",
    "MAGNITUDES",
    "functional",
    "sphere_conv1d",
    "sphere_conv2d",
    "sphere_conv3d",
    "sphere_linear",
    "sphere_cosine",
    "decoupled_conv2d",
    "magnitude_function",
    "KERNEL_BACKENDS",
    "kernel_backend",
    "kernel_status",
    "set_kernel_backend",
]
