"""Small-sample statistics of the sweep: Student-t intervals and the paired t-test.

Comparisons between models follow the protocol in docs/RESULTS.md (pre-registered sweep): each cell
is summarised by its mean over seeds with a 95% Student-t interval, and a SphereNet is compared
with the CNN of the same regime through the differences of runs that share a seed (same data order
and augmentation), with a paired t-test. Liu et al. (NIPS 2017, Sec. 5) report single runs; the
seeds and intervals are ours.

The Student-t distribution is computed here, not imported: its CDF is
``1 - I_x(df/2, 1/2) / 2`` for ``t > 0`` with ``x = df / (df + t^2)``, where ``I`` is the
regularised incomplete beta function, evaluated by its continued fraction (modified Lentz method;
Press et al., Numerical Recipes, 3rd ed., Sec. 6.4). Quantiles invert the CDF by bisection.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Two-sided confidence level of every interval in the reports (the protocol's 95%).
CONFIDENCE = 0.95
# Continued-fraction and bisection controls: relative accuracy and the most iterations allowed.
_EPSILON = 1e-15
_TINY = 1e-300
_MAX_TERMS = 500
_BISECTION_STEPS = 200


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Numerical Recipes, Sec. 6.4)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    fraction = d
    for m in range(1, _MAX_TERMS + 1):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            fraction *= c * d
        if abs(c * d - 1.0) < _EPSILON:
            break
    return fraction


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b)`` for ``a, b > 0`` and ``0 <= x <= 1``."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1]; got {x!r}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive; got {df!r}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The ``t`` with ``P(T <= t) = p`` (bisection on :func:`student_t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1); got {p!r}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if student_t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low <= _EPSILON * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Estimate:
    """Mean of ``n`` values with its two-sided Student-t interval (``low``/``high`` NaN if n < 2)."""

    n: int
    mean: float
    std: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean, sample standard deviation and ``confidence`` Student-t interval of ``values``."""
    n = len(values)
    if n == 0:
        return Estimate(0, math.nan, math.nan, math.nan, math.nan)
    mean = statistics.fmean(values)
    if n < 2:
        return Estimate(1, mean, math.nan, math.nan, math.nan)
    std = statistics.stdev(values)
    half = student_t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return Estimate(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class PairedComparison:
    """``treatment - baseline`` over shared seeds: mean difference, interval and paired t-test."""

    seeds: tuple[int, ...]
    difference: Estimate
    p_value: float

    @property
    def n(self) -> int:
        return len(self.seeds)


# Spread of paired differences below this fraction of their mean counts as none: differences equal
# in exact arithmetic (0.9 - 0.8 and 0.8 - 0.7) differ by float rounding only, about 1e-16 of them.
NO_SPREAD_RELATIVE = 1e-9


def has_spread(estimate: Estimate) -> bool:
    """Whether the values behind ``estimate`` differ by more than rounding (see :data:`NO_SPREAD_RELATIVE`)."""
    return estimate.std > NO_SPREAD_RELATIVE * abs(estimate.mean)


def paired_comparison(
    treatment: dict[int, float], baseline: dict[int, float], confidence: float = CONFIDENCE
) -> PairedComparison:
    """Paired difference of two seed -> value maps over the seeds both have.

    The p-value is that of the two-sided paired t-test (``n - 1`` degrees of freedom); it is NaN
    with fewer than two pairs and when every difference is the same non-zero amount (zero spread:
    the test is undefined), 1 when every difference is zero.
    """
    seeds = tuple(sorted(set(treatment) & set(baseline)))
    differences = [treatment[s] - baseline[s] for s in seeds]
    estimate = mean_interval(differences, confidence)
    if estimate.n < 2:
        p_value = math.nan
    elif not has_spread(estimate):
        p_value = 1.0 if estimate.mean == 0.0 else math.nan
    else:
        t = estimate.mean / (estimate.std / math.sqrt(estimate.n))
        df = estimate.n - 1
        # P(|T| >= |t|) = I_{df/(df+t^2)}(df/2, 1/2) directly: 2 (1 - cdf) loses digits for small p.
        p_value = regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return PairedComparison(seeds, estimate, p_value)
