"""sphereconv: deep hyperspherical learning for PyTorch.

Implements "Deep Hyperspherical Learning" (Liu et al., NIPS 2017, arXiv:1711.03189) and the
decoupled operators of "Decoupled Networks" (Liu et al., CVPR 2018, arXiv:1804.08071).
"""

__version__ = "0.1.0"

from . import losses, models, nn  # noqa: E402
from .models import convert_model, create_model, list_models  # noqa: E402

__all__ = ["nn", "losses", "models", "convert_model", "create_model", "list_models", "__version__"]
