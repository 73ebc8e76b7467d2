"""Per-layer statistics of a network: angles, activations and gradients against depth.

The quantities behind the depth study of Liu et al., "Deep Hyperspherical Learning" (NIPS 2017,
Sec. 5.2, plain networks of 9 to 69 layers with and without BatchNorm): for every convolution,

- the distribution of ``cos(theta) = <w, x> / (|w| |x|)`` between each filter ``w`` and each input
  patch ``x`` (Sec. 2.1). A SphereConv computes exactly this; for a plain ``nn.Conv2d`` the same
  normalised quantity is computed from the layer's input and weights, so both can be compared;
- the mean and spread of the block's output (after BatchNorm and ReLU when the convolution sits in
  a :class:`~sphereconv.models.layers.ConvUnit`, else the convolution's own output), including the
  spread across the images of the batch (near 0: every image gives the same features);
- the norm of the loss gradient with respect to the layer's weights and to the block's output.

:func:`layer_statistics` measures one batch (forward and backward, restoring BatchNorm buffers and
leaving ``.grad`` untouched); :class:`LayerStatsRecorder` is the trainer callback that writes one
such record every N steps into ``OUT/layer_stats.jsonl`` (``layer_stats_every`` in the config);
:func:`inspect_checkpoint` measures a saved checkpoint on real training batches.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InvalidArgumentError
from ..models import MIN_BATCH_NORM_BATCH
from ..nn.angular import DEFAULT_EPS
from ..nn.functional import sphere_cosine
from .objective import TrainingModule
from .trainer import Callback, Trainer

# File written by the recorder into the run directory, one JSON record per measured step.
LAYER_STATS_FILE = "layer_stats.jsonl"
# The recorder stops after this many records, so that a long run's file stays small (~1-5 MB for a
# 36-layer network) while ``layer_stats_every`` chooses how far into the run it looks.
MAX_LAYER_STATS_RECORDS = 100
# Histogram of cos(theta): equal bins over [-1, 1].
COS_BINS = 50
COS_RANGE = (-1.0, 1.0)
# Quantiles of cos(theta) stored per layer.
COS_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
# torch.quantile refuses inputs above 2**24 elements; larger cos maps are subsampled evenly.
QUANTILE_MAX_ELEMENTS = 1 << 24


class MeasuredLayer:
    """A convolution of the network, the block whose output is measured, and its position."""

    def __init__(self, index: int, name: str, conv: nn.Conv2d, block: nn.Module) -> None:
        self.index = index
        self.name = name
        self.conv = conv
        self.block = block
        self.kind = f"sphere:{conv.operator}" if hasattr(conv, "operator") else "plain"


def measured_layers(model: nn.Module) -> list[MeasuredLayer]:
    """Every 2-d convolution of ``model`` (plain or SphereConv) in definition order, depth 1, 2, ..."""
    from ..models.layers import ConvUnit

    modules = dict(model.named_modules())
    layers: list[MeasuredLayer] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = modules.get(parent_name)
        block = parent if isinstance(parent, ConvUnit) and child == "conv" else module
        layers.append(MeasuredLayer(len(layers) + 1, name, module, block))
    return layers


def cosine_map(conv: nn.Conv2d, inputs: Tensor) -> Tensor:
    """``cos(theta)`` between each filter of ``conv`` and each patch of ``inputs``, in [-1, 1].

    Uses the layer's own epsilon for a SphereConv and the library default (the reference's 1e-4)
    for a plain convolution; non-zero padding modes are applied first, as the layer does.
    """
    padding: str | tuple[int, ...] | int = conv.padding
    if conv.padding_mode != "zeros":
        inputs = nn.functional.pad(inputs, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    cos, _, _ = sphere_cosine(
        inputs.detach(),
        conv.weight.detach(),
        conv.stride,
        padding,
        conv.dilation,
        conv.groups,
        eps=getattr(conv, "eps", DEFAULT_EPS),
    )
    return cos.float().clamp(-1.0, 1.0)


def _cos_summary(cos: Tensor) -> dict[str, Any]:
    flat = cos.flatten()
    sample = flat if flat.numel() <= QUANTILE_MAX_ELEMENTS else flat[:: math.ceil(flat.numel() / QUANTILE_MAX_ELEMENTS)]
    quantiles = torch.quantile(sample, torch.tensor(COS_QUANTILES, dtype=sample.dtype, device=sample.device))
    return {
        "cos_hist": torch.histc(flat, COS_BINS, *COS_RANGE).long().tolist(),
        "cos_quantiles": quantiles.tolist(),
        "cos_mean": flat.mean().item(),
        "cos_std": flat.std().item() if flat.numel() > 1 else 0.0,
        "cos_abs_mean": flat.abs().mean().item(),
    }


def _activation_summary(output: Tensor) -> dict[str, Any]:
    out = output.detach().float()
    per_channel_max = out.abs().transpose(0, 1).flatten(1).amax(dim=1)
    return {
        "act_mean": out.mean().item(),
        "act_std": out.std().item() if out.numel() > 1 else 0.0,
        # Spread across the batch of each unit (channel, position), averaged: 0 when every image
        # gives the same features, whatever they are.
        "act_batch_std": out.std(dim=0).mean().item() if out.shape[0] > 1 else 0.0,
        "dead_channels": (per_channel_max == 0).float().mean().item(),
    }


def _norm(tensor: Tensor | None) -> float | None:
    return None if tensor is None else tensor.detach().float().norm().item()


def layer_statistics(training_module: TrainingModule, images: Tensor, labels: Tensor) -> dict[str, Any]:
    """Statistics of every convolution of ``training_module.model`` on one batch.

    ``training_module`` is a :class:`~sphereconv.engine.objective.TrainingModule`
    (``forward(images, labels) -> (loss, logits)``). It runs in its current mode (training mode
    measures what a training step sees: BatchNorm batch statistics); BatchNorm buffers are restored
    afterwards and no parameter's ``.grad`` changes. The weight gradient is that of the loss alone
    (no weight decay or orthogonality penalty). Returns ``{loss, accuracy, batch_size, layers}``,
    ``layers`` one dict per convolution with the keys ``index, name, kind, fan_in, cos_*, act_*,
    dead_channels, weight_norm, grad_norm, grad_ratio, act_grad_norm``.
    """
    layers = measured_layers(training_module.model)
    if not layers:
        raise ValueError(f"{type(training_module.model).__name__} has no 2-d convolution to measure")
    rows: list[dict[str, Any]] = [
        {"index": m.index, "name": m.name, "kind": m.kind, "fan_in": m.conv.weight[0].numel()} for m in layers
    ]
    outputs: list[Tensor | None] = [None] * len(layers)
    handles = []

    def conv_hook(position: int):
        def hook(module, args, output):
            with torch.no_grad():
                rows[position].update(_cos_summary(cosine_map(module, args[0])))

        return hook

    def block_hook(position: int):
        def hook(module, args, output):
            rows[position].update(_activation_summary(output))
            outputs[position] = output

        return hook

    buffers = list(training_module.buffers())
    backup = [b.detach().clone() for b in buffers]
    try:
        for position, layer in enumerate(layers):
            handles.append(layer.conv.register_forward_hook(conv_hook(position)))
            handles.append(layer.block.register_forward_hook(block_hook(position)))
        with torch.enable_grad():
            loss, logits = training_module(images, labels)
            # Gradients of every trainable filter and every block output the loss depends on.
            targets = {("w", i): layer.conv.weight for i, layer in enumerate(layers) if layer.conv.weight.requires_grad}
            targets.update({("out", i): out for i, out in enumerate(outputs) if out is not None and out.requires_grad})
            found = torch.autograd.grad(loss, list(targets.values()), allow_unused=True) if targets else ()
            grads = dict(zip(targets, found))
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for buffer, saved in zip(buffers, backup):
                buffer.copy_(saved)
    for position, layer in enumerate(layers):
        row = rows[position]
        weight_norm = _norm(layer.conv.weight)
        row["weight_norm"] = weight_norm
        row["grad_norm"] = _norm(grads.get(("w", position)))
        row["grad_ratio"] = None if row["grad_norm"] is None or not weight_norm else row["grad_norm"] / weight_norm
        act_grad = grads.get(("out", position))
        # Per image: the norm of dLoss/d(output) of one image, averaged over the batch (x batch
        # size, since the loss is a batch mean, so that it does not depend on the batch size).
        row["act_grad_norm"] = (
            None
            if act_grad is None
            else act_grad.detach().float().flatten(1).norm(dim=1).mean().item() * act_grad.shape[0]
        )
    accuracy = (logits.detach().argmax(dim=1) == labels).float().mean().item()
    return {
        "loss": loss.detach().float().item(),
        "accuracy": accuracy,
        "batch_size": int(labels.shape[0]),
        "layers": rows,
    }


def average_statistics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Combine per-batch records of the same network: histograms summed, every other number averaged."""
    if not records:
        raise ValueError("no records to average")
    first = records[0]

    def mean(values: list) -> Any:
        present = [v for v in values if v is not None]
        if not present:
            return None
        if isinstance(present[0], list):
            return [sum(column) / len(present) for column in zip(*present)]
        return sum(present) / len(present)

    layers = []
    for position, row in enumerate(first["layers"]):
        merged: dict[str, Any] = {}
        for key, value in row.items():
            column = [record["layers"][position].get(key) for record in records]
            if key == "cos_hist":
                merged[key] = [sum(counts) for counts in zip(*column)]
            elif key in ("index", "fan_in") or isinstance(value, (bool, str)):
                merged[key] = value
            else:
                merged[key] = mean(column)
        layers.append(merged)
    return {
        "loss": mean([r["loss"] for r in records]),
        "accuracy": mean([r["accuracy"] for r in records]),
        "batch_size": first["batch_size"],
        "batches": len(records),
        "layers": layers,
    }


# ------------------------------------------------------------------------------------------------
# During training


class LayerStatsRecorder(Callback):
    """Trainer callback: every ``every`` steps (first at iteration 0, the initial weights), measure
    the step's own batch with :func:`layer_statistics` and append the record, tagged with
    ``iteration`` (optimizer updates applied so far), to ``OUT/layer_stats.jsonl``.

    Stops after :data:`MAX_LAYER_STATS_RECORDS` records. Only the main process records. A fresh run
    starts a new file; a resumed run keeps the records of the iterations before its checkpoint.
    """

    def __init__(self, every: int) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"layer_stats_every must be a positive integer; got {every!r}")
        self.every = every
        self.trainer: Trainer | None = None
        self.path: Path | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        self.trainer = trainer
        assert trainer.ctx is not None, "the trainer sets up its processes before its callbacks start"
        if not trainer.ctx.is_main:
            return
        self.path = Path(trainer.config.out) / LAYER_STATS_FILE
        kept = [r for r in read_layer_stats(self.path) if r["iteration"] < trainer.step] if trainer.step else []
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in kept)

    def on_batch(self, step: int, images: Tensor, labels: Tensor) -> None:
        iteration = step - 1
        if self.path is None or iteration % self.every or iteration // self.every >= MAX_LAYER_STATS_RECORDS:
            return None
        assert self.trainer is not None and self.trainer.module is not None, "set by on_train_start"
        record = {"iteration": iteration, **layer_statistics(self.trainer.module, images, labels)}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        return None


def read_layer_stats(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``layer_stats.jsonl`` file (``[]`` if there is none); a torn last line is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# ------------------------------------------------------------------------------------------------
# From a checkpoint


def _training_batches(config, batches: int, batch_size: int, device: torch.device) -> Iterable[tuple[Tensor, Tensor]]:
    from ..data import DeviceLoader, load_dataset, subset
    from .loaders import SUBSET_SEED

    images, labels = load_dataset(
        config.dataset, "train", config.data_dir, False, image_size=config.image_size, progress=False
    )
    if config.train_subset is not None and config.train_subset < labels.shape[0]:
        images, labels = subset(images, labels, config.train_subset, SUBSET_SEED)
    batch_size = min(batch_size, labels.shape[0])
    loader = DeviceLoader(
        images, labels, batch_size, device=device, shuffle=True, augment="none", drop_last=True, seed=config.seed
    )
    stream = loader.batches_forever()
    return [next(stream) for _ in range(batches)]


def inspect_checkpoint(
    checkpoint_path: str | os.PathLike,
    *,
    batches: int = 4,
    batch_size: int | None = None,
    data_dir: str | os.PathLike | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Per-layer statistics of a saved checkpoint on ``batches`` real training batches.

    The network is rebuilt from the configuration stored in the checkpoint and loaded with the
    engine's checks (:func:`~sphereconv.engine.checkpoint.load_checkpoint`); each batch runs forward
    and backward in training mode (as a training step would see it) without changing the weights.
    Returns :func:`average_statistics` of the batches plus ``checkpoint, step, model, num_classes,
    operator, batch_norm, width_mult, dataset, layer_stats_every``. A ``batch_size`` below 2 is
    refused (InvalidArgumentError) for a network with BatchNorm, as for training.
    """
    from .config import resolve_device_name
    from .evaluation import restore_checkpoint

    for name, value in (("batches", batches), ("batch_size", batch_size if batch_size is not None else 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    restored = restore_checkpoint(checkpoint_path, data_dir)
    config, state = restored.config, restored.state
    if batch_size is not None and batch_size < MIN_BATCH_NORM_BATCH and config.batch_norm:
        raise InvalidArgumentError(
            f"batch_size={batch_size} is too small for the BatchNorm layers of this network "
            f"(needs >= {MIN_BATCH_NORM_BATCH})"
        )
    torch_device = torch.device(resolve_device_name(device))
    module = restored.module.to(torch_device)
    module.train()
    records = [
        layer_statistics(module, images, labels)
        for images, labels in _training_batches(config, batches, batch_size or config.batch_size, torch_device)
    ]
    summary = average_statistics(records)
    return {
        "checkpoint": os.fspath(checkpoint_path),
        "step": int(state["step"]),
        "model": config.model,
        "num_classes": restored.info.num_classes,
        "operator": config.operator,
        "batch_norm": config.batch_norm,
        "width_mult": config.width_mult,
        "dataset": config.dataset,
        "layer_stats_every": config.layer_stats_every,
        **summary,
    }
