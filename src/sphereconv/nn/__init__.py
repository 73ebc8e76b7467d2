"""Hyperspherical layers mirroring ``torch.nn`` (Liu et al. 2017; Liu et al. 2018)."""

from . import functional
from .angular import ANGULAR_OPERATORS, SPHERE_OPERATORS, angular_function, safe_acos
from .conv import SPHERE_CONV_TYPES, SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear

__all__ = [
    "functional",
    "ANGULAR_OPERATORS",
    "SPHERE_OPERATORS",
    "angular_function",
    "safe_acos",
    "SPHERE_CONV_TYPES",
    "SphereConv1d",
    "SphereConv2d",
    "SphereConv3d",
    "SphereLinear",
]
