"""Exporting a trained network for inference (behind ``sphereconv export``).

A checkpoint is rebuilt into its network (:func:`~sphereconv.engine.evaluation.restore_checkpoint`)
and wrapped as :class:`InferenceClassifier`: stored pixels in, class scores out, with the training
pipeline's input scaling inside (the reference code's ``(p - 127.5) / 128``, wy1iu/SphereNet) and,
for the angular losses, the loss head's margin-free logits (the ones accuracy is measured on). The
network is put in eval mode first, so BatchNorm uses its running statistics.

Formats, chosen by the output file's extension or ``format``:

- ``onnx``: ``torch.onnx.export(..., dynamo=True)`` (needs the ``onnx`` extra: onnx, onnxscript);
- ``pt2``: a :func:`torch.export.export` program saved with :func:`torch.export.save` (load it with
  :func:`torch.export.load`; ``.module()`` runs it);
- ``safetensors``: the inference network's weights (rebuild it with ``create_model`` and the
  metadata's ``model`` and ``model_kwargs``, a loss head with ``build_loss`` and its ``loss``,
  the network's ``num_features``, the number of classes and ``loss_kwargs``; the network's keys
  start with ``model.``, a loss head's with ``head.``).

The batch dimension stays dynamic in the graph formats. Every export is checked before the call
returns: the written file is loaded again and run on random pixels, and its scores must match the
network's (:data:`EXPORT_TOLERANCE`); the largest difference is reported. Each file carries the
same metadata (model, ``create_model`` arguments, operator, loss and its arguments, dataset, input
shape and dtype, class names, pixel scaling, source checkpoint and step) as ONNX metadata
properties, a ``sphereconv.json`` extra file in the ``.pt2`` archive, or safetensors metadata.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..data import DatasetInfo
from ..data.loader import PIXEL_CENTER, PIXEL_SCALE, normalize_pixels
from ..errors import CheckpointError, ConfigError
from ..losses.base import ClassifierLoss
from ..models.contract import ClassifierBackbone
from .atomic import atomic_write
from .checkpoint import export_weights, read_weights
from .evaluation import restore_checkpoint
from .objective import loss_kwargs, model_kwargs

EXPORT_FORMATS = ("onnx", "pt2", "safetensors")
_EXTENSIONS = {".onnx": "onnx", ".pt2": "pt2", ".safetensors": "safetensors"}
# Images the exported network is checked on (random pixels; two, so the batch dimension is not 1).
CHECK_BATCH = 2
# Largest |difference| of the exported scores from the network's (float32 scores of order 1-10; the
# graph formats reorder a few operations, which moves them by about 1e-6).
EXPORT_TOLERANCE = 1e-4
# Largest batch the graph formats declare (the dynamic dimension's upper bound).
MAX_EXPORT_BATCH = 65536
# Name of the metadata file inside a .pt2 archive.
PT2_METADATA_FILE = "sphereconv.json"


class InferenceClassifier(nn.Module):
    """``forward(images) -> scores``: uint8 pixels ``(N, C, H, W)`` to class scores ``(N, classes)``.

    The pixels are scaled as in training (:func:`~sphereconv.data.normalize_pixels`); with a loss
    ``head`` (the angular losses own the classifier weights), the scores are its margin-free
    ``logits`` of the network's features, else the network's own output.
    """

    def __init__(self, model: nn.Module, head: ClassifierLoss | None = None) -> None:
        super().__init__()
        self.model = model
        self.head: ClassifierLoss | None = head

    def forward(self, images: Tensor) -> Tensor:
        pixels = normalize_pixels(images)
        if self.head is None:
            return self.model(pixels)
        return self.head.logits(cast(ClassifierBackbone, self.model).forward_features(pixels))


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote and how well the file reproduces the network."""

    path: Path
    format: str
    metadata: dict[str, Any]
    max_difference: float


def export_format(path: str | os.PathLike, format: str | None = None) -> str:
    """The export format: ``format`` if given (checked), else the one of ``path``'s extension."""
    if format is not None:
        if format not in EXPORT_FORMATS:
            raise ConfigError(f"export format {format!r} is not one of: {', '.join(EXPORT_FORMATS)}")
        return format
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ConfigError(
            f"cannot tell the export format from the file name {os.fspath(path)!r}: use the extension "
            f"{', '.join(_EXTENSIONS)} or pass the format ({', '.join(EXPORT_FORMATS)})"
        )
    return _EXTENSIONS[suffix]


def _input_shape(info: DatasetInfo) -> tuple[int, int, int]:
    size = info.image_size
    height, width = (size, size) if isinstance(size, int) else size
    return info.in_channels, int(height), int(width)


def export_checkpoint(
    checkpoint_path: str | os.PathLike,
    out: str | os.PathLike,
    format: str | None = None,
    data_dir: str | os.PathLike | None = None,
) -> ExportResult:
    """Export the network of ``checkpoint_path`` for inference to ``out`` (see the module docstring).

    Raises :class:`ConfigError` for an unknown format, :class:`CheckpointError` for a bad checkpoint
    or an export whose scores do not match the network.
    """
    fmt = export_format(out, format)
    if fmt == "onnx":
        _require_onnx()
    restored = restore_checkpoint(checkpoint_path, data_dir)
    config, info = restored.config, restored.info
    network = InferenceClassifier(restored.module.model, restored.module.loss_module).eval()
    shape = _input_shape(info)
    metadata = {
        "format": "sphereconv inference classifier",
        "model": config.model,
        "model_kwargs": model_kwargs(config, info.num_classes, info.in_channels, info.image_size),
        "operator": config.operator,
        "loss": config.loss,
        "loss_kwargs": loss_kwargs(config, restored.state.get("total_steps")),
        "dataset": info.name,
        "input": f"uint8 pixels (batch, {shape[0]}, {shape[1]}, {shape[2]})",
        "input_scaling": f"(pixel - {PIXEL_CENTER}) / {PIXEL_SCALE}, inside the network",
        "output": f"class scores (batch, {info.num_classes})",
        "class_names": list(info.class_names),
        "checkpoint": os.fspath(checkpoint_path),
        "step": int(restored.state.get("step", 0)),
    }
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (CHECK_BATCH, *shape), dtype=torch.uint8, generator=generator)
    with torch.no_grad():
        expected = network(example)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        export_weights(network, path, {key: _text(value) for key, value in metadata.items()})
        got = _run_safetensors(path, network, example)
    elif fmt == "pt2":
        program = _export_program(network, example)
        extra = {PT2_METADATA_FILE: json.dumps(metadata, indent=1)}
        atomic_write(path, lambda handle: torch.export.save(program, handle, extra_files=extra))
        # Read through a handle: given a path, torch.export.load logs a warning for any name that
        # does not end in .pt2 (an explicit format may give the file another extension).
        with open(path, "rb") as handle:
            loaded = torch.export.load(handle)
        with torch.no_grad():
            got = loaded.module()(example)
    else:
        _write_onnx(network, example, path, metadata)
        got = _run_onnx(path, example)
    difference = float((got.float() - expected.float()).abs().max())
    if not difference <= EXPORT_TOLERANCE:
        path.unlink(missing_ok=True)  # no file that looks usable and is not
        raise CheckpointError(
            f"the exported {fmt} file {os.fspath(path)!r} does not reproduce the network: its scores differ by "
            f"up to {difference:.3g} (allowed {EXPORT_TOLERANCE:g}); the file was removed; please report this with the "
            "checkpoint"
        )
    return ExportResult(path, fmt, metadata, difference)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _batch_dimension() -> dict[str, dict[int, Any]]:
    return {"images": {0: torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)}}


def _export_program(network: nn.Module, example: Tensor) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(network, (example,), dynamic_shapes=_batch_dimension())


def _run_safetensors(path: Path, network: nn.Module, example: Tensor) -> Tensor:
    """The scores of a copy of ``network`` with the weights read back from ``path``."""
    import copy

    tensors, _ = read_weights(path)
    clone = copy.deepcopy(network)
    clone.load_state_dict(tensors)
    with torch.no_grad():
        return clone(example)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError(
            "ONNX export needs the packages onnx and onnxscript, which are not installed; install them with "
            "'pip install sphereconv[onnx]' (or export to .pt2 or .safetensors)"
        ) from None


def _write_onnx(network: nn.Module, example: Tensor, path: Path, metadata: Mapping[str, Any]) -> None:
    import onnx

    # The exporter logs a warning for every operator library it cannot find (torchvision's among
    # them); none of them is used here.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside the exporter itself
            program = torch.onnx.export(
                network, (example,), dynamo=True, dynamic_shapes=_batch_dimension(), verbose=False
            )
    finally:
        exporter_log.setLevel(level)
    if program is None:  # the dynamo exporter always returns a program; None is the legacy path's
        raise CheckpointError("torch.onnx.export returned no program; export to .pt2 or .safetensors instead")
    model = program.model_proto
    onnx.helper.set_model_props(model, {key: _text(value) for key, value in metadata.items()})
    data = model.SerializeToString()
    atomic_write(path, lambda handle: handle.write(data))


def _run_onnx(path: Path, example: Tensor) -> Tensor:
    """The scores of the ONNX file at ``path`` under ONNX's reference evaluator."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path))
    (scores,) = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: example.numpy()})
    return torch.from_numpy(scores)
