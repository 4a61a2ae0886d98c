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


def test_the_exact_bootstrap_ci_agrees_with_a_monte_carlo_bootstrap() -> None:
    rng = np.random.default_rng(3)
    x = rng.exponential(1.0, 2000)
    low, high = stats.percentile_ci(sorted(x.tolist()), 95)
    replicates = np.percentile(x[rng.integers(0, len(x), size=(4000, len(x)))], 95, axis=1)
    mc_low, mc_high = np.percentile(replicates, [2.5, 97.5])
    width = mc_high - mc_low
    assert abs(low - mc_low) < 0.1 * width and abs(high - mc_high) < 0.1 * width
    assert low < np.percentile(x, 95) < high


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
