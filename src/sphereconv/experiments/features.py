"""Penultimate-layer features of a trained run, for the 2-D feature visualisation.

Liu et al., "Deep Hyperspherical Learning" (NIPS 2017), Sec. 5.4 / Fig. 5: with a 2-D
penultimate layer (``feature_dim=2``) a CNN's features of each class spread out along a radial
spoke while a SphereNet's form compact clusters separated by angle. This module loads the newest
checkpoint of a run, rebuilds its model and returns ``model.forward_features(x)`` on test images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

# Test images embedded per run (the scatter plot draws at most a few thousand anyway).
MAX_FEATURE_IMAGES = 5000
FEATURE_BATCH_SIZE = 500
FEATURE_SUBSET_SEED = 0


def load_trained_model(run_dir: Path):
    """(model in eval mode on CPU, its TrainConfig, its dataset's info) from the newest checkpoint of
    ``run_dir``, restored as ``eval`` restores it (image size and class checks included)."""
    from ..engine.checkpoint import checkpoint_dir, find_latest_checkpoint
    from ..engine.evaluation import restore_checkpoint

    found = find_latest_checkpoint(checkpoint_dir(run_dir))
    if found is None:
        raise CheckpointError(f"{run_dir} has no loadable checkpoint in {checkpoint_dir(run_dir)}")
    restored = restore_checkpoint(found[0])
    return restored.module.model.eval(), restored.config, restored.info


@torch.no_grad()
def extract_features(run_dir: Path, max_images: int = MAX_FEATURE_IMAGES):
    """``(features (N, D), labels (N,), config, dataset info)`` of up to ``max_images`` test images
    (class-stratified)."""
    from ..data import load_dataset, normalize_pixels, subset

    model, config, info = load_trained_model(run_dir)
    images, labels = load_dataset(config.dataset, "test", config.data_dir, image_size=config.image_size, progress=False)
    if len(labels) > max_images:
        images, labels = subset(images, labels, max_images, seed=FEATURE_SUBSET_SEED)
    features = [model.forward_features(normalize_pixels(batch)) for batch in images.split(FEATURE_BATCH_SIZE)]
    return torch.cat(features).float().numpy(), labels.numpy(), config, info


def features2d_panels(runs: list[tuple[str, Path]]) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], list[str]]:
    """Scatter-plot panels ``(label, features, labels)`` for ``(label, run_dir)`` pairs, and class names.

    Raises ``ValueError`` if a run's features are not 2-D (the model was not built with feature_dim=2).
    """
    panels: list[tuple[str, np.ndarray, np.ndarray]] = []
    class_names: list[str] = []
    for label, run_dir in runs:
        features, labels, _, info = extract_features(run_dir)
        if features.shape[1] != 2:
            raise ValueError(
                f"{run_dir}: penultimate features have {features.shape[1]} dimensions, expected 2 (feature_dim=2)"
            )
        panels.append((label, features, labels))
        if not class_names:
            class_names = list(info.class_names)
    return panels, class_names
