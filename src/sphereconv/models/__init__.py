"""Networks of "Deep Hyperspherical Learning" (Liu et al., NIPS 2017, Sec. 5) behind a registry.

``create_model(name, **kwargs)`` builds a registered network (``list_models()`` names them):
the plain SphereNet family ``spherenet9/18/36/69``, the wide CIFAR ``sphere_resnet32`` and the
ImageNet-style ``sphere_resnet18/34``; ``operator="none"`` gives each one's CNN baseline.
``convert_model`` turns the convolutions of any existing network into SphereConv layers.
A registered builder follows the model contract of :mod:`.contract` (:class:`ModelBuilder` building a
:class:`ClassifierBackbone`).
"""

from .contract import BuilderKwargs, ClassifierBackbone, ModelBuilder, ModelOptions
from .convert import convert_model
from .layers import BN_MOMENTUM, MIN_BATCH_NORM_BATCH, REFERENCE_BN_MOMENTUM
from .registry import create_model, list_models, register_model
from .resnet import SphereResNet
from .spherenet import SphereNet

__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "convert_model",
    "ModelBuilder",
    "ClassifierBackbone",
    "BuilderKwargs",
    "ModelOptions",
    "SphereNet",
    "SphereResNet",
    "BN_MOMENTUM",
    "MIN_BATCH_NORM_BATCH",
    "REFERENCE_BN_MOMENTUM",
]
