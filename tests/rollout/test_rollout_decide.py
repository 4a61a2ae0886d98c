"""The rollout decision function over synthetic per-arm samples, reported in the sidecar's own format."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rollout_testlib import arm_outcomes, normal, report, state_at, zero_baseline

from baton_sidecar.stats import Estimate
from baton_operator.rollout.autotune import KNOBS
from baton_operator.rollout.decide import decide, wants_measurement
from baton_operator.rollout.gates import FAIL, PASS, SKIP, WAIT, evaluate, latency_check
from baton_operator.rollout.measurement import Baseline, Measurement, PodBaseline, merge_estimates, step_view
from baton_operator.rollout.record import analysis_status
from baton_operator.rollout.spec import AutoTuneSpec, Bounds, Gates, RolloutSpec, revision
from baton_operator.rollout.state import (ABORTED, AWAITING_APPROVAL, PAUSED, PROGRESSING, PROMOTED, ROLLED_BACK,
                                          RolloutState)
from baton_operator.rollout.times import iso

NOW = 10_000.0
SPEC = RolloutSpec.from_spec({"steps": [10, 25, 50, 100], "minSamplesPerArm": 50, "failureThreshold": 3,
                              "analysisIntervalSeconds": 30,
                              "gates": {"p95LatencyMarginPct": 10, "ttftMarginPct": 10, "maxErrorRate": 0.02}})


def measure(baton, incumbent, weight=25):
    return Measurement.of([report(baton, incumbent, weight)])


def step(baton, incumbent):
    """This step's figures for one sidecar based at cursor 0."""
    return step_view(measure(baton, incumbent), zero_baseline()).arms


WIN = (arm_outcomes("baton", normal(0.5, 0.05, 300, 1)), arm_outcomes("incumbent", normal(1.0, 0.1, 300, 2)))
LOSS = (arm_outcomes("baton", normal(2.0, 0.2, 300, 3)), arm_outcomes("incumbent", normal(1.0, 0.1, 300, 4)))
# 5% slower than the incumbent with a 10% margin, but the spread at 60 samples leaves it undecided.
TIE = (arm_outcomes("baton", normal(1.0, 0.5, 60, 5) * 1.05), arm_outcomes("incumbent", normal(1.0, 0.5, 60, 5)))
FEW = (arm_outcomes("baton", normal(0.5, 0.05, 12, 7)), arm_outcomes("incumbent", normal(1.0, 0.1, 300, 8)))
ERRORS = (arm_outcomes("baton", normal(0.5, 0.05, 200, 9), errors=40),
          arm_outcomes("incumbent", normal(1.0, 0.1, 300, 10)))


@pytest.mark.parametrize("name, samples, failures, action, weight, phase, failed, waiting", [
    ("clear win", WIN, 0, "advance", 50, PROGRESSING, [], []),
    ("clear loss", LOSS, 0, "hold", 25, PROGRESSING, ["p95Latency", "ttft"], []),
    ("clear loss at the threshold", LOSS, 2, "rollback", 0, ROLLED_BACK, ["p95Latency", "ttft"], []),
    ("inconclusive", TIE, 1, "hold", 25, PROGRESSING, [], ["p95Latency", "ttft"]),
    ("too few samples", FEW, 0, "hold", 25, PROGRESSING, [], ["samples"]),
    ("error spike", ERRORS, 0, "hold", 25, PROGRESSING, ["errorRate"], []),
    ("error spike at the threshold", ERRORS, 2, "rollback", 0, ROLLED_BACK, ["errorRate"], []),
])
def test_decision_table(name, samples, failures, action, weight, phase, failed, waiting) -> None:
    state = state_at(step=1, weight=25, failures=failures)
    decision = decide(SPEC, state, "rev", NOW, measure(*samples))
    assert (decision.action, decision.weight, decision.state.phase) == (action, weight, phase), decision.reason
    results = {c.name: c.result for c in decision.checks}
    assert sorted(n for n, r in results.items() if r == FAIL) == sorted(failed), decision.reason
    assert sorted(n for n, r in results.items() if r == WAIT) == sorted(waiting), decision.reason
    assert decision.state.last_analysis_at == NOW
    expected_failures = {"hold": failures + 1 if failed else failures, "rollback": failures + 1,
                         "advance": 0}[action]
    assert decision.state.failures == expected_failures
    if failed:
        assert decision.event[0] == "Warning" and all(f in decision.reason for f in failed)
    analysis = analysis_status(decision, None)
    assert analysis["failedChecks"] == [c.name for c in decision.checks if c.result == FAIL]
    counted = len(samples[0])  # the baseline was 0: every request counts, also once the step has moved on
    assert analysis["arms"]["baton"]["requests"] == counted
    assert set(analysis["arms"]) == {"baton", "incumbent"}
    p95 = analysis["arms"]["baton"]["p95LatencySeconds"]
    assert p95["ci95"][0] <= p95["value"] <= p95["ci95"][1] and p95["n"] > 0


def test_advance_records_the_step_and_a_new_baseline_is_taken_once_the_sidecars_apply_it() -> None:
    decision = decide(SPEC, state_at(1, 25), "rev", NOW, measure(*WIN))
    new = decision.state
    assert (new.step, new.weight, new.applied_at, new.baseline) == (2, 50, None, None)
    assert new.history[-1] == {"weight": 50, "action": "advance", "time": iso(NOW)}
    assert decision.event[:2] == ("Normal", "RolloutAdvanced")
    # Next tick: one sidecar still reports 25% -> hold; then all report 50% -> the baseline is taken.
    assert wants_measurement(SPEC, new, "rev", NOW + 1)
    two_pods = Measurement.of([report(*WIN, weight=50), report(*WIN, weight=25)])
    held = decide(SPEC, new, "rev", NOW + 1, two_pods)
    assert held.action == "hold" and "1 of 2 sidecars" in held.reason and held.state.baseline is None
    at_50 = report(*WIN, weight=50)
    applied = decide(SPEC, new, "rev", NOW + 2, Measurement.of([at_50]))
    assert applied.state.applied_at == NOW + 2
    assert applied.state.baseline.pods["pod-0"] == PodBaseline("i0", 600, {"baton": 300, "incumbent": 300},
                                                               {"baton": 0, "incumbent": 0})
    assert not wants_measurement(SPEC, applied.state, "rev", NOW + 3)  # next analysis after the interval
    assert wants_measurement(SPEC, applied.state, "rev", NOW + 2 + SPEC.interval_s)
    # Nothing new since the cursor: no samples this step yet.
    nothing_new = {**at_50, "since": 600, "arms": {a: {**e, "samples": {"e2e_s": [], "ttft_s": []}}
                                                   for a, e in at_50["arms"].items()}}
    again = decide(SPEC, applied.state, "rev", NOW + 40, Measurement.of([nothing_new]))
    assert again.action == "hold" and [c.name for c in again.checks] == ["samples"]
    assert analysis_status(again, None)["counted"] == 1


def test_last_step_promotes_to_100() -> None:
    base = Baseline({"pod-0": PodBaseline("i0", 0, {"baton": 100, "incumbent": 100},
                                          {"baton": 0, "incumbent": 0})})
    decision = decide(SPEC, state_at(2, 50, baseline=base), "rev", NOW, measure(*WIN, weight=50))
    assert analysis_status(decision, None)["arms"]["baton"]["requests"] == 200  # counted from the step's start
    assert (decision.action, decision.weight, decision.state.phase) == ("promote", 100, PROMOTED)
    assert decision.event[1] == "RolloutPromoted"
    assert not wants_measurement(SPEC, decision.state, "rev", NOW + 1000)
    assert decide(SPEC, decision.state, "rev", NOW + 1000).action == "wait"


def test_steps_without_100_end_with_it_and_a_first_step_of_100_promotes_at_once() -> None:
    assert RolloutSpec.from_spec({"steps": [5, 5, 50]}).steps == (5, 50, 100)
    start = decide(RolloutSpec.from_spec({"steps": [100]}), RolloutState(), "rev", NOW)
    assert (start.action, start.weight, start.state.phase) == ("start", 100, PROMOTED)


def test_start_and_restart_on_a_new_revision() -> None:
    start = decide(SPEC, RolloutState(), "rev", NOW)
    assert (start.action, start.weight, start.state.step, start.state.phase) == ("start", 10, 0, PROGRESSING)
    assert start.event[1] == "RolloutStarted" and start.state.revision == "rev"
    rolled_back = replace(state_at(2, 0), phase=ROLLED_BACK)
    assert decide(SPEC, rolled_back, "rev", NOW).action == "wait"  # a rollback stays
    again = decide(SPEC, rolled_back, "rev2", NOW)  # until the candidate (or attempt) changes
    assert (again.action, again.weight, again.state.step, again.state.failures) == ("start", 10, 0, 0)


def test_revision_follows_the_candidate_not_the_switches() -> None:
    spec = {"mode": "standalone", "image": "a", "router": {"weight": 3, "stickyHeader": "x"},
            "rollout": {"steps": [5, 100], "paused": False, "gates": {"maxErrorRate": 0.1}}}
    base = revision(spec)
    switched = {**spec, "router": {**spec["router"], "weight": 50},
                "rollout": {**spec["rollout"], "paused": True, "abort": False, "approvedWeight": 50,
                            "gates": {"maxErrorRate": 0.2}}}
    assert revision(switched) == base
    for changed in ({**spec, "image": "b"}, {**spec, "rollout": {**spec["rollout"], "attempt": 1}},
                    {**spec, "rollout": {**spec["rollout"], "steps": [10, 100]}}):
        assert revision(changed) != base


def test_abort_rolls_back_and_clearing_it_starts_again() -> None:
    aborted = decide(replace(SPEC, abort=True), state_at(2, 50), "rev", NOW)
    assert (aborted.action, aborted.weight, aborted.state.phase) == ("abort", 0, ABORTED)
    assert aborted.event[:2] == ("Warning", "RolloutAborted")
    assert decide(replace(SPEC, abort=True), aborted.state, "rev", NOW + 5).action == "wait"
    resumed = decide(SPEC, aborted.state, "rev", NOW + 10)
    assert (resumed.action, resumed.weight, resumed.state.step) == ("start", 10, 0)
    assert "again" in resumed.reason
    assert [h["weight"] for h in resumed.state.history] == [0, 10]


def test_paused_holds_without_gathering_and_resumes() -> None:
    paused_spec = replace(SPEC, paused=True)
    state = state_at(1, 25)
    assert not wants_measurement(paused_spec, state, "rev", NOW)
    paused = decide(paused_spec, state, "rev", NOW, measure(*WIN))
    assert (paused.action, paused.weight, paused.state.phase) == ("hold", 25, PAUSED)
    assert decide(paused_spec, paused.state, "rev", NOW + 5).action == "wait"
    resumed = decide(SPEC, paused.state, "rev", NOW + 10, measure(*WIN))
    assert resumed.action == "advance"


def test_pause_seconds_hold_a_passing_step() -> None:
    spec = replace(SPEC, pause_s=600)
    held = decide(spec, state_at(1, 25, applied_at=NOW - 100), "rev", NOW, measure(*WIN))
    assert held.action == "hold" and "pauseSeconds" in held.reason and held.state.failures == 0
    assert decide(spec, state_at(1, 25, applied_at=NOW - 700), "rev", NOW, measure(*WIN)).action == "advance"


def test_manual_gate_waits_for_approval() -> None:
    spec = replace(SPEC, manual_gates=frozenset({50}))
    waiting = decide(spec, state_at(1, 25), "rev", NOW, measure(*WIN))
    assert (waiting.action, waiting.state.phase) == ("hold", AWAITING_APPROVAL)
    assert waiting.event[1] == "RolloutAwaitingApproval" and "approvedWeight" in waiting.reason
    assert decide(spec, waiting.state, "rev", NOW + 60, measure(*WIN)).event is None  # said once
    approved = decide(replace(spec, approved_weight=50), waiting.state, "rev", NOW + 60, measure(*WIN))
    assert (approved.action, approved.weight, approved.state.phase) == ("advance", 50, PROGRESSING)


def test_unreadable_sidecars_and_counter_resets_hold() -> None:
    held = decide(SPEC, state_at(1, 25), "rev", NOW, Measurement.failed("1 of 2 sidecars unreadable"))
    assert held.action == "hold" and "unreadable" in held.reason and held.state.failures == 0
    base = Baseline({"pod-0": PodBaseline("i0", 0, {"baton": 1000, "incumbent": 1000},
                                          {"baton": 0, "incumbent": 0})})
    reset = decide(SPEC, state_at(1, 25, baseline=base), "rev", NOW, measure(*WIN))
    assert reset.action == "hold" and "went back" in reset.reason and reset.state.applied_at == NOW
    assert reset.state.baseline.pods["pod-0"].requests == {"baton": 300, "incumbent": 300}
    assert reset.state.baseline.pods["pod-0"].cursor == 600


def test_status_round_trip_resumes_the_same_step() -> None:
    decision = decide(SPEC, state_at(1, 25, failures=1, applied_at=NOW - 50), "rev", NOW, measure(*LOSS))
    restored = RolloutState.from_status(decision.state.to_status())
    assert restored == decision.state
    assert (restored.step, restored.weight, restored.failures) == (1, 25, 2)


def test_a_zero_step_is_a_dry_run() -> None:
    spec = RolloutSpec.from_spec({"steps": [0, 50], "minSamplesPerArm": 50})
    state = state_at(0, 0)
    decision = decide(spec, state, "rev", NOW, Measurement.of([report([], arm_outcomes(
        "incumbent", normal(1, 0.1, 10, 1)), weight=0)]))
    assert (decision.action, decision.weight) == ("advance", 50)


def test_ttft_is_skipped_without_incumbent_ttft_and_sla_gate() -> None:
    baton = arm_outcomes("baton", normal(0.5, 0.05, 200, 1))
    incumbent = arm_outcomes("incumbent", normal(1.0, 0.1, 200, 2), ttft_fraction=None)  # not streamed
    checks = {c.name: c for c in evaluate(SPEC, 25, step(baton, incumbent))}
    assert checks["ttft"].result == SKIP and checks["p95Latency"].result == PASS

    sla_spec = replace(SPEC, gates=replace(SPEC.gates, min_sla_attainment=0.95, p95_margin_pct=1000,
                                           ttft_margin_pct=1000))
    slow = arm_outcomes("baton", normal(2.5, 0.3, 200, 3))  # mostly over the 2 s e2e target
    checks = {c.name: c for c in evaluate(sla_spec, 25, step(slow, incumbent))}
    assert checks["slaAttainment"].result == FAIL
    both_slow = arm_outcomes("incumbent", normal(3.0, 0.3, 200, 4))  # the floor is out of reach for both
    checks = {c.name: c for c in evaluate(sla_spec, 25, step(slow, both_slow))}
    assert checks["slaAttainment"].result == PASS


@pytest.mark.parametrize("baton, incumbent, margin, result", [
    ((0.9, 0.85, 0.95), (1.0, 0.95, 1.05), 0, PASS),  # better, CIs apart
    ((1.03, 1.0, 1.06), (1.0, 0.98, 1.02), 10, PASS),  # 3% worse, within a 10% margin even at the CI's top
    ((1.03, 1.0, 1.06), (1.0, 0.98, 1.02), 0, WAIT),  # no margin: the CI of the difference straddles 0
    ((1.05, 1.0, 1.1), (1.0, 0.95, 1.05), 10, WAIT),  # 5% worse, but the CI's top passes the margin
    ((1.5, 1.4, 1.6), (1.0, 0.95, 1.05), 10, FAIL),  # worse beyond the margin at the CI's bottom
    ((1.15, 1.0, 1.3), (1.0, 0.95, 1.05), 10, WAIT),  # point estimate beyond the margin, CI not
])
def test_latency_check_takes_the_confidence_intervals_into_account(baton, incumbent, margin, result) -> None:
    est = lambda v: Estimate(v[0], v[1], v[2], 100)  # noqa: E731
    assert latency_check("p95Latency", est(baton), est(incumbent), margin, 50).result == result


def test_merging_older_sidecars_p95s() -> None:
    one = Estimate(1.0, 0.9, 1.2, 100)
    assert merge_estimates([one]) == one  # one pod: exactly its own
    two = merge_estimates([one, Estimate(2.0, 1.9, 2.1, 300)])
    assert two.n == 400 and two.value == pytest.approx(1.75)
    assert two.value - two.low == pytest.approx(((0.25 * 0.1) ** 2 + (0.75 * 0.1) ** 2) ** 0.5)
    assert merge_estimates([None]) is None
    assert Estimate.from_summary({"n": 100, "p95": {"value": 1.0, "ci95": [0.9, 1.2]}}) == one
    assert Estimate.from_summary({"n": 0}) is None
    assert Measurement.of([]).problem


@pytest.mark.parametrize("rollout, field", [
    ({"steps": [50, 10]}, "spec.rollout.steps"),
    ({"steps": [5, 101]}, "spec.rollout.steps"),
    ({"minSamplesPerArm": 0}, "spec.rollout.minSamplesPerArm"),
    ({"gates": {"maxErrorRate": "low"}}, "spec.rollout.gates.maxErrorRate"),
    ({"autoTune": {"maxPaddingRatio": {"min": 0.8, "max": 0.2}}}, "spec.rollout.autoTune.maxPaddingRatio"),
    ({"autoTune": {"maxPaddingRatio": {"max": 1.5}}}, "spec.rollout.autoTune.maxPaddingRatio.max"),
])
def test_bad_specs_name_the_field(rollout, field) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        RolloutSpec.from_spec(rollout)


def test_defaults() -> None:
    spec = RolloutSpec.from_spec({})
    assert spec.steps == (5, 10, 25, 50, 100) and spec.failure_threshold == 3 and spec.min_samples == 50
    assert spec.gates == Gates(10.0, 10.0, 0.01, None) and not spec.auto_tune.enabled


def test_auto_tune_spec_accepts_and_ignores_compaction_bounds() -> None:
    # compactionThreshold is not auto-tuned (it governs cache memory, not padding); older specs still parse.
    spec = RolloutSpec.from_spec({"autoTune": {"enabled": True, "stepSize": 0.1,
                                               "compactionThreshold": {"min": 0.8, "max": 0.2},
                                               "maxPaddingRatio": {"min": 0.5, "max": 0.9}}})
    assert spec.auto_tune == AutoTuneSpec(enabled=True, max_padding_ratio=Bounds(0.5, 0.9), step=0.1)
    assert KNOBS == (("maxPaddingRatio", "max_padding_ratio"),)
