"""Engine test settings: single-threaded torch (the machine is shared by many processes)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread: with oversubscribed cores, extra threads slow tiny models 20x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
