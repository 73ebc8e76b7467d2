"""Evaluating a saved checkpoint on a dataset split (behind ``sphereconv eval``).

The test accuracy is the metric the paper reports (Liu et al., "Deep Hyperspherical Learning",
NIPS 2017, Sec. 5). The network, its loss head and the dataset are rebuilt from the configuration
stored in the checkpoint; the checkpoint is loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..data import DatasetInfo, DeviceLoader, dataset_info, load_dataset, subset
from ..errors import CheckpointError, ConfigError
from .checkpoint import check_dataset_compatible, load_checkpoint, load_model_state
from .config import TrainConfig, config_from_dict, resolve_device_name
from .loaders import SUBSET_SEED
from .objective import TrainingModule, build_loss_module, build_model, evaluate_batches

SPLITS = ("train", "test")


@dataclass
class RestoredCheckpoint:
    """A checkpoint rebuilt into its network: the run's config, the raw state, the module (CPU) and
    the dataset's shape and class names it was built for."""

    config: TrainConfig
    state: dict[str, Any]
    module: TrainingModule
    info: DatasetInfo


def restore_checkpoint(
    checkpoint_path: str | os.PathLike, data_dir: str | os.PathLike | None = None
) -> RestoredCheckpoint:
    """Load ``checkpoint_path`` with the engine's integrity checks and rebuild model and loss head.

    The network is built from the configuration stored in the checkpoint (``data_dir`` overrides
    where its dataset lives; the dataset's shape decides the model's input size). Raises
    CheckpointError for a bad checkpoint and DatasetError for missing data.
    """
    state = load_checkpoint(checkpoint_path)
    source = f"checkpoint {os.fspath(checkpoint_path)!r}"
    # The run's device and precision need not exist here: the caller chooses its own.
    try:
        config = config_from_dict(state["config"], check_environment=False)
    except ConfigError as exc:
        raise CheckpointError(f"{source} holds a configuration this version cannot use: {exc}") from None
    if data_dir is not None:
        config.data_dir = os.fspath(data_dir)
    info = dataset_info(config.dataset, config.data_dir, image_size=config.image_size)
    check_dataset_compatible(state.get("dataset_info"), info, source)
    model = build_model(config, info.num_classes, info.in_channels, info.image_size)
    loss_module = build_loss_module(config, model, info.num_classes)
    load_model_state(model, state["model"], source)
    if loss_module is not None:
        load_model_state(loss_module, state.get("loss") or {}, source + " (loss module)")
    module = TrainingModule(model, loss_module, config.label_smoothing if loss_module is None else 0.0)
    return RestoredCheckpoint(config, state, module, info)


def evaluate(
    checkpoint_path: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    device: str = "auto",
    *,
    batch_size: int | None = None,
    split: str = "test",
    subset_size: int | None = None,
    amp: str = "none",
    download: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy and mean loss of the checkpoint's model on ``split`` of its dataset.

    ``data_dir`` overrides the dataset location stored in the checkpoint; ``batch_size`` defaults
    to the run's ``eval_batch_size``; ``subset_size`` evaluates on a stratified subset.
    Returns ``{accuracy, loss, images, split, step, model, operator, loss_name, dataset, checkpoint}``.
    Raises CheckpointError for a bad checkpoint and DatasetError for missing data.
    """
    if split not in SPLITS:
        raise ConfigError(f"invalid split={split!r}: expected one of {', '.join(SPLITS)}")
    if amp not in ("none", "bf16"):
        raise ConfigError(f"invalid amp={amp!r} for evaluation: expected none or bf16")
    restored = restore_checkpoint(checkpoint_path, data_dir)
    config, state, module = restored.config, restored.state, restored.module
    eval_batch = config.eval_batch_size if batch_size is None else batch_size
    if isinstance(eval_batch, bool) or not isinstance(eval_batch, int) or eval_batch < 1:
        raise ConfigError(f"invalid batch_size={batch_size!r}: expected a positive integer")
    torch_device = torch.device(resolve_device_name(device))
    module.to(torch_device)

    images, labels = load_dataset(
        config.dataset, split, config.data_dir, download, image_size=config.image_size, progress=progress
    )
    if subset_size is not None:
        if isinstance(subset_size, bool) or not isinstance(subset_size, int) or not 1 <= subset_size <= labels.shape[0]:
            raise ConfigError(f"invalid subset_size={subset_size!r}: expected an integer in [1, {labels.shape[0]}]")
        images, labels = subset(images, labels, subset_size, SUBSET_SEED)
    loader = DeviceLoader(images, labels, eval_batch, device=torch_device, shuffle=False, augment="none")
    loss_sum, correct, count = evaluate_batches(module, loader, torch_device, amp).tolist()
    return {
        "accuracy": correct / count,
        "loss": loss_sum / count,
        "images": int(count),
        "split": split,
        "step": int(state["step"]),
        "model": config.model,
        "operator": config.operator,
        "loss_name": config.loss,
        "dataset": config.dataset,
        "checkpoint": os.fspath(checkpoint_path),
    }
