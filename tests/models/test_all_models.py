"""Every registered model trains on CPU: forward and backward with finite values and right shapes."""

from __future__ import annotations

import pytest
import torch

from sphereconv.models import create_model, list_models


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize(
    "in_channels, image_size, operator, batch_norm",
    [(3, 32, "cosine", True), (1, 28, "none", True), (1, 28, "lr_sigmoid", True), (3, 32, "linear", False)],
)
def test_forward_backward_is_finite(name, in_channels, image_size, operator, batch_norm):
    model = create_model(
        name,
        num_classes=7,
        in_channels=in_channels,
        image_size=image_size,
        operator=operator,
        batch_norm=batch_norm,
        width_mult=0.125,
    )
    x = torch.randn(3, in_channels, image_size, image_size)
    features = model.forward_features(x)
    assert features.shape == (3, model.num_features)
    logits = model.forward_head(features)
    assert logits.shape == (3, 7)
    torch.testing.assert_close(model(x), logits)  # forward = head(features); BN stats barely move
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3, 6])).backward()
    assert torch.isfinite(logits).all()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
