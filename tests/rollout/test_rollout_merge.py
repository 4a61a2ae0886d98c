"""One step's figures from several sidecars: cursors, pooled raw samples, the exact bootstrap CI, and the
fallbacks for new, restarted and older sidecars. Reports come from the sidecar's own ``ABStats``."""

from __future__ import annotations

import asyncio

import numpy as np

from baton_sidecar.server.abstats import ABStats
from baton_sidecar.server.eligibility import EligibilityCounts

from rollout_testlib import (StubSidecar, arm_outcomes, legacy, normal, recorded, report, sidecar_report,
                             state_at, zero_baseline)

from baton_sidecar.stats import Estimate
from baton_operator.rollout.decide import decide
from baton_operator.rollout.gather import measure, report_path
from baton_operator.rollout.measurement import (ARMS, Baseline, Measurement, PodBaseline, merge_estimates, pooled_p95,
                                                step_view)
from baton_operator.rollout.record import analysis_status, traffic_status
from baton_operator.rollout.spec import RolloutSpec
from baton_operator.rollout.state import PROGRESSING, RolloutState

NOW = 10_000.0
SPEC = RolloutSpec.from_spec({"steps": [10, 25, 50, 100], "minSamplesPerArm": 50, "analysisIntervalSeconds": 30,
                              "gates": {"p95LatencyMarginPct": 10, "ttftMarginPct": 10, "maxErrorRate": 0.02}})


def test_two_pods_merge_exactly_to_the_p95_of_their_pooled_samples() -> None:
    # Different distributions per pod: a fast pod with many requests, a slow one with few. The weighted
    # mean of the pods' p95s (the older method) is far from the p95 of all requests.
    fast = report(arm_outcomes("baton", normal(0.3, 0.03, 400, 1)),
                  arm_outcomes("incumbent", normal(1.0, 0.1, 300, 2)), instance="i0")
    slow = report(arm_outcomes("baton", normal(1.5, 0.2, 200, 3)),
                  arm_outcomes("incumbent", normal(1.2, 0.1, 100, 4)), instance="i1")
    view = step_view(Measurement.of([fast, slow]), zero_baseline(2))
    assert view.counted == ("pod-0", "pod-1") and view.exact and not view.truncated
    for arm in ARMS:
        for metric, estimate in (("e2e_s", view.arms[arm].e2e_p95), ("ttft_s", view.arms[arm].ttft_p95)):
            pooled = np.array(fast["arms"][arm]["samples"][metric] + slow["arms"][arm]["samples"][metric])
            assert estimate.value == np.percentile(pooled, 95) and estimate.n == len(pooled)
            assert estimate.low < estimate.value < estimate.high
    baton = view.arms["baton"]
    assert baton.requests == 600 and baton.sla_evaluated == 600
    mean_of_p95s = merge_estimates([Estimate.from_summary(r["arms"]["baton"]["e2e_s"]) for r in (fast, slow)])
    assert abs(mean_of_p95s.value - baton.e2e_p95.value) > 0.3


def test_a_step_is_judged_on_its_own_traffic_only() -> None:
    # Step 1 (10%): Baton twice as slow as the incumbent. Step 2 (25%): Baton twice as fast.
    stats = recorded(arm_outcomes("baton", normal(2.0, 0.1, 400, 1)),
                     arm_outcomes("incumbent", normal(1.0, 0.1, 400, 2)))
    waiting = RolloutState(revision="rev", phase=PROGRESSING, step=1, weight=25, step_started_at=NOW)
    based = decide(SPEC, waiting, "rev", NOW, Measurement.of([sidecar_report(stats, 25)]))
    assert based.state.baseline.pods["pod-0"].cursor == 800
    recorded(arm_outcomes("baton", normal(0.5, 0.05, 300, 3)), arm_outcomes("incumbent", normal(1.0, 0.1, 300, 4)),
             stats=stats)
    since = based.state.baseline.since("pod-0")
    decision = decide(SPEC, based.state, "rev", NOW + 60, Measurement.of([sidecar_report(stats, 25, since)]))
    assert decision.action == "advance", decision.reason
    analysis = analysis_status(decision, None)
    assert analysis["arms"]["baton"]["requests"] == 300 and analysis["arms"]["baton"]["p95LatencySeconds"]["n"] == 300
    assert analysis["arms"]["baton"]["p95LatencySeconds"]["value"] < 0.6
    assert analysis["latencyBasis"] == "pooled samples" and analysis["rebased"] == []
    # The whole window (what the gates saw before cursors) still holds step 1: Baton's p95 is ~2 s.
    whole = Measurement.of([sidecar_report(stats, 25)]).reports[0]
    assert pooled_p95([whole.samples["baton"]["e2e_s"]]).value > 1.9


def test_the_analysis_says_how_much_traffic_the_pilot_judges() -> None:
    # Two sidecars' reports carry their eligibility tallies, as /baton/ab/report adds them.
    tallies = []
    for eligible, reasons in ((90, ["unsupported:tools"] * 10), (30, ["other_model"] * 20 + ["other_route"] * 10)):
        counts = EligibilityCounts()
        for _ in range(eligible):
            counts.record_eligible()
        for reason in reasons:
            counts.record_ineligible(reason)
        tallies.append(counts.report())
    reports = [{**report(arm_outcomes("baton", normal(0.5, 0.05, 60, i)),
                         arm_outcomes("incumbent", normal(0.6, 0.05, 60, i + 10)), instance=f"i{i}"), **tally}
               for i, tally in enumerate(tallies)]
    state = state_at(1, 25, baseline=zero_baseline(2))
    decision = decide(SPEC, state, "rev", NOW + 60, Measurement.of(reports))
    traffic = analysis_status(decision, None)["traffic"]
    assert traffic == {"eligibleRequests": 120, "ineligibleRequests": 40, "judgedShare": 0.75}
    # Sidecars that do not report it count as nothing judged or passed.
    assert traffic_status(Measurement.of([report([], [])]).reports)["judgedShare"] is None


def test_new_and_restarted_sidecars_are_based_now_and_gone_ones_dropped() -> None:
    base = zero_baseline(3)  # pod-0, pod-1, pod-2
    win = (arm_outcomes("baton", normal(0.5, 0.05, 100, 1)), arm_outcomes("incumbent", normal(1.0, 0.1, 100, 2)))
    pod0 = report(*win, instance="i0")
    restarted = report(*win, instance="other")  # pod-1's URL, another process
    new = report(*win, instance="i9")  # pod-2 is gone; a fourth URL appears
    m = Measurement.of([pod0, restarted, new], ["pod-0", "pod-1", "pod-3"])
    view = step_view(m, base)
    assert view.counted == ("pod-0",) and view.rebased == ("pod-1", "pod-3")
    assert set(view.baseline.pods) == {"pod-0", "pod-1", "pod-3"}
    assert view.baseline.pods["pod-1"] == PodBaseline("other", 200, {"baton": 100, "incumbent": 100},
                                                         {"baton": 0, "incumbent": 0})
    assert view.arms["baton"].requests == 100 and view.arms["baton"].e2e_p95.n == 100  # pod-0's only
    # Counters that went back (a restart of an older sidecar) rebase too.
    went_back = Baseline({"pod-0": PodBaseline("i0", 0, {"baton": 5000, "incumbent": 0},
                                               {"baton": 0, "incumbent": 0})})
    assert step_view(Measurement.of([pod0]), went_back).rebased == ("pod-0",)


def test_sidecars_continue_from_their_rebased_cursor() -> None:
    win = (arm_outcomes("baton", normal(0.5, 0.05, 100, 1)), arm_outcomes("incumbent", normal(1.0, 0.1, 100, 2)))
    stats = recorded(*win, instance="new")
    view = step_view(Measurement.of([sidecar_report(stats)]), zero_baseline(1))
    assert view.rebased == ("pod-0",) and view.baseline.since("pod-0") == 200
    recorded(*win, stats=stats, instance="new")
    nxt = step_view(Measurement.of([sidecar_report(stats, since=200)]), view.baseline)
    assert nxt.counted == ("pod-0",) and nxt.arms["baton"].requests == 100 and nxt.arms["baton"].e2e_p95.n == 100


def test_older_sidecars_fall_back_to_the_mean_of_their_p95s() -> None:
    a = legacy(report(arm_outcomes("baton", normal(0.3, 0.03, 300, 1)),
                      arm_outcomes("incumbent", normal(1.0, 0.1, 300, 2)), samples=False))
    b = legacy(report(arm_outcomes("baton", normal(1.5, 0.2, 100, 3)),
                      arm_outcomes("incumbent", normal(1.0, 0.1, 100, 4)), samples=False))
    m = Measurement.of([a, b])
    first = step_view(m, Baseline())  # no cursors to compare: based on sight
    assert first.rebased == ("pod-0", "pod-1") and first.baseline.pods["pod-0"].cursor is None
    view = step_view(m, first.baseline)
    assert view.counted == ("pod-0", "pod-1") and not view.exact
    assert view.arms["baton"].requests == 0  # counts are still exact per step
    expected = merge_estimates([Estimate.from_summary(r["arms"]["baton"]["e2e_s"]) for r in (a, b)])
    assert view.arms["baton"].e2e_p95 == expected
    # A mixed fleet: the newer sidecar's samples make its own estimate, merged the older way.
    new = report(arm_outcomes("baton", normal(0.3, 0.03, 300, 1)), arm_outcomes("incumbent", normal(1, 0.1, 300, 2)))
    mixed = step_view(Measurement.of([new, b], ["pod-0", "pod-1"]),
                      Baseline({**zero_baseline(1).pods, "pod-1": first.baseline.pods["pod-1"]}))
    assert mixed.counted == ("pod-0", "pod-1") and not mixed.exact and mixed.arms["baton"].e2e_p95.n == 400
    decision = decide(SPEC, state_at(1, 25, baseline=first.baseline), "rev", NOW, m)
    assert analysis_status(decision, None)["latencyBasis"].startswith("mean of the pods' p95s")


def test_a_window_that_lost_part_of_the_step_is_flagged() -> None:
    stats = recorded(arm_outcomes("baton", normal(0.5, 0.05, 80, 1)),
                     arm_outcomes("incumbent", normal(1.0, 0.1, 80, 2)), stats=ABStats(window=50))
    view = step_view(Measurement.of([sidecar_report(stats, since=0)]), zero_baseline(1))
    assert view.truncated and view.arms["baton"].requests == 80 and view.arms["baton"].e2e_p95.n == 50
    decision = decide(RolloutSpec.from_spec({"minSamplesPerArm": 20}), state_at(1, 25), "rev", NOW,
                      Measurement.of([sidecar_report(stats, since=0)]))
    assert analysis_status(decision, None)["truncated"] is True


def test_the_baseline_lives_in_status() -> None:
    base = Baseline({"http://10.0.0.2:8080": PodBaseline("abc", 41, {"baton": 3, "incumbent": 7},
                                                         {"baton": 1, "incumbent": 0}),
                     "http://10.0.0.3:8080": PodBaseline(None, None, {"baton": 0, "incumbent": 2},
                                                         {"baton": 0, "incumbent": 0})})
    status = base.to_status()
    assert status["baton"] == {"requests": 3, "errors": 1} and status["incumbent"] == {"requests": 9, "errors": 0}
    assert Baseline.from_status(status) == base
    state = state_at(1, 25, baseline=base)
    assert RolloutState.from_status(state.to_status()) == state
    # An older operator's baseline (totals only): every sidecar is based again at the next analysis.
    old = Baseline.from_status({"baton": {"requests": 5, "errors": 0}, "incumbent": {"requests": 5, "errors": 0}})
    assert old == Baseline() and step_view(Measurement.of([report([], [])]), old).rebased == ("pod-0",)


def test_measure_asks_each_sidecar_for_its_step() -> None:
    stubs = [StubSidecar(weight=25), StubSidecar(weight=25)]
    try:
        urls = [s.url for s in stubs]
        base = Baseline({urls[0]: PodBaseline("x", 17, {"baton": 0, "incumbent": 0},
                                              {"baton": 0, "incumbent": 0})})
        m = asyncio.run(measure(urls, 10, base))
        assert m.problem is None and [r.url for r in m.reports] == urls
        assert stubs[0].queries[-1] == {"samples": "true", "since": "17"}
        assert stubs[1].queries[-1] == {"samples": "true"}  # not based yet: its whole window, once
        assert all(r.samples is not None and r.cursor is not None for r in m.reports)
    finally:
        for s in stubs:
            s.close()
    assert report_path(None) == "/baton/ab/report?samples=true" and report_path(5).endswith("&since=5")
