"""Exporting trained networks (``sphereconv export``): every format reloads and scores real
Fashion-MNIST test images as the checkpoint's network does, with its metadata and clear errors."""

from __future__ import annotations

import builtins
import importlib.util
import json
import logging
import zipfile

import pytest
import torch
from engine_helpers import tiny_overrides

from cli_helpers import run_cli
from sphereconv.data import load_dataset, normalize_pixels
from sphereconv.engine import export as export_module
from sphereconv.engine import load_config, train
from sphereconv.engine.checkpoint import checkpoint_dir, find_latest_checkpoint, read_weights
from sphereconv.engine.evaluation import restore_checkpoint
from sphereconv.errors import CheckpointError, ConfigError
from sphereconv.losses import build_loss
from sphereconv.models import create_model

HAS_ONNX = importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxscript") is not None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained runs: plain softmax (the network's own scores) and GA-Softmax (a loss head
    that owns the classifier and adds a margin in training)."""
    root = tmp_path_factory.mktemp("export_runs")
    made = {}
    for loss in ("softmax", "ga_softmax"):
        out = root / loss
        train(load_config(None, tiny_overrides(out, loss=loss, operator="sigmoid", iterations=6, eval_every=6)))
        made[loss] = find_latest_checkpoint(checkpoint_dir(out))[0]
    return made


@pytest.fixture(scope="module")
def test_images():
    images, labels = load_dataset("fashion-mnist", "test")
    return images[:5], labels[:5]


def expected_scores(checkpoint, images, labels):
    """Scores of the restored training module (margin-free logits), independent of the export wrapper."""
    module = restore_checkpoint(checkpoint).module.eval()
    with torch.no_grad():
        return module(normalize_pixels(images), labels)[1]


@pytest.mark.parametrize("loss", ["softmax", "ga_softmax"])
def test_pt2_program_scores_real_images_like_the_checkpoint(runs, test_images, tmp_path, loss):
    images, labels = test_images
    result = export_module.export_checkpoint(runs[loss], tmp_path / "net.pt2")
    assert result.format == "pt2" and result.max_difference <= export_module.EXPORT_TOLERANCE
    program = torch.export.load(tmp_path / "net.pt2")
    with torch.no_grad():
        got = program.module()(images)  # 5 images: not the batch of 2 it was traced with
    torch.testing.assert_close(got, expected_scores(runs[loss], images, labels), rtol=1e-4, atol=1e-4)
    with zipfile.ZipFile(tmp_path / "net.pt2") as archive:
        name = next(n for n in archive.namelist() if n.endswith(export_module.PT2_METADATA_FILE))
        metadata = json.loads(archive.read(name))
    assert metadata["loss"] == loss and metadata["input"] == "uint8 pixels (batch, 1, 28, 28)"
    assert metadata["class_names"][0] == "T-shirt/top" and metadata["output"] == "class scores (batch, 10)"


def test_safetensors_weights_rebuild_the_network(runs, test_images, tmp_path):
    images, labels = test_images
    result = export_module.export_checkpoint(runs["ga_softmax"], tmp_path / "weights.safetensors")
    tensors, metadata = read_weights(result.path)
    assert any(key.startswith("head.") for key in tensors) and any(key.startswith("model.") for key in tensors)
    assert metadata["model"] == "spherenet9" and json.loads(metadata["class_names"])[9] == "Ankle boot"
    restored = restore_checkpoint(runs["ga_softmax"])
    network = export_module.InferenceClassifier(restored.module.model, restored.module.loss_module).eval()
    network.load_state_dict(tensors)
    with torch.no_grad():
        got = network(images)
    torch.testing.assert_close(got, expected_scores(runs["ga_softmax"], images, labels), rtol=1e-5, atol=1e-5)


def test_safetensors_metadata_rebuilds_the_network_with_create_model(runs, test_images, tmp_path):
    """The metadata holds every argument of ``create_model``: the 1/16-width network is rebuilt from
    the file alone (no checkpoint, no configuration)."""
    images, labels = test_images
    result = export_module.export_checkpoint(runs["softmax"], tmp_path / "weights.safetensors")
    tensors, metadata = read_weights(result.path)
    kwargs = json.loads(metadata["model_kwargs"])
    assert kwargs["width_mult"] == 0.0625 and kwargs["num_classes"] == 10 and kwargs["in_channels"] == 1
    network = create_model(metadata["model"], **kwargs).eval()
    network.load_state_dict({key.removeprefix("model."): value for key, value in tensors.items()})
    with torch.no_grad():
        got = network(normalize_pixels(images))
    torch.testing.assert_close(got, expected_scores(runs["softmax"], images, labels), rtol=1e-5, atol=1e-5)


def test_safetensors_metadata_rebuilds_a_loss_head_with_build_loss(runs, test_images, tmp_path):
    """With an angular loss the head owns the classifier: the metadata's loss arguments rebuild it
    from the file alone (the sigmoid operator and k the run gave it)."""
    images, labels = test_images
    result = export_module.export_checkpoint(runs["ga_softmax"], tmp_path / "weights.safetensors")
    tensors, metadata = read_weights(result.path)
    model = create_model(metadata["model"], **json.loads(metadata["model_kwargs"])).eval()
    options = json.loads(metadata["loss_kwargs"])
    assert options["operator"] == "sigmoid" and options["anneal_iterations"] == 6
    head = build_loss(metadata["loss"], model.num_features, len(json.loads(metadata["class_names"])), **options)
    network = export_module.InferenceClassifier(model, head).eval()
    network.load_state_dict(tensors)
    with torch.no_grad():
        got = network(images)
    torch.testing.assert_close(got, expected_scores(runs["ga_softmax"], images, labels), rtol=1e-5, atol=1e-5)


def test_a_format_that_contradicts_the_extension_is_written_and_checked_quietly(runs, test_images, tmp_path):
    """``format`` wins over the extension; reading the .pt2 program back from a file named .onnx
    logs no torch warning ("Unable to load package ... must be a file ending in .pt2")."""
    images, labels = test_images
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("torch", "torch.export")]  # torch.export does not propagate
    for logger in loggers:
        logger.addHandler(handler)
    try:
        result = export_module.export_checkpoint(runs["softmax"], tmp_path / "net.onnx", format="pt2")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert result.format == "pt2" and zipfile.is_zipfile(result.path)
    assert not messages, messages
    with open(result.path, "rb") as handle, torch.no_grad():
        got = torch.export.load(handle).module()(images)
    torch.testing.assert_close(got, expected_scores(runs["softmax"], images, labels), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAS_ONNX, reason="ONNX export needs the optional 'onnx' extra (onnx, onnxscript)")
def test_onnx_file_runs_in_the_onnx_reference_evaluator(runs, test_images, tmp_path):
    import onnx
    from onnx.reference import ReferenceEvaluator

    images, labels = test_images
    result = export_module.export_checkpoint(runs["softmax"], tmp_path / "net.onnx")
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic batch dimension
    props = {p.key: p.value for p in model.metadata_props}
    assert props["operator"] == "sigmoid" and json.loads(props["class_names"])[1] == "Trouser"
    (got,) = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: images[:3].numpy()})
    expected = expected_scores(runs["softmax"], images[:3], labels[:3])
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4)


def test_bad_requests_get_clear_errors(runs, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"net\.bin'.*\.onnx, \.pt2, \.safetensors"):
        export_module.export_checkpoint(runs["softmax"], tmp_path / "net.bin")
    with pytest.raises(ConfigError, match="'tflite' is not one of: onnx, pt2, safetensors"):
        export_module.export_checkpoint(runs["softmax"], tmp_path / "net.onnx", format="tflite")
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name in ("onnx", "onnxscript"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "__import__", no_onnx)
        with pytest.raises(ConfigError, match=r"pip install sphereconv\[onnx\]"):
            export_module.export_checkpoint(runs["softmax"], tmp_path / "net.onnx")
    # An export that does not reproduce the network is refused, not written silently.
    monkeypatch.setattr(export_module, "EXPORT_TOLERANCE", -1.0)
    with pytest.raises(CheckpointError, match="does not reproduce the network"):
        export_module.export_checkpoint(runs["softmax"], tmp_path / "net.safetensors")
    assert not (tmp_path / "net.safetensors").exists()


def test_export_command(runs, tmp_path):
    run_dir = runs["softmax"].parent.parent
    code, out, err = run_cli("export", str(run_dir), "--out", str(tmp_path / "net.safetensors"))
    assert code == 0, err
    assert f"to {tmp_path / 'net.safetensors'} (safetensors)" in out and "input: uint8 pixels (batch, 1, 28, 28)" in out
    code, out, err = run_cli("export", str(run_dir), "--out", str(tmp_path / "net.bin"))
    assert code == 2 and "cannot tell the export format" in err and not (tmp_path / "net.bin").exists()
    code, _, err = run_cli("export", str(tmp_path / "missing"), "--out", str(tmp_path / "net.pt2"))
    assert code == 2 and "does not exist" in err
