"""The model contract: what every registered builder accepts and what the network it builds offers.

A training run builds any registered model from its configuration and the dataset's shape, and
the classifier losses of Liu et al., "Deep Hyperspherical Learning" (NIPS 2017), Sec. 2.2
(weight-normalised softmax, GA-Softmax and the margin losses) replace the network's own classifier:
they score its penultimate features. So a registered model promises two things:

- its builder is a :class:`ModelBuilder`: it accepts the keyword arguments of
  :class:`BuilderKwargs`, which every run passes;
- the network it returns is a :class:`ClassifierBackbone`: ``forward_features(x)`` gives the
  penultimate features ``(N, num_features)`` and calling it gives the logits.

The paper's networks also accept :class:`ModelOptions`; a run passes those only when its
configuration sets them, so a new model that lacks one fails only for the runs that use it.
"""

from __future__ import annotations

import sys
from typing import Protocol, TypedDict, runtime_checkable

from torch import Tensor, nn

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # PEP 692's Unpack joined typing in Python 3.11
    from typing_extensions import Unpack

from ..errors import InvalidArgumentTypeError
from .layers import ImageSize


class BuilderKwargs(TypedDict, total=False):
    """Keyword arguments every registered builder accepts (each with a default)."""

    num_classes: int
    in_channels: int
    image_size: ImageSize
    operator: str
    width_mult: float


class ModelOptions(BuilderKwargs, total=False):
    """:class:`BuilderKwargs` plus the settings the paper's networks share (see ``SphereNet``)."""

    sigmoid_k: float
    batch_norm: bool
    sphere_norm: bool
    fc_operator: str | None
    feature_dim: int | None
    bn_eps: float
    bn_momentum: float


# The names of the keyword arguments every builder accepts.
BUILDER_KWARGS = tuple(BuilderKwargs.__annotations__)


class ModelBuilder(Protocol):
    """A function registered with :func:`~sphereconv.models.register_model`."""

    def __call__(self, **kwargs: Unpack[BuilderKwargs]) -> nn.Module: ...


@runtime_checkable
class ClassifierBackbone(Protocol):
    """A classification network whose penultimate features a loss module can score.

    ``forward_features(images)`` returns features of shape ``(N, num_features)``; calling the
    network returns its own logits ``(N, num_classes)``.
    """

    num_features: int

    def forward_features(self, x: Tensor) -> Tensor: ...


def require_backbone(model: object, name: str, needed_by: str) -> ClassifierBackbone:
    """``model`` if it is a :class:`ClassifierBackbone`; else ``TypeError`` naming what it lacks.

    ``name`` is the model's name and ``needed_by`` what needs its features (for the message).
    """
    if isinstance(model, ClassifierBackbone) and isinstance(model.num_features, int):
        return model
    missing = [] if callable(getattr(model, "forward_features", None)) else ["forward_features(x)"]
    if not isinstance(getattr(model, "num_features", None), int):
        missing.append("an int num_features")
    raise InvalidArgumentTypeError(
        f"{needed_by} needs a model with forward_features(x) and num_features (a ClassifierBackbone); "
        f"model {name!r} ({type(model).__name__}) lacks {' and '.join(missing)}"
    )
