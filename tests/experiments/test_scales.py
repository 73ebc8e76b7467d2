"""The smaller reproduction scales keep the reference learning-rate milestones (as fractions of the run)."""

from __future__ import annotations

from sphereconv.engine import load_config
from sphereconv.engine.config import REFERENCE_MILESTONES
from sphereconv.experiments.scales import get_scale


def test_step_scales_use_the_reference_milestones():
    for name in ("quick", "small"):
        overrides = get_scale(name).overrides
        assert overrides["schedule"] == "step" and "lr_milestones" not in overrides  # the default, not a copy
        assert load_config(None, overrides).lr_milestones == list(REFERENCE_MILESTONES)
