"""Settings shared by the whole suite.

The tensors in the tests are tiny and the suite runs as two pytest workers on two cores: one
intra-op thread per process is much faster than several threads waiting on each other.
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)
