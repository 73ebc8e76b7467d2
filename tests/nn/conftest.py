"""Shared setup for the nn tests: the tensors here are tiny, and on a small shared machine one
intra-op thread is orders of magnitude faster than several threads waiting on each other."""

from __future__ import annotations

import torch

torch.set_num_threads(1)


import pytest  # noqa: E402

from sphereconv.nn import functional as SF  # noqa: E402


@pytest.fixture(params=["fused", "reference"])
def impl(request):
    """Run a test once on each SphereConv implementation (fused autograd node and reference ops)."""
    with SF.use_reference_impl(request.param == "reference"):
        yield request.param
