"""Shared fixtures of the nn tests."""

from __future__ import annotations

import pytest

from sphereconv.nn import functional as SF


@pytest.fixture(params=["fused", "reference"])
def impl(request):
    """Run a test once on each SphereConv implementation (fused autograd node and reference ops)."""
    with SF.use_reference_impl(request.param == "reference"):
        yield request.param
