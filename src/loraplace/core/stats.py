"""The statistics every comparison uses: intervals across seeds, paired deltas, retained improvement, fronts.

Torch-free; the analysis and racing (``study.race``) use the same functions.

Usage::

    iv = t_interval([2.31, 2.35, 2.29])          # Interval(mean, n, sd, lo, hi): 95% Student-t
    paired_comparison({0: 2.4, 1: 2.5}, {0: 2.3, 1: 2.3})   # strategy - baseline, paired by seed
    retained_improvement(strategy, baseline, zero_shot)      # (zero - s) / (zero - b) per seed, its interval

Definitions (all intervals are two-sided 95% Student-t intervals across seeds):

* ``Interval``: mean +- t(0.975, n-1) * sd / sqrt(n), sd with ddof=1. With n = 1 no interval
  exists: ``lo``/``hi`` are None.
* Paired comparison: for each seed run by both the strategy and the baseline,
  d_i = value(strategy, seed i) - value(baseline, seed i); interval of the d_i as above, p-value of
  the paired t-test (H0: mean d = 0). Significant means the interval excludes 0 (equivalently p < 0.05).
  With zero spread (>= 2 pairs, every d_i the same) the t statistic is undefined; the data leave no doubt
  either way, so p = 0.0 when that common d is non-zero (significant) and 1.0 when it is 0 (not significant);
  with one pair there is no test: p None, significant None.
* Retained improvement per paired seed: (metric_strategy - zero_shot) / (metric_baseline - zero_shot),
  i.e. (zero_shot - loss_s) / (zero_shot - loss_b) for loss and (acc_s - acc_zero) / (acc_b - acc_zero)
  for accuracy; its mean and interval across seeds. 1.0 = keeps all of the baseline's gain over the
  base model.
* Pareto fronts: non-dominated points, lower is better on both coordinates.
* ``upper_bound``: mean + t(confidence, n-1) * sd / sqrt(n), one-sided (racing's stopping bound).
* ``kendall_tau``: tau-b rank agreement (how well an early ranking predicts the final one).
* Wilson interval: an accuracy from n examples with one seed has no t-interval; its 95% Wilson score
  interval says how far the number could move with other examples of the task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95  # two-sided level of every interval


@dataclass(frozen=True)
class Interval:
    """Mean across n values and its 95% t-interval (None when n < 2: no interval exists)."""

    mean: float
    n: int
    sd: float | None = None
    lo: float | None = None
    hi: float | None = None

    @property
    def half(self) -> float | None:
        return None if self.lo is None else (self.hi - self.lo) / 2

    def excludes(self, value: float) -> bool | None:
        """True/False when an interval exists, None otherwise."""
        return None if self.lo is None else not (self.lo <= value <= self.hi)


def t_interval(values: list[float]) -> Interval:
    """Mean and 95% t-interval of the values; raises ValueError on an empty list."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ValueError("t_interval of no values")
    mean = sum(vals) / n
    if n == 1:
        return Interval(mean, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, n, sd, mean - half, mean + half)


def wilson_interval(p: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion p observed on n trials (e.g. an accuracy on n examples).

    centre = (p + z^2/2n) / (1 + z^2/n), half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2),
    z the normal quantile; unlike p +- z*sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at
    p = 0 or 1."""
    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Paired:
    """Strategy minus baseline over seeds run by both (eval loss: positive = worse; accuracy: positive = better)."""

    diff: Interval
    p_value: float | None  # paired t-test; None with < 2 pairs; zero spread: 0.0 (all d the same, != 0) or 1.0 (all 0)
    seeds: tuple[int, ...]

    @property
    def significant(self) -> bool | None:
        return self.diff.excludes(0.0)


# -- building blocks ------------------------------------------------------------------------------
def paired_comparison(strategy: dict[int, float], baseline: dict[int, float]) -> Paired | None:
    """Paired stats of strategy - baseline over common seeds ({seed: loss} each); None if none shared."""
    seeds = tuple(sorted(set(strategy) & set(baseline)))
    if not seeds:
        return None
    diffs = [strategy[s] - baseline[s] for s in seeds]
    iv = t_interval(diffs)
    p = None
    if iv.n >= 2 and len(set(diffs)) == 1:  # zero spread: no t statistic; [d, d] excludes 0 exactly when d != 0
        p = 0.0 if diffs[0] != 0 else 1.0
    elif iv.n >= 2:  # the paired t-test, on the interval's own sd: p < 0.05 exactly when the interval excludes 0
        p = float(2 * stats.t.sf(abs(iv.mean) / (iv.sd / math.sqrt(iv.n)), iv.n - 1))
    return Paired(iv, p, seeds)


def retained_ratios(strategy: dict[int, float], baseline: dict[int, float], zero_shot: float,
                    higher_is_better: bool = False) -> dict[int, float] | None:
    """Per common seed (strategy - zero_shot) / (baseline - zero_shot): for a loss (zero_shot - loss_s) /
    (zero_shot - loss_b), for accuracy (higher_is_better) (acc_s - acc_zero) / (acc_b - acc_zero). None when no
    seed is shared or the baseline did not improve on zero-shot in some seed (the ratio is then undefined or
    sign-flipped)."""
    sign = 1.0 if higher_is_better else -1.0
    seeds = sorted(set(strategy) & set(baseline))
    if not seeds or any(sign * (baseline[s] - zero_shot) <= 0 for s in seeds):
        return None
    return {s: (strategy[s] - zero_shot) / (baseline[s] - zero_shot) for s in seeds}


def retained_improvement(strategy: dict[int, float], baseline: dict[int, float], zero_shot: float,
                         higher_is_better: bool = False) -> Interval | None:
    """The t-interval of ``retained_ratios`` across seeds (None where they are undefined)."""
    ratios = retained_ratios(strategy, baseline, zero_shot, higher_is_better)
    return None if ratios is None else t_interval(list(ratios.values()))


def upper_bound(values: list[float], confidence: float = CONFIDENCE) -> float | None:
    """One-sided upper ``confidence`` bound on the mean of ``values`` (Student t); None with fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean + float(stats.t.ppf(confidence, n - 1)) * sd / math.sqrt(n)


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b rank agreement of two orderings of the same items (NaN when either is constant)."""
    if len(a) < 2:
        return math.nan
    return float(stats.kendalltau(a, b).statistic)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the non-dominated points (lower is better on both coordinates), by x then y.

    A point is dominated when another is <= on both coordinates and < on at least one. NaN
    coordinates never enter the front."""
    ok = {k: v for k, v in points.items() if not (math.isnan(v[0]) or math.isnan(v[1]))}
    front = [
        k
        for k, (x, y) in ok.items()
        if not any(x2 <= x and y2 <= y and (x2 < x or y2 < y) for k2, (x2, y2) in ok.items() if k2 != k)
    ]
    return sorted(front, key=lambda k: (ok[k][0], ok[k][1], k))


def mean_curve(curves: list[list]) -> list[tuple[float, float]]:
    """Mean train loss per step over the curves ([[step, loss], ...] each) that logged that step."""
    by_step: dict[float, list[float]] = {}
    for curve in curves:
        for point in curve:
            if len(point) >= 2 and point[1] is not None and math.isfinite(float(point[1])):
                by_step.setdefault(float(point[0]), []).append(float(point[1]))
    return [(s, sum(v) / len(v)) for s, v in sorted(by_step.items())]
