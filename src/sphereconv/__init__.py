"""sphereconv: deep hyperspherical learning for PyTorch.

Implements "Deep Hyperspherical Learning" (Liu et al., NIPS 2017, arXiv:1711.03189) and the
decoupled operators of "Decoupled Networks" (Liu et al., CVPR 2018, arXiv:1804.08071).

The subpackages (``sphereconv.nn``, ``sphereconv.losses``, ``sphereconv.models``) and the model
functions below are imported on first use, so that ``import sphereconv`` (and the command line's
``--help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from . import losses, models, nn
    from .models import convert_model, create_model, list_models

# Attribute -> module that defines it, imported when the attribute is first read.
_LAZY_SUBMODULES = {"nn": ".nn", "losses": ".losses", "models": ".models"}
_LAZY_FUNCTIONS = {"convert_model": ".models", "create_model": ".models", "list_models": ".models"}

__all__ = ["nn", "losses", "models", "convert_model", "create_model", "list_models", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(_LAZY_SUBMODULES[name], __name__)
    if name in _LAZY_FUNCTIONS:
        value = getattr(importlib.import_module(_LAZY_FUNCTIONS[name], __name__), name)
        globals()[name] = value  # later reads skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
