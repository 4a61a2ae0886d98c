"""The one statistics module: percentiles, their confidence intervals, and "is Baton's p95 no worse".

The sidecar's ``/baton/ab/report``, the bench and the operator's rollout gates all use these
functions, so a report's verdict and a rollout's decision on the same samples cannot disagree.
Pure Python: the operator image carries this file without numpy.

- ``percentile``: numpy's default ("linear") definition.
- ``percentile_ci``: the distribution-free (order-statistic) confidence interval of a percentile,
  from binomial tails: exact coverage at every sample size, deterministic, and cheap enough to run
  on every scrape; ``min_samples_for_ci`` says from how many samples it has a true upper bound.
- ``compare``: the CI of ``p95(baton) - p95(incumbent)``, each arm's CI half-widths combined in
  quadrature (independent samples), and its verdict against an allowed margin.

Pooling pods: raw samples from every pod are pooled before any of this (``estimate`` over the
concatenation), which is exact; merging per-pod percentiles is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

BETTER, WORSE, INCONCLUSIVE = "better", "worse", "inconclusive"
LEVEL = 0.95


def percentile(sorted_x: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ascending, non-empty ``sorted_x``, interpolated as
    ``numpy.percentile`` does by default."""
    if not 0 <= q <= 100:
        raise ValueError("percentile must be in [0, 100]")
    h = (len(sorted_x) - 1) * (q / 100.0)
    i = math.floor(h)
    t = h - i
    a, b = sorted_x[i], sorted_x[min(i + 1, len(sorted_x) - 1)]
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t  # numpy's two-sided lerp


def binomial_tail(n: int, p: float, k: int) -> float:
    """P(Binomial(n, p) >= k), summing only the terms that matter (O(sqrt n) of them)."""
    if k <= 0 or p >= 1:
        return 1.0
    if k > n or p <= 0:
        return 0.0
    log_p, log_q, log_nf = math.log(p), math.log1p(-p), math.lgamma(n + 1)

    def term(i: int) -> float:
        return math.exp(log_nf - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p
                        + (n - i) * log_q)

    upper = k > n * p  # sum the smaller tail, from k outward: its terms only shrink
    total, i, step = 0.0, (k if upper else k - 1), (1 if upper else -1)
    while 0 <= i <= n:
        t = term(i)
        total += t
        if t <= 1e-17 * total:
            break
        i += step
    return total if upper else 1.0 - total


def percentile_ci(sorted_x: Sequence[float], q: float, level: float = LEVEL) -> tuple[float, float]:
    """Distribution-free CI of the q-th percentile of ascending ``sorted_x``: order statistics.

    The number B of samples at or below the true percentile is Binomial(n, q%), and the j-th
    smallest sample lies at or below it iff B >= j. So ``x(l)`` is a lower bound at confidence
    1 - a when P(B >= l) >= 1 - a, and ``x(u)`` an upper bound when P(B >= u) <= a (a = (1 -
    level) / 2 each side): the tightest such l and u, by binary search. Exact at every n, unlike a
    bootstrap interval, whose upper bound of a p95 sits at the sample maximum below ~72 samples
    and covers well under its level there. With too few samples for a bound
    (``min_samples_for_ci``), the sample's extreme stands in for it.
    """
    n, p, a = len(sorted_x), q / 100.0, (1 - level) / 2

    def first_at_most(prob: float) -> int:  # the smallest j in [1, n + 1] with P(B >= j) <= prob
        lo, hi = 1, n + 1  # P(B >= n + 1) == 0
        while lo < hi:
            mid = (lo + hi) // 2
            if binomial_tail(n, p, mid) <= prob:
                hi = mid
            else:
                lo = mid + 1
        return lo

    lower = first_at_most(1 - a) - 1  # the largest l with P(B >= l) > 1 - a (ties to the safe side)
    upper = first_at_most(a)
    return sorted_x[max(lower, 1) - 1], sorted_x[min(upper, n) - 1]


def min_samples_for_ci(q: float, level: float = LEVEL) -> int:
    """The fewest samples for which ``percentile_ci`` has a true upper bound (72 for a p95, 368 for
    a p99, at 95%): below it, P(all n samples under the percentile) = q%^n exceeds (1 - level) / 2."""
    return math.ceil(math.log((1 - level) / 2) / math.log(q / 100.0))


@dataclass(frozen=True)
class Estimate:
    """A percentile with its 95% CI over ``n`` samples (seconds, for latencies)."""

    value: float
    low: float
    high: float
    n: int

    def to_status(self) -> dict[str, Any]:
        return {"value": round(self.value, 6), "ci95": [round(self.low, 6), round(self.high, 6)],
                "n": self.n}

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any] | None, q: int = 95) -> "Estimate | None":
        """From a ``/baton/ab/report`` percentile summary (``{"n", "p95": {"value", "ci95"}}``);
        without a CI, a point."""
        key = f"p{q}"
        if not summary or not summary.get("n") or not isinstance(summary.get(key), Mapping):
            return None
        v = float(summary[key]["value"])
        lo, hi = (float(x) for x in summary[key].get("ci95") or (v, v))
        return cls(v, lo, hi, int(summary["n"]))


def estimate(samples: Iterable[float], q: float = 95) -> Estimate | None:
    """The q-th percentile of ``samples`` (any order; pooled over pods by the caller) and its CI."""
    x = sorted(samples)
    if not x:
        return None
    low, high = percentile_ci(x, q)
    return Estimate(percentile(x, q), low, high, len(x))


@dataclass(frozen=True)
class Comparison:
    """``p95(baton) - p95(incumbent)`` with its 95% CI ``[lower, upper]``."""

    difference: float
    lower: float
    upper: float

    def verdict(self, margin: float = 0.0) -> str:
        """Against the incumbent's p95 plus ``margin`` (>= 0, seconds): ``better`` when the whole
        CI lies at or below it, ``worse`` when it lies entirely above, else ``inconclusive``."""
        if self.upper <= margin:
            return BETTER
        if self.lower > margin:
            return WORSE
        return INCONCLUSIVE


def compare(baton: Estimate, incumbent: Estimate) -> Comparison:
    """The difference of two arms' estimates; its CI combines each side's half-widths in
    quadrature (independent arms), the upper bound from Baton's upper and the incumbent's lower."""
    diff = baton.value - incumbent.value
    upper = diff + math.hypot(baton.high - baton.value, incumbent.value - incumbent.low)
    lower = diff - math.hypot(baton.value - baton.low, incumbent.high - incumbent.value)
    return Comparison(diff, lower, upper)


BASIS = ("p95 of each arm with its distribution-free (order-statistic) 95% CI (below "
         f"{min_samples_for_ci(95)} samples the sample maximum stands in for its upper bound); the CI of p95(baton) - "
         "p95(incumbent) combines the arms' half-widths in quadrature (independent arms); better when "
         "that CI lies at or below the allowed margin (0 in /baton/ab/report), worse when it lies "
         "entirely above, otherwise inconclusive")


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
