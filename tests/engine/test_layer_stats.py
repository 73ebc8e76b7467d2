"""Per-layer statistics (engine/layer_stats.py): the numbers, and the recorder inside training."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_helpers import tiny_overrides  # noqa: E402

from sphereconv.data import DeviceLoader, load_dataset, subset  # noqa: E402
from sphereconv.engine import load_config, train  # noqa: E402
from sphereconv.engine.checkpoint import find_latest_checkpoint  # noqa: E402
from sphereconv.engine.layer_stats import (  # noqa: E402
    COS_BINS,
    LAYER_STATS_FILE,
    average_statistics,
    cosine_map,
    layer_statistics,
    measured_layers,
    read_layer_stats,
)
from sphereconv.engine.objective import TrainingModule  # noqa: E402
from sphereconv.errors import ConfigError  # noqa: E402
from sphereconv.models import create_model  # noqa: E402
from sphereconv.nn import SphereConv2d  # noqa: E402


@pytest.fixture(scope="module")
def real_batch():
    """32 real Fashion-MNIST training images, normalised as in training."""
    images, labels = load_dataset("fashion-mnist", "train")
    images, labels = subset(images, labels, 32, 0)
    loader = DeviceLoader(images, labels, 32, device=torch.device("cpu"), shuffle=False, augment="none")
    return next(iter(loader))


def tiny_model(operator: str, batch_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    return create_model(
        "spherenet9",
        num_classes=10,
        in_channels=1,
        image_size=28,
        operator=operator,
        width_mult=0.0625,
        batch_norm=batch_norm,
    )


def test_cosine_map_matches_explicit_patches_and_sphereconv():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, 5)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    cos = cosine_map(conv, x)
    # Explicit: unfold the padded patches and take the angle with each flattened filter.
    patches = nn.functional.unfold(x, 3, padding=1).transpose(1, 2)  # (N, H*W, 27)
    w = conv.weight.detach().flatten(1)  # (4, 27)
    eps = 1e-4
    expected = (patches @ w.T) / (
        (patches.square().sum(-1, keepdim=True) + eps).sqrt() * (w.square().sum(-1) + eps).sqrt()
    )
    assert cos.shape == (2, 4, 6, 5)
    # Equal up to where the small epsilon inside the norms enters (the layer's own convention).
    torch.testing.assert_close(cos.flatten(2).transpose(1, 2), expected, rtol=0, atol=1e-3)
    # A cosine SphereConv with the same weights outputs exactly this quantity.
    sphere = SphereConv2d(3, 4, 3, padding=1, operator="cosine")
    sphere.weight.data.copy_(conv.weight.data)
    torch.testing.assert_close(cosine_map(sphere, x), sphere(x).detach(), rtol=1e-4, atol=1e-5)
    # Scale invariance: the statistic does not see the magnitude of the input or the filters
    # (up to the epsilon inside the norms).
    conv.weight.data.mul_(7.0)
    torch.testing.assert_close(cosine_map(conv, 3.0 * x), cos, rtol=0, atol=1e-3)


@pytest.mark.parametrize("operator,batch_norm", [("cosine", True), ("none", False)])
def test_layer_statistics_on_real_batch(real_batch, operator, batch_norm):
    images, labels = real_batch
    model = tiny_model(operator, batch_norm)
    module = TrainingModule(model).train()
    buffers_before = [b.clone() for b in module.buffers()]
    stats = layer_statistics(module, images, labels)

    layers = stats["layers"]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(layers) == len(convs) == 10  # 9 conv layers + fc6
    assert [row["index"] for row in layers] == list(range(1, 11))
    assert {row["kind"] for row in layers} == {"plain" if operator == "none" else "sphere:cosine"}
    # Nothing changed: no .grad written, BatchNorm running statistics restored.
    assert all(p.grad is None for p in model.parameters())
    for before, after in zip(buffers_before, module.buffers()):
        torch.testing.assert_close(before, after)

    # Reference values computed directly: loss, first layer's weight gradient and cos map.
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for row, conv in zip(layers, convs):
        assert row["grad_norm"] == pytest.approx(conv.weight.grad.norm().item(), rel=1e-4)
        assert row["weight_norm"] == pytest.approx(conv.weight.norm().item(), rel=1e-6)
        assert row["grad_ratio"] == pytest.approx(row["grad_norm"] / row["weight_norm"], rel=1e-6)
        assert row["act_grad_norm"] > 0
        q = row["cos_quantiles"]
        assert all(-1.0 <= v <= 1.0 for v in q) and q == sorted(q)
        assert len(row["cos_hist"]) == COS_BINS
        assert -1.0 <= row["cos_mean"] <= 1.0 and row["cos_std"] > 0
        assert 0.0 <= row["dead_channels"] <= 1.0
    first = model.features.stage1[0]
    with torch.no_grad():
        cos = cosine_map(first.conv, images)
        block_out = first(images)
    assert sum(layers[0]["cos_hist"]) == cos.numel()
    assert layers[0]["cos_mean"] == pytest.approx(cos.mean().item(), rel=1e-4, abs=1e-6)
    # BN in training mode normalises with batch statistics, so the block output matches only in
    # training mode, which is what the statistics measure.
    assert layers[0]["act_mean"] == pytest.approx(block_out.mean().item(), rel=1e-4, abs=1e-6)
    assert layers[0]["act_batch_std"] == pytest.approx(block_out.std(dim=0).mean().item(), rel=1e-4)
    assert layers[0]["act_mean"] >= 0  # after the ReLU


def test_dead_channels_are_counted(real_batch):
    images, labels = real_batch
    model = tiny_model("cosine", False)
    # All-negative filters on a non-negative input: the ReLU kills every output of layer 2.
    model.features.stage1[1].conv.weight.data = -model.features.stage1[1].conv.weight.data.abs()
    stats = layer_statistics(TrainingModule(model).train(), images, labels)
    assert stats["layers"][1]["dead_channels"] == 1.0
    assert stats["layers"][1]["act_std"] == 0.0
    assert stats["layers"][0]["dead_channels"] < 1.0


def test_frozen_layer_has_no_weight_gradient(real_batch):
    images, labels = real_batch
    model = tiny_model("cosine", True)
    model.features.stage1[0].conv.weight.requires_grad_(False)
    layers = layer_statistics(TrainingModule(model).train(), images, labels)["layers"]
    assert layers[0]["grad_norm"] is None and layers[0]["grad_ratio"] is None
    assert layers[0]["act_grad_norm"] > 0 and all(row["grad_norm"] > 0 for row in layers[1:])


def test_average_statistics_sums_histograms_and_averages_numbers(real_batch):
    images, labels = real_batch
    module = TrainingModule(tiny_model("cosine", True)).train()
    one = layer_statistics(module, images[:16], labels[:16])
    two = layer_statistics(module, images[16:], labels[16:])
    merged = average_statistics([one, two])
    assert merged["batches"] == 2
    row = merged["layers"][3]
    assert row["cos_hist"] == [a + b for a, b in zip(one["layers"][3]["cos_hist"], two["layers"][3]["cos_hist"])]
    assert row["grad_norm"] == pytest.approx((one["layers"][3]["grad_norm"] + two["layers"][3]["grad_norm"]) / 2)
    assert row["name"] == one["layers"][3]["name"] and row["index"] == 4


def test_measured_layers_pair_convs_with_their_blocks():
    model = tiny_model("cosine", True)
    layers = measured_layers(model)
    assert layers[0].name == "features.stage1.0.conv" and layers[0].block is model.features.stage1[0]
    assert layers[-1].name == "fc6.conv" and layers[-1].block is model.fc6


def _final_weights(out: Path) -> dict:
    _, state = find_latest_checkpoint(out / "checkpoints")
    return state["model"]


def test_recorder_writes_records_without_changing_training(tmp_path):
    with_stats = tmp_path / "with"
    without = tmp_path / "without"
    common = dict(iterations=5, eval_every=5, checkpoint_every=5, batch_norm=True, seed=2)
    train(load_config(None, tiny_overrides(with_stats, layer_stats_every=2, **common)))
    train(load_config(None, tiny_overrides(without, **common)))

    records = read_layer_stats(with_stats / LAYER_STATS_FILE)
    assert [r["iteration"] for r in records] == [0, 2, 4]
    assert all(len(r["layers"]) == 10 and math.isfinite(r["loss"]) for r in records)
    # At iteration 0 the weights are the initial ones: the loss is near chance, ln 10.
    assert abs(records[0]["loss"] - math.log(10)) < 0.5
    assert not (without / LAYER_STATS_FILE).exists()
    # Measuring is read-only: the trained weights are identical with and without it.
    a, b = _final_weights(with_stats), _final_weights(without)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)

    # A fresh run over the same folder starts a new file instead of appending to the old one.
    train(load_config(None, tiny_overrides(with_stats, layer_stats_every=3, overwrite=True, **common)))
    assert [r["iteration"] for r in read_layer_stats(with_stats / LAYER_STATS_FILE)] == [0, 3]


def test_layer_stats_every_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="layer_stats_every"):
        load_config(None, tiny_overrides(tmp_path, layer_stats_every=-1))
