"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_single_thread():
    """Every model test starts from the same random state and runs on one intra-op thread.

    The models here are tiny; a multi-threaded pool only adds synchronisation, which becomes very
    slow when the CPU cores are shared with other processes. The previous setting is restored.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
