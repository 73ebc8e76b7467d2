"""Optimizer parameter groups, optimizers and learning-rate schedules of the training recipe.

Liu et al., "Deep Hyperspherical Learning" (NIPS 2017), Sec. 5 and the reference code
(wy1iu/SphereNet): SphereConv filters get no weight decay (their output ignores the filter norm,
so decay would only shrink it and raise the effective learning rate), while BatchNorm parameters,
the classifier and every filter of a plain CNN get weight decay 5e-4. Adam there adds the decay to
the gradient (L2 regularisation), which is ``torch.optim.Adam(weight_decay=...)``; ``adamw`` is the
decoupled variant. The step schedule divides the learning rate by 10 at 34k and 54k of 64k
iterations; milestones are stored as fractions of the run.

Three groups (:func:`parameter_groups`):

- ``sphere`` (``sphere_weight_decay``, reference 0): the filters of every hyperspherical layer:
  SphereConv, SphereNorm and SphereLinear (the same operator on whole vectors), and the decoupled
  convolutions, whose filters the Decoupled Networks code (wy1iu/DCNets, ``dcnet_cifar100/*/
  architecture.py``: ``reg=False`` for every decoupled layer) leaves undecayed as well. These are
  also the filters the orthogonality penalty acts on (:mod:`sphereconv.losses.regularizers`).
- ``no_decay`` (always 0): scalars whose parametrisation keeps them in a range, where decay would
  only bias them: the learnable sigmoid's raw k (k = |raw| + 0.05), SphereNorm's magnitude mix
  logit (s = sigmoid(logit); decay pulls s towards 0.5) and the decoupled layers' learnable
  alpha, beta and radius (created without a regulariser in the DCNets code).
- ``default`` (``weight_decay``): everything else: BatchNorm and SphereNorm gamma/beta, biases,
  classifier and loss weights, plain convolutions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..losses.regularizers import PENALISED_TYPES
from ..nn import DecoupledConv2d
from .config import OPTIMIZERS, SCHEDULES, TrainConfig

# Layers whose filters form the "sphere" group: the hyperspherical and decoupled layers.
SPHERE_FILTER_TYPES = PENALISED_TYPES
# Range-parametrised scalars of those layers (see the module docstring): never decayed.
NO_DECAY_PARAMETER_NAMES = ("sigmoid_k_raw", "magnitude_logit", "radius")
# The decoupled layers' learnable magnitude coefficients (DCNets: no regulariser).
DECOUPLED_NO_DECAY_NAMES = ("alpha", "beta")


def _group_of(layer: nn.Module, name: str) -> str:
    """Group name of the parameter ``name`` owned directly by ``layer``."""
    if isinstance(layer, SPHERE_FILTER_TYPES):
        if name == "weight":
            return "sphere"
        if name in NO_DECAY_PARAMETER_NAMES:
            return "no_decay"
        if isinstance(layer, DecoupledConv2d) and name in DECOUPLED_NO_DECAY_NAMES:
            return "no_decay"
    return "default"


def parameter_groups(modules: Iterable[nn.Module], weight_decay: float, sphere_weight_decay: float) -> list[dict]:
    """Split the trainable parameters of ``modules`` into the recipe's weight-decay groups.

    ``sphere`` (decay ``sphere_weight_decay``): filters of hyperspherical and decoupled layers;
    ``no_decay`` (decay 0): their range-parametrised scalars (learnable k, SphereNorm's magnitude
    mix, decoupled alpha/beta/radius); ``default`` (decay ``weight_decay``): everything else. See the
    module docstring for the reasons. A parameter shared by several modules is listed once (in
    the group of its first owner). Empty groups are dropped.
    """
    members: dict[str, dict[int, nn.Parameter]] = {"sphere": {}, "no_decay": {}, "default": {}}
    seen: set[int] = set()
    for module in modules:
        for layer in module.modules():
            for name, param in layer.named_parameters(recurse=False):
                if param.requires_grad and id(param) not in seen:
                    seen.add(id(param))
                    members[_group_of(layer, name)][id(param)] = param
    decay = {"sphere": sphere_weight_decay, "no_decay": 0.0, "default": weight_decay}
    groups = [
        {"name": name, "params": list(params.values()), "weight_decay": decay[name]} for name, params in members.items()
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(config: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` (L2 decay), ``AdamW`` (decoupled decay) or ``SGD`` (momentum) over ``groups``."""
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")


def milestone_steps(fractions: Iterable[float], total_steps: int) -> list[int]:
    """Milestone fractions of the run as step numbers (rounded, at least 1, strictly increasing).

    A fraction that rounds to the step of the one before it (in a short run) moves to the next
    step, so that each milestone still applies ``lr_gamma`` once instead of being dropped.
    """
    steps: list[int] = []
    for fraction in fractions:
        step = max(1, round(fraction * total_steps))
        steps.append(step if not steps or step > steps[-1] else steps[-1] + 1)
    return steps


def build_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-step learning-rate schedule of ``config.schedule`` over ``total_steps`` steps.

    ``step``: ``MultiStepLR`` at ``lr_milestones * total_steps`` with factor ``lr_gamma``;
    ``cosine``: ``CosineAnnealingLR`` from lr to 0; ``onecycle``: ``OneCycleLR`` peaking at lr;
    ``constant``: lr throughout.
    """
    schedulers = torch.optim.lr_scheduler
    if config.schedule == "step":
        return schedulers.MultiStepLR(
            optimizer, milestone_steps(config.lr_milestones, total_steps), gamma=config.lr_gamma
        )
    if config.schedule == "cosine":
        return schedulers.CosineAnnealingLR(optimizer, T_max=total_steps)
    if config.schedule == "onecycle":
        return schedulers.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps)
    if config.schedule == "constant":
        return schedulers.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ValueError(f"unknown schedule {config.schedule!r}; allowed: {', '.join(SCHEDULES)}")
