"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    """Every model test starts from the same random state."""
    torch.manual_seed(0)
