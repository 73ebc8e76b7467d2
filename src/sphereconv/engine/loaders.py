"""The data of a training run, and the run's length in optimizer steps.

Liu et al., "Deep Hyperspherical Learning" (NIPS 2017, Sec. 5) count training in iterations; a
config gives them directly (``iterations``) or as ``epochs`` over the training split. Both splits
stay on the device (:class:`~sphereconv.data.DeviceLoader`), sharded per data-parallel rank; the
training batch size is global and each rank reads ``batch_size / world_size`` images a step. A
resume may change the length within limits (:func:`check_resumed_length`), and a run too short for
BatchNorm's running statistics to settle is warned about (:func:`warn_if_batch_norm_lags`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..data import DeviceLoader, load_dataset, subset
from ..errors import ConfigError
from ..models import BN_MOMENTUM
from .config import TrainConfig
from .distributed import DistributedContext

logger = logging.getLogger(__name__)

# Training subsets are drawn (stratified) with a fixed seed so that runs with different training
# seeds see the same images and differ only in initialisation, order and augmentation.
SUBSET_SEED = 0
# Schedules whose shape is defined by the run's length: a resume cannot change that length.
LENGTH_DEFINED_SCHEDULES = ("cosine", "onecycle")
# A run should last several BatchNorm memories (1/momentum steps) for its running statistics to settle.
BN_SETTLE_MEMORIES = 5


@dataclass(frozen=True)
class RunData:
    """The loaders of one rank and the run's length."""

    train_loader: DeviceLoader
    test_loader: DeviceLoader
    steps_per_epoch: int
    total_steps: int


def load_split(config: TrainConfig, split: str, limit: int | None, show_progress: bool) -> tuple[Tensor, Tensor]:
    """``split`` of the config's dataset, cut to a stratified subset of ``limit`` images if given."""
    images, labels = load_dataset(
        config.dataset, split, config.data_dir, config.download, image_size=config.image_size, progress=show_progress
    )
    if limit is not None:
        if limit > labels.shape[0]:
            key = "train_subset" if split == "train" else "test_subset"
            raise ConfigError(f"{key}={limit} exceeds the {labels.shape[0]} {split} images of {config.dataset}")
        images, labels = subset(images, labels, limit, SUBSET_SEED)
    return images, labels


def build_run_data(config: TrainConfig, ctx: DistributedContext) -> RunData:
    """This rank's training and test loaders, and the run's length in steps."""
    # Rank 0 reads (and, if allowed, downloads) first; the others wait so that no two processes
    # download the same files at once.
    if ctx.enabled and not ctx.is_main:
        ctx.barrier()
    show_progress = config.progress and ctx.is_main
    train_images, train_labels = load_split(config, "train", config.train_subset, show_progress)
    test_images, test_labels = load_split(config, "test", config.test_subset, show_progress)
    if ctx.enabled and ctx.is_main:
        ctx.barrier()
    per_rank_batch_size = config.batch_size // ctx.world_size
    if train_labels.shape[0] < per_rank_batch_size * ctx.world_size:
        raise ConfigError(
            f"batch_size={config.batch_size} is larger than the {train_labels.shape[0]} training "
            f"images; lower batch_size or raise train_subset"
        )
    train_loader = DeviceLoader(
        train_images,
        train_labels,
        per_rank_batch_size,
        device=ctx.device,
        shuffle=True,
        augment=config.augment,
        drop_last=True,
        seed=config.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    if test_labels.shape[0] < ctx.world_size:
        raise ConfigError(f"the test set has {test_labels.shape[0]} images, fewer than the {ctx.world_size} processes")
    test_loader = DeviceLoader(
        test_images,
        test_labels,
        config.eval_batch_size,
        device=ctx.device,
        shuffle=False,
        augment="none",
        drop_last=False,
        seed=0,
        rank=ctx.rank,
        world_size=ctx.world_size,
        even_shards=False,
    )
    steps_per_epoch = len(train_loader)
    total_steps = config.iterations
    if total_steps is None:
        assert config.epochs is not None  # a validated config sets iterations or epochs
        total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    return RunData(train_loader, test_loader, steps_per_epoch, total_steps)


def check_resumed_length(config: TrainConfig, total_steps: int, state: Mapping[str, Any], source: str) -> None:
    """A resume may change the run's length, but not below the steps done, nor under a schedule it defines."""
    done, planned = int(state["step"]), state.get("total_steps")
    length = f"iterations={config.iterations}" if config.iterations is not None else f"epochs={config.epochs:g}"
    if total_steps < done:
        raise ConfigError(
            f"{length} gives {total_steps} steps, but {source} is already at step {done}; "
            "a resumed run cannot be shorter than the steps it has done"
        )
    if planned is not None and planned != total_steps and config.schedule in LENGTH_DEFINED_SCHEDULES:
        raise ConfigError(
            f"{length} gives {total_steps} steps, but schedule={config.schedule!r} spans the "
            f"run's {planned} steps and cannot be stretched on resume; keep the run's length"
        )


def warn_if_batch_norm_lags(model: nn.Module, total_steps: int) -> None:
    """Warn when BatchNorm's running statistics cannot settle within the run's ``total_steps``.

    An exponential running average with momentum m remembers about 1/m steps; the reference's
    m = 0.001 (decay 0.999) needs thousands of steps before test-time statistics follow the
    weights, and shorter runs then evaluate near chance although they train well.
    """
    momenta = [
        m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None
    ]
    if momenta and min(momenta) < BN_MOMENTUM and min(momenta) * total_steps < BN_SETTLE_MEMORIES:
        logger.warning(
            "BatchNorm momentum %g remembers ~%d steps but the run has %d: test accuracy will lag; "
            "for short runs use --bn-momentum %g (config key bn_momentum)",
            min(momenta),
            round(1 / min(momenta)),
            total_steps,
            BN_MOMENTUM,
        )
