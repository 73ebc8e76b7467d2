"""Reproductions of the experiments of Liu et al., "Deep Hyperspherical Learning" (NIPS 2017, Sec. 5).

- :mod:`.definitions`: the experiments as data (variants = TrainConfig overrides);
- :mod:`.scales`: run sizes from a CPU smoke test to the paper's recipe;
- :mod:`.runner`: trains every variant x seed, resumable; :mod:`.report`, :mod:`.plots`: outputs;
- ``sphereconv reproduce --grid``, pre-registered grids of regimes x models x seeds: :mod:`.grid`
  (grid files, their runs and results files), :mod:`.sweep` (trains them, resumable run by run),
  :mod:`.grid_report` (one combined report); :mod:`.stats`: Student-t intervals and paired tests;
- :mod:`.overlay`: ``sphereconv plot``; :mod:`.paper`: the published numbers.
"""

from .definitions import EXPERIMENTS, Experiment, Variant, get_experiment, list_experiments
from .scales import SCALES, Scale, get_scale

__all__ = [
    "EXPERIMENTS",
    "Experiment",
    "Variant",
    "get_experiment",
    "list_experiments",
    "SCALES",
    "Scale",
    "get_scale",
    "run_experiment",
]


def run_experiment(name: str, scale: str = "small", **options):
    """Train and report one experiment (see :func:`sphereconv.experiments.runner.run_experiment`)."""
    from .runner import run_experiment as _run

    return _run(name, scale, **options)
