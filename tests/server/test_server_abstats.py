"""Percentile CIs, SLA attainment and the p95 verdict of /baton/ab/report (no model)."""

import numpy as np
import pytest

from baton_sidecar import stats
from baton_sidecar.server.abstats import ABStats, Outcome, SLATargets, combine, sla_met, summarize, verdict


def test_ci_covers_the_true_percentile():
    x = np.random.default_rng(0).exponential(1.0, size=2000)
    summary, p95 = summarize(list(x))
    true_p95 = -np.log(0.05)
    lo, hi = summary["p95"]["ci95"]
    assert lo < true_p95 < hi and hi - lo < 0.6
    assert summary["p50"]["ci95"][0] < summary["p50"]["value"] < summary["p50"]["ci95"][1]
    assert summary["p95"]["value"] == pytest.approx(np.percentile(x, 95))
    assert p95 == stats.Estimate(summary["p95"]["value"], lo, hi, 2000)
    points, none = summarize(list(x), with_ci=False)
    assert none is None and "ci95" not in points["p95"] and points["p99"]["value"] == summary["p99"]["value"]


def test_verdict_better_worse_inconclusive():
    rng = np.random.default_rng(2)
    _, fast = summarize(list(rng.normal(1.0, 0.1, 300)))
    _, slow = summarize(list(rng.normal(2.0, 0.1, 300)))
    v = verdict(fast, slow)
    assert v["result"] == "better" and v["ci95"][1] < 0 and v["difference_s"] < -0.8
    assert "quadrature" in v["basis"] and v["n"] == {"baton": 300, "incumbent": 300}
    assert verdict(slow, fast)["result"] == "worse"
    _, fast2 = summarize(list(rng.normal(1.0, 0.1, 300)))
    same = verdict(fast, fast2)
    assert same["result"] == "inconclusive" and same["reason"] == "the 95% CI includes 0"
    _, few = summarize(list(rng.normal(1.0, 0.1, 5)))
    assert verdict(few, slow) == {**verdict(few, slow), "result": "inconclusive",
                                  "reason": "insufficient samples"}


def test_combine():
    assert combine(["better", "inconclusive"]) == "better"
    assert combine(["better", "worse"]) == "worse"
    assert combine(["inconclusive", "inconclusive"]) == "inconclusive"


def test_sla_met_rules():
    t = SLATargets(ttft_ms=100, e2e_ms=1000)
    assert sla_met(Outcome("baton", True, ttft_s=0.05, e2e_s=0.5), t)
    assert not sla_met(Outcome("baton", True, ttft_s=0.2, e2e_s=0.5), t)
    assert not sla_met(Outcome("baton", False, ttft_s=0.05, e2e_s=0.5), t)
    assert sla_met(Outcome("incumbent", True, ttft_s=None, e2e_s=0.5), t)  # unknown TTFT not held
    tp = SLATargets(tpot_ms=10)
    assert not sla_met(Outcome("baton", True, ttft_s=0.1, e2e_s=1.1, completion_tokens=11), tp)
    assert Outcome("baton", True, ttft_s=0.1, e2e_s=1.1, completion_tokens=11).tpot_s == pytest.approx(0.1)


def test_report_counts_errors_and_attainment():
    s = ABStats(window=100)
    for i in range(30):
        s.record(Outcome("baton", True, ttft_s=0.01, e2e_s=0.1 + i * 1e-4))
        s.record(Outcome("incumbent", i % 10 != 0, ttft_s=0.05, e2e_s=0.5 + i * 1e-4,
                         sla_class="batch"))
    s.record_fallback()
    r = s.report({"interactive": SLATargets(ttft_ms=20), "batch": SLATargets()}, "interactive")
    b, i = r["arms"]["baton"], r["arms"]["incumbent"]
    assert b["count"] == 30 and b["errors"] == 0 and b["error_rate"] == 0
    assert i["count"] == 30 and i["errors"] == 3 and i["error_rate"] == pytest.approx(0.1)
    assert b["sla"] == {"evaluated": 30, "met": 30, "attainment": 1.0, "default_class": "interactive"}
    assert i["sla"]["evaluated"] == 0  # class "batch" has no targets
    assert r["verdicts"]["e2e_s"]["result"] == "better"
    assert r["verdicts"]["ttft_s"]["result"] == "better" and r["verdict"] == "better"
    assert r["fallbacks_to_baton"] == 1
    assert set(b["e2e_s"]) == {"n", "mean", "p50", "p95", "p99"}


def test_window_bounds_memory_but_totals_keep_counting():
    s = ABStats(window=10)
    for _ in range(25):
        s.record(Outcome("baton", True, e2e_s=1.0))
    r = s.report({}, None)
    assert r["arms"]["baton"]["count"] == 25 and r["arms"]["baton"]["window_count"] == 10
