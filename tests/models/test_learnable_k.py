"""The learnable sigmoid's k = |raw| + 0.05 is positive by construction (Liu et al., NIPS 2017,
Sec. 2.1, learnable SphereConv): its per-forward check reads no values back from the device, while
a k tensor given by a caller is still checked."""

from __future__ import annotations

import pytest
import torch

from sphereconv.nn.angular import check_positive, learnable_k


@pytest.fixture
def bool_reads(monkeypatch):
    """Counts ``Tensor.__bool__`` calls: each one is a device-to-host read on an accelerator."""
    calls = []
    original = torch.Tensor.__bool__

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counting)
    return calls


def test_learnable_k_is_accepted_without_reading_its_values(bool_reads):
    raw = torch.nn.Parameter(torch.full((4,), 0.7))
    check_positive("sigmoid_k", learnable_k(raw))
    assert bool_reads == []


def test_a_given_k_tensor_is_still_checked(bool_reads):
    check_positive("sigmoid_k", torch.full((4,), 0.3))
    assert bool_reads  # values were read
    with pytest.raises(ValueError, match="invalid sigmoid_k=.*: expected positive finite values everywhere"):
        check_positive("sigmoid_k", torch.tensor([0.3, -0.1]))
