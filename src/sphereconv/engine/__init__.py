"""Training engine: configuration, training loop, checkpoints, evaluation and data parallelism.

Implements the training procedure of Liu et al., "Deep Hyperspherical Learning" (NIPS 2017,
Sec. 5) and the reference code's recipe (wy1iu/SphereNet) as :func:`train`, driven by a validated
:class:`TrainConfig`; :func:`evaluate` scores a saved checkpoint and :func:`export_checkpoint` writes
its network for inference (ONNX, ``torch.export``, safetensors).
"""

from .._memory import keep_freed_memory
from .callbacks import Callback, PrintProgress
from .checkpoint import export_weights, find_latest_checkpoint, load_checkpoint, load_weights, save_checkpoint
from .config import TrainConfig, config_from_dict, config_to_dict, describe_keys, load_config, save_config
from .evaluation import evaluate
from .export import export_checkpoint
from .trainer import Trainer, train

__all__ = [
    "TrainConfig",
    "load_config",
    "save_config",
    "config_to_dict",
    "config_from_dict",
    "describe_keys",
    "train",
    "Trainer",
    "Callback",
    "PrintProgress",
    "evaluate",
    "export_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "find_latest_checkpoint",
    "export_weights",
    "load_weights",
    "keep_freed_memory",
]
