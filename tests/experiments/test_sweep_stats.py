"""Student-t intervals and the paired t-test of the sweep, against hand-computed values (and scipy)."""

from __future__ import annotations

import math

import pytest

from sphereconv.experiments.grid import Named
from sphereconv.experiments.grid_report import NO_VERDICT, Cell, verdict
from sphereconv.experiments.stats import (
    PairedComparison,
    mean_interval,
    paired_comparison,
    regularized_incomplete_beta,
    student_t_cdf,
    student_t_quantile,
)

# A known small sample: SphereNet and CNN final accuracies for seeds 0, 1, 2.
SPHERE = {0: 0.90, 1: 0.91, 2: 0.93}
CNN = {0: 0.89, 1: 0.905, 2: 0.90}


@pytest.mark.parametrize("t", [-3.0, -0.4, 0.0, 0.7, 2.5, 40.0])
def test_t_cdf_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(t):
    assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
    assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_t_quantiles_match_closed_forms_and_the_printed_table():
    assert student_t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-10)  # 12.7062
    assert student_t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95**2)), rel=1e-10)  # 4.3027
    # Standard t-table values (two-sided 95%) for 3, 4 and 10 degrees of freedom.
    for df, table in ((3, 3.182), (4, 2.776), (10, 2.228)):
        assert student_t_quantile(0.975, df) == pytest.approx(table, abs=5e-4)
    assert student_t_quantile(0.025, 4) == pytest.approx(-student_t_quantile(0.975, 4))
    assert regularized_incomplete_beta(2.0, 3.0, 0.4) == pytest.approx(
        0.5248, abs=1e-12
    )  # polynomial: 1 - 0.6^4 - 4*0.4*0.6^3


def test_paired_difference_interval_and_p_value_by_hand():
    comparison = paired_comparison(SPHERE, CNN)
    # Differences 0.010, 0.005, 0.030: mean 0.015, sample sd sqrt(3.5e-4 / 2).
    sd = math.sqrt(3.5e-4 / 2)
    assert comparison.seeds == (0, 1, 2)
    assert comparison.difference.mean == pytest.approx(0.015)
    assert comparison.difference.std == pytest.approx(sd)
    half = 0.95 * math.sqrt(2 / (1 - 0.95**2)) * sd / math.sqrt(3)  # t(0.975, 2) s / sqrt(n)
    assert (comparison.difference.low, comparison.difference.high) == pytest.approx((0.015 - half, 0.015 + half))
    t = 0.015 / (sd / math.sqrt(3))
    assert comparison.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t))  # two-sided, 2 df closed form
    assert comparison.p_value == pytest.approx(0.18850, abs=1e-5)
    assert verdict(comparison) == "no detectable difference"


def test_against_scipy_when_installed():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 30):
        assert student_t_quantile(0.975, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-9)
        assert student_t_cdf(1.3, df) == pytest.approx(scipy_stats.t.cdf(1.3, df), abs=1e-12)
    result = scipy_stats.ttest_rel([SPHERE[s] for s in range(3)], [CNN[s] for s in range(3)])
    assert paired_comparison(SPHERE, CNN).p_value == pytest.approx(result.pvalue, rel=1e-9)
    values = [0.81, 0.84, 0.86, 0.83]
    low, high = scipy_stats.t.interval(0.95, 3, loc=sum(values) / 4, scale=scipy_stats.sem(values))
    estimate = mean_interval(values)
    assert (estimate.low, estimate.high) == pytest.approx((low, high), rel=1e-9)


def test_pairs_only_shared_seeds_and_small_samples_get_no_interval_or_verdict():
    comparison = paired_comparison({0: 0.9, 1: 0.8, 5: 0.7}, {1: 0.75, 0: 0.88})
    assert comparison.seeds == (0, 1) and comparison.difference.mean == pytest.approx(0.035)
    assert verdict(comparison) == "pending (2/3 paired seeds)"
    single = mean_interval([0.9])
    assert single.mean == 0.9 and math.isnan(single.low) and math.isnan(paired_comparison({0: 1.0}, {0: 0.5}).p_value)
    # Every pair 0.1 apart (up to float rounding): the t-test has no spread to work with, so no verdict
    # (3 equal signs are what chance gives one time in four). Every pair equal: no difference.
    constant = paired_comparison({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.8, 1: 0.7, 2: 0.6})
    assert math.isnan(constant.p_value) and verdict(constant) == NO_VERDICT
    faster_by_one_interval = paired_comparison({0: 300.0, 1: 400.0, 2: 300.0}, {0: 400.0, 1: 500.0, 2: 400.0})
    assert verdict(faster_by_one_interval, lower_is_better=True) == NO_VERDICT
    tie = paired_comparison({0: 400.0, 1: 300.0, 2: 400.0}, {0: 400.0, 1: 300.0, 2: 400.0})
    assert tie.p_value == 1.0 and verdict(tie) == "no detectable difference"


def test_verdicts_follow_the_sign_of_the_whole_interval():
    worse = paired_comparison({0: 0.80, 1: 0.81, 2: 0.79}, {0: 0.85, 1: 0.87, 2: 0.86})
    assert worse.difference.high < 0 and worse.p_value < 0.05 and verdict(worse) == "SphereNet worse"
    better = PairedComparison((0, 1, 2), mean_interval([0.02, 0.03, 0.025]), 0.01)
    assert verdict(better) == "SphereNet better"
    # Iterations to an accuracy: fewer is better, so a negative difference means faster.
    faster = paired_comparison({0: 300.0, 1: 350.0, 2: 320.0}, {0: 600.0, 1: 640.0, 2: 610.0})
    assert verdict(faster, lower_is_better=True) == "SphereNet better"


def test_a_diverged_seed_never_reached_the_mark():
    # A diverged run's results file has no metrics: it counts as not reaching the mark, so the
    # convergence comparison (every seed of both models must reach it) is not made over the rest.
    reached = {"metrics": [{"step": 100, "test_acc": 0.80}, {"step": 200, "test_acc": 0.86}]}
    cell = Cell(Named("S", "", {}), Named("cosine", "", {}), (0, 1), {0: reached, 1: {"status": "diverged"}})
    assert cell.iterations_to(0.85) == {0: 200, 1: None}
