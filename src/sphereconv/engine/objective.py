"""What is trained: the network, its classification loss and the orthogonality penalty.

Liu et al., "Deep Hyperspherical Learning" (NIPS 2017): Sec. 2.2 (softmax, weight-normalised
softmax and GA-Softmax on the penultimate features), Sec. 5 (orthogonality penalty on SphereConv
filters, reference coefficient 1e-4). With ``loss="softmax"`` the model's own classifier
produces the logits and cross-entropy (with optional label smoothing) is the loss; every other
loss is a module owning its classifier weight, applied to ``model.forward_features(x)``. That
classifier head scores with the model's own angular function g (:func:`head_operator`) and
sigmoid k unless ``loss_kwargs`` names others, and a margin loss anneals over the run's length.

:class:`TrainingModule` puts model and loss into one ``nn.Module`` so that
``DistributedDataParallel`` and ``torch.compile`` see a single forward pass. Losses, norms and
softmax are computed in float32 even under autocast.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses import build_loss
from ..losses.base import ClassifierLoss
from ..losses.registry import loss_options
from ..models import BN_MOMENTUM, create_model
from ..models.contract import ClassifierBackbone, require_backbone
from ..nn.angular import DEFAULT_SIGMOID_K, PLAIN_OPERATOR
from .config import TrainConfig
from .runtime import autocast

# Config keys that are model options (models.contract.ModelOptions) beyond the builder contract's
# operator and width_mult, with the default every registered model shares: model_kwargs passes
# one only when the config changes it, so a model without the option still builds by default.
_OPTIONAL_MODEL_ARGS = {
    "sigmoid_k": DEFAULT_SIGMOID_K,
    "batch_norm": True,
    "sphere_norm": False,
    "fc_operator": None,
    "feature_dim": None,
    "bn_momentum": BN_MOMENTUM,
}
# Config keys that define the network, so a checkpoint loads only into a run that agrees on them:
# the inputs of model_kwargs except bn_momentum, which changes how BatchNorm averages its
# statistics, not what the weights are.
MODEL_CONFIG_KEYS = (
    "model",
    "operator",
    "width_mult",
    *(key for key in _OPTIONAL_MODEL_ARGS if key != "bn_momentum"),
    "model_kwargs",
)
# Classifier g of a model whose own operator has no fixed-g counterpart: the CNN's inner product
# normalised is the cosine (the paper's weight-normalised softmax, Sec. 2.2), and the learnable
# sigmoid (one k per conv channel) becomes the sigmoid with the config's sigmoid_k.
_HEAD_OPERATOR_OF = {PLAIN_OPERATOR: "cosine", "learnable_sigmoid": "sigmoid"}


class TrainingModule(nn.Module):
    """``forward(images, labels) -> (loss, logits)`` for a model and (optionally) a loss module.

    ``loss_module=None``: ``logits = model(images)``, ``loss = cross_entropy(logits, labels)`` with
    ``label_smoothing``. Otherwise ``f = model.forward_features(images)``, ``loss =
    loss_module(f, labels)`` (training logits carry the margin) and ``logits =
    loss_module.logits(f)`` (margin-free, for accuracy).
    """

    def __init__(
        self, model: nn.Module, loss_module: ClassifierLoss | None = None, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_module: ClassifierLoss | None = loss_module
        self.label_smoothing = float(label_smoothing)

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.loss_module is None:
            logits = self.model(images).float()
            return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing), logits
        features = cast(ClassifierBackbone, self.model).forward_features(images).float()
        return self.loss_module(features, labels), self.loss_module.logits(features)


def model_kwargs(config: TrainConfig, num_classes: int, in_channels: int, image_size: Any) -> dict[str, Any]:
    """Keyword arguments of ``create_model`` for ``config`` and a dataset's shape.

    The one mapping from a configuration to a model: training, evaluation and checkpoint restore
    all build their model through :func:`build_model`.
    """
    kwargs: dict[str, Any] = {
        "num_classes": num_classes,
        "in_channels": in_channels,
        "image_size": image_size,
        "operator": config.operator,
        "width_mult": config.width_mult,
    }
    for key, default in _OPTIONAL_MODEL_ARGS.items():
        value = getattr(config, key)
        if value != default:
            kwargs[key] = value
    overlap = sorted(set(kwargs) & set(config.model_kwargs))
    if overlap:
        raise ConfigError(f"model_kwargs repeats {', '.join(overlap)}; set those as top-level config keys instead")
    kwargs.update(config.model_kwargs)
    return kwargs


def build_model(config: TrainConfig, num_classes: int, in_channels: int, image_size: Any) -> nn.Module:
    """``create_model`` for ``config``; a bad name or option becomes a ConfigError naming it."""
    try:
        return create_model(config.model, **model_kwargs(config, num_classes, in_channels, image_size))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"cannot build model={config.model!r}: {exc}") from None


def head_operator(config: TrainConfig) -> str:
    """The angular function g of the classifier head that the model of ``config`` implies."""
    return _HEAD_OPERATOR_OF.get(config.operator, config.operator)


def loss_kwargs(config: TrainConfig, total_iterations: int | None = None) -> dict[str, Any]:
    """The keyword arguments with which :func:`build_loss_module` builds ``config.loss`` (beside the
    model's ``num_features`` and the number of classes): ``loss_kwargs`` plus what the loss takes
    from the run (see there). Empty for plain softmax."""
    if config.loss == "softmax":
        return {}
    kwargs = dict(config.loss_kwargs)
    options = loss_options(config.loss)
    inherited = {
        "operator": head_operator(config),
        "sigmoid_k": config.sigmoid_k,
        "anneal_iterations": total_iterations,
    }
    for key, value in inherited.items():
        if key in options and key not in kwargs and value is not None:
            kwargs[key] = value
    if config.label_smoothing:
        if "label_smoothing" in kwargs:
            raise ConfigError("label_smoothing is set both as a key and in loss_kwargs; keep one")
        kwargs["label_smoothing"] = config.label_smoothing
    return kwargs


def build_loss_module(
    config: TrainConfig, model: nn.Module, num_classes: int, total_iterations: int | None = None
) -> ClassifierLoss | None:
    """The loss module for ``config.loss`` on ``model.num_features`` (None for plain softmax).

    A loss with an angular function takes the model's (:func:`head_operator`) and ``sigmoid_k``;
    a margin loss anneals over ``total_iterations`` (the run's length; ``None`` keeps the loss's
    default, 1,000 iterations). ``loss_kwargs`` overrides any of them.
    """
    if config.loss == "softmax":
        if config.loss_kwargs:
            raise ConfigError(
                f"loss_kwargs={config.loss_kwargs!r} has no effect with loss='softmax' "
                "(its classifier is the model's own); remove them or choose another loss"
            )
        return None
    try:
        num_features = require_backbone(model, config.model, f"loss={config.loss!r}").num_features
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    kwargs = loss_kwargs(config, total_iterations)
    try:
        return build_loss(config.loss, num_features, num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build loss={config.loss!r} with loss_kwargs={config.loss_kwargs!r}: {exc}") from None


@torch.no_grad()
def evaluate_batches(
    module: TrainingModule, batches, device: torch.device, amp: str = "none", channels_last: bool = False
) -> Tensor:
    """Sum of loss, correct predictions and count over ``batches``: a float64 tensor of 3 values.

    ``module`` is put in eval mode for the pass and restored afterwards.
    """
    was_training = module.training
    module.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    try:
        for images, labels in batches:
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                loss, logits = module(images, labels)
            count = labels.shape[0]
            totals[0] += loss.double() * count
            totals[1] += (logits.argmax(dim=1) == labels).sum()
            totals[2] += count
    finally:
        module.train(was_training)
    return totals
