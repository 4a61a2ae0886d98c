"""Bootstrap CIs, SLA attainment and the p95 verdict (no model)."""

import numpy as np
import pytest

from baton_sidecar.server.abstats import (ABStats, Outcome, SLATargets, bootstrap_quantiles,
                                          combine, sla_met, summarize, verdict)


def test_bootstrap_ci_covers_the_true_percentile():
    rng = np.random.default_rng(0)
    x = rng.exponential(1.0, size=2000)
    summary, reps = summarize(list(x), 500, np.random.default_rng(1))
    true_p95 = -np.log(0.05)
    lo, hi = summary["p95"]["ci95"]
    assert lo < true_p95 < hi and hi - lo < 0.6
    assert summary["p50"]["ci95"][0] < summary["p50"]["value"] < summary["p50"]["ci95"][1]
    assert reps.shape == (500,)


def test_bootstrap_shape_and_chunking():
    out = bootstrap_quantiles([1.0, 2.0, 3.0], [50, 95], 250, np.random.default_rng(0), chunk=100)
    assert out.shape == (250, 2) and out.min() >= 1 and out.max() <= 3


def test_verdict_better_worse_inconclusive():
    rng = np.random.default_rng(2)
    fast, slow = rng.normal(1.0, 0.1, 300), rng.normal(2.0, 0.1, 300)
    _, rf = summarize(list(fast), 400, rng)
    _, rs = summarize(list(slow), 400, rng)
    v = verdict(rf, rs, 300, 300, float(np.percentile(fast, 95)), float(np.percentile(slow, 95)), 400)
    assert v["result"] == "better" and v["ci95"][1] < 0 and "bootstrap" in v["basis"]
    assert verdict(rs, rf, 300, 300, 2.0, 1.0, 400)["result"] == "worse"
    _, rf2 = summarize(list(rng.normal(1.0, 0.1, 300)), 400, rng)
    assert verdict(rf, rf2, 300, 300, 1.0, 1.0, 400)["result"] == "inconclusive"
    few = verdict(rf, rs, 5, 300, 1.0, 2.0, 400)
    assert few["result"] == "inconclusive" and few["reason"] == "insufficient samples"


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
    r = s.report({"interactive": SLATargets(ttft_ms=20), "batch": SLATargets()}, "interactive",
                 resamples=200)
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
    r = s.report({}, None, resamples=50)
    assert r["arms"]["baton"]["count"] == 25 and r["arms"]["baton"]["window_count"] == 10
