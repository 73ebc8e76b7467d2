"""Optimizer parameter groups, optimizers and learning-rate schedules of the training recipe.

Liu et al., "Deep Hyperspherical Learning" (NIPS 2017), Sec. 5 and the reference code
(wy1iu/SphereNet): SphereConv filters get no weight decay (their output ignores the filter norm,
so decay would only shrink it and raise the effective learning rate), while BatchNorm parameters,
the classifier and every filter of a plain CNN get weight decay 5e-4. Adam there adds the decay to
the gradient (L2 regularisation), which is ``torch.optim.Adam(weight_decay=...)``; ``adamw`` is the
decoupled variant. The step schedule divides the learning rate by 10 at 34k and 54k of 64k
iterations; milestones are stored as fractions of the run.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..nn import SPHERE_CONV_TYPES, SphereLinear
from .config import TrainConfig

# Layers whose output is invariant to the scale of their weight: SphereConv (paper Sec. 2.1) and
# the hyperspherical fully connected layer built on the same operator.
SCALE_INVARIANT_TYPES = (*SPHERE_CONV_TYPES, SphereLinear)
# Names of the parameters of those layers that belong to the "sphere" group: the filters and the
# learnable sigmoid steepness (a shape parameter that weight decay would bias towards its floor).
SPHERE_PARAMETER_NAMES = ("weight", "sigmoid_k_raw")


def parameter_groups(modules: Iterable[nn.Module], weight_decay: float,
                     sphere_weight_decay: float) -> list[dict]:
    """Split the trainable parameters of ``modules`` into the recipe's two weight-decay groups.

    Group ``sphere`` (decay ``sphere_weight_decay``): the filters (and learnable k) of every
    SphereConv / SphereLinear layer. Group ``default`` (decay ``weight_decay``): everything else
    (BatchNorm, classifier and loss weights, plain convolutions, biases). A parameter shared by
    several modules is listed once. Empty groups are dropped.
    """
    sphere: dict[int, nn.Parameter] = {}
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, SCALE_INVARIANT_TYPES):
                for name in SPHERE_PARAMETER_NAMES:
                    param = getattr(layer, name, None)
                    if isinstance(param, nn.Parameter) and param.requires_grad:
                        sphere[id(param)] = param
    default: dict[int, nn.Parameter] = {}
    for module in modules:
        for param in module.parameters():
            if param.requires_grad and id(param) not in sphere:
                default[id(param)] = param
    groups = [
        {"name": "sphere", "params": list(sphere.values()), "weight_decay": sphere_weight_decay},
        {"name": "default", "params": list(default.values()), "weight_decay": weight_decay},
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
    raise ValueError(f"unknown optimizer {config.optimizer!r}; allowed: adam, adamw, sgd")


def milestone_steps(fractions: Iterable[float], total_steps: int) -> list[int]:
    """Milestone fractions of the run as step numbers (rounded, at least 1, strictly increasing)."""
    steps: list[int] = []
    for fraction in fractions:
        step = max(1, round(fraction * total_steps))
        if not steps or step > steps[-1]:
            steps.append(step)
    return steps


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-step learning-rate schedule of ``config.schedule`` over ``total_steps`` steps.

    ``step``: ``MultiStepLR`` at ``lr_milestones * total_steps`` with factor ``lr_gamma``;
    ``cosine``: ``CosineAnnealingLR`` from lr to 0; ``onecycle``: ``OneCycleLR`` peaking at lr;
    ``constant``: lr throughout.
    """
    schedulers = torch.optim.lr_scheduler
    if config.schedule == "step":
        return schedulers.MultiStepLR(optimizer, milestone_steps(config.lr_milestones, total_steps), gamma=config.lr_gamma)
    if config.schedule == "cosine":
        return schedulers.CosineAnnealingLR(optimizer, T_max=total_steps)
    if config.schedule == "onecycle":
        return schedulers.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps)
    if config.schedule == "constant":
        return schedulers.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ValueError(f"unknown schedule {config.schedule!r}; allowed: step, cosine, onecycle, constant")
