"""How big a reproduction run is: the ``--scale`` presets of ``sphereconv reproduce``.

``paper`` is the reference recipe of Liu et al. (NIPS 2017, Sec. 5 / wy1iu/SphereNet): Adam 1e-3
divided by 10 at 34k and 54k of 64k iterations, batch 128, evaluation every 500 iterations, on
CIFAR-10 (the presets of :mod:`sphereconv.configs`, which also set the reference's BatchNorm decay
0.999). The smaller scales keep the shape of that recipe (same optimiser, same relative
learning-rate milestones) on Fashion-MNIST with fewer iterations and narrower networks, and the
library's default BatchNorm momentum 0.1, which short runs need (see
``sphereconv.models.layers.BN_MOMENTUM``):

- ``small``: minutes per run on one GPU;
- ``quick``: a few minutes per run on a 2-core CPU, wide and long enough for the models to learn
  well (the quick start's main job);
- ``smoke``: about a second per run (width 1/16, a few hundred images, 8 iterations) so that
  every experiment runs end to end in the test suite. Its accuracies mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass(frozen=True)
class Scale:
    """A size preset: a base YAML config (or none) plus TrainConfig overrides.

    A step schedule keeps TrainConfig's default milestones, the reference's drops as fractions of
    the run (``sphereconv.engine.config.REFERENCE_MILESTONES``).
    """

    name: str
    description: str
    overrides: dict
    default_seeds: int
    config_file: str | None = None
    # Evaluations per run used to derive eval_every when --iterations overrides the length.
    evaluations_per_run: int = 20
    extra: dict = field(default_factory=dict)


SCALES: dict[str, Scale] = {
    "smoke": Scale(
        name="smoke",
        description="tiny plumbing check: width 1/16, 256 images, 8 iterations (accuracies mean nothing)",
        overrides={
            "dataset": "fashion-mnist",
            "width_mult": 1 / 16,
            "train_subset": 256,
            "test_subset": 128,
            "iterations": 8,
            "batch_size": 16,
            "eval_every": 4,
            "eval_batch_size": 128,
            "schedule": "constant",
            "augment": "none",
        },
        default_seeds=1,
        evaluations_per_run=2,
    ),
    "quick": Scale(
        name="quick",
        description="Fashion-MNIST sized for a 2-core CPU: width 1/4, 1500 iterations of batch 32",
        overrides={
            "dataset": "fashion-mnist",
            "width_mult": 0.25,
            "test_subset": 2000,
            "iterations": 1500,
            "batch_size": 32,
            "eval_every": 100,
            "eval_batch_size": 500,
            "schedule": "step",
            "augment": "none",
        },
        default_seeds=1,
        evaluations_per_run=15,
    ),
    "small": Scale(
        name="small",
        description="Fashion-MNIST in minutes on one GPU: width 1/2, 4000 iterations of batch 128",
        overrides={
            "dataset": "fashion-mnist",
            "width_mult": 0.5,
            "iterations": 4000,
            "batch_size": 128,
            "eval_every": 200,
            "eval_batch_size": 1000,
            "schedule": "step",
            "augment": "flip",
        },
        default_seeds=3,
    ),
    "paper": Scale(
        name="paper",
        description="reference recipe (NIPS 2017 Sec. 5): CIFAR-10, 64k iterations, batch 128, full width",
        overrides={},
        default_seeds=1,
        config_file="spherenet9_cifar10.yaml",
        evaluations_per_run=128,
    ),
}

SCALE_NAMES = tuple(SCALES)


def get_scale(name: str) -> Scale:
    """Return the scale preset called ``name`` or raise :class:`ConfigError` listing the choices."""
    try:
        return SCALES[name]
    except KeyError:
        raise ConfigError(f"unknown scale {name!r}; choose one of: {', '.join(SCALE_NAMES)}") from None
