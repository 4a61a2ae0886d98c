"""The one statistics module (``baton_sidecar.stats``), and the promise it exists for: the sidecar's
A/B verdict and the operator's rollout gate reach the same verdict on the same samples."""

from __future__ import annotations

import math
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from baton_sidecar import stats
from baton_sidecar.server.abstats import ABStats, Outcome

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from baton_operator import rollout as ro  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000, 4999])
def test_percentile_is_numpys(n) -> None:
    x = np.random.default_rng(n).lognormal(0, 1, n)
    for q in (50, 95, 99):
        assert stats.percentile(sorted(x.tolist()), q) == np.percentile(x, q)


def test_binomial_tail_matches_the_exact_sum() -> None:
    for n, p, k in [(10, 0.3, 3), (40, 0.95, 38), (40, 0.5, 1), (200, 0.9, 190), (200, 0.99, 190), (7, 0.5, 8)]:
        exact = sum(Fraction(math.comb(n, i)) * Fraction(p) ** i * (1 - Fraction(p)) ** (n - i)
                    for i in range(k, n + 1))
        assert stats.binomial_tail(n, p, k) == pytest.approx(float(exact), abs=1e-12)
    assert stats.binomial_tail(5, 0.0, 1) == 0.0 and stats.binomial_tail(5, 1.0, 5) == 1.0


@pytest.mark.parametrize("n", [72, 150, 400])
def test_the_percentile_ci_covers_the_true_p95_at_its_level_on_each_side(n) -> None:
    """Each side misses the true p95 at most (1 - level) / 2 of the time, at any sample size: the
    bootstrap interval this replaced let the true p95 exceed its upper bound 11% of the time at 100."""
    rng = np.random.default_rng(n)
    trials = 800
    for draw, true_p95 in ((lambda: rng.lognormal(0, 1, n), math.exp(1.6448536269514722)),
                           (lambda: rng.exponential(1.0, n), -math.log(0.05))):
        above = below = 0
        for _ in range(trials):
            low, high = stats.percentile_ci(sorted(draw().tolist()), 95)
            above += true_p95 > high
            below += true_p95 < low
        assert above / trials <= 0.025 + 0.015 and below / trials <= 0.025 + 0.015  # 3 binomial sds


def test_a_p95_has_an_upper_bound_from_72_samples_and_the_sample_maximum_stands_in_below() -> None:
    assert (stats.min_samples_for_ci(95), stats.min_samples_for_ci(99), stats.min_samples_for_ci(50)) == (72, 368, 6)
    x = sorted(np.random.default_rng(1).exponential(1.0, 71).tolist())
    assert stats.percentile_ci(x, 95)[1] == x[-1]
    x = sorted(np.random.default_rng(1).exponential(1.0, 72).tolist())
    assert stats.percentile_ci(x, 95)[1] == x[-1]  # P(all 72 below) = 0.0249: the maximum bounds it
    x = sorted(np.random.default_rng(1).exponential(1.0, 400).tolist())
    low, high = stats.percentile_ci(x, 95)
    assert low < stats.percentile(x, 95) < high < x[-1]


def test_compare_combines_the_arms_half_widths_and_judges_against_a_margin() -> None:
    baton, incumbent = stats.Estimate(1.0, 0.9, 1.3, 100), stats.Estimate(2.0, 1.8, 2.1, 100)
    c = stats.compare(baton, incumbent)
    assert c.difference == -1.0
    assert c.upper == pytest.approx(-1.0 + math.hypot(0.3, 0.2))
    assert c.lower == pytest.approx(-1.0 - math.hypot(0.1, 0.1))
    assert c.verdict() == stats.BETTER
    assert stats.compare(incumbent, baton).verdict() == stats.WORSE
    # A worse p95 within the allowed margin passes; the CI straddling it is inconclusive.
    assert stats.compare(incumbent, baton).verdict(margin=1.5) == stats.BETTER
    assert stats.compare(incumbent, baton).verdict(margin=1.0) == stats.INCONCLUSIVE


def _verdict_pairs(seed: int) -> list[tuple[str, str]]:
    """(report verdict, rollout gate) for the e2e p95 of several pairs of arms, the same samples fed to
    ``/baton/ab/report``'s ABStats and to the rollout's pooled p95 and latency check at margin 0."""
    rng = np.random.default_rng(seed)
    pairs = []
    for shift in (-0.3, -0.05, 0.0, 0.02, 0.1, 0.5):
        baton = rng.lognormal(0.0 + shift, 0.4, 400)
        incumbent = rng.lognormal(0.0, 0.4, 400)
        ab = ABStats()
        for x in baton:
            ab.record(Outcome("baton", True, e2e_s=float(x)))
        for x in incumbent:
            ab.record(Outcome("incumbent", True, e2e_s=float(x)))
        report = ab.report({}, None)["verdicts"]["e2e_s"]["result"]
        check = ro.latency_check("p95Latency", ro.pooled_p95([baton.tolist()]),
                                 ro.pooled_p95([incumbent.tolist()]), margin_pct=0, min_samples=20)
        pairs.append((report, check.result))
    return pairs


def test_the_report_verdict_and_the_rollout_gate_agree_on_the_same_samples() -> None:
    gate_of = {stats.BETTER: ro.PASS, stats.WORSE: ro.FAIL, stats.INCONCLUSIVE: ro.WAIT}
    seen = set()
    for seed in range(4):
        for report, gate in _verdict_pairs(seed):
            assert gate_of[report] == gate, (report, gate)
            seen.add(report)
    assert seen == {stats.BETTER, stats.WORSE, stats.INCONCLUSIVE}  # every verdict was exercised
