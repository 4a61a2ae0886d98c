"""The shadow stage's decisions: start, the sidecars applying it, the paired verdict gate (promote to the
first step, fail, roll back, run out of time), several sidecars, pause, abort, restart from status, and
``spec.rollout.shadow`` parsing."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rollout_testlib import shadow_report

from baton_operator.rollout.decide import decide, wants_measurement
from baton_operator.rollout.gates import FAIL, PASS, WAIT
from baton_operator.rollout.measurement import Measurement
from baton_operator.rollout.paired import NO_BLOCK, PairedReport, PairedView
from baton_operator.rollout.record import analysis_status, rollout_status
from baton_operator.rollout.spec import RolloutSpec, ShadowSpec, revision
from baton_operator.rollout.state import (ABORTED, CANCELLED, FAILED, PASSED, PAUSED, PROGRESSING, PROMOTED,
                                          ROLLED_BACK, RUNNING, SHADOWING, RolloutState, ShadowState)

NOW = 10_000.0
SPEC = RolloutSpec.from_spec({"steps": [10, 50, 100], "failureThreshold": 3, "analysisIntervalSeconds": 30,
                              "shadow": {"percent": 20, "minPairs": 100, "maxDurationSeconds": 3600}})


def shadowing(failures: int = 0, started: float = NOW - 600, applied: float | None = NOW - 600,
              percent: float = 20) -> RolloutState:
    """In the shadow stage since ``started``, the sidecars applying it since ``applied``, analysed then."""
    return RolloutState(revision="rev", phase=SHADOWING, step=0, weight=0, step_started_at=started,
                        applied_at=applied, last_analysis_at=applied, failures=failures,
                        history=({"weight": 0, "action": "start", "time": "t", "shadowPercent": percent},),
                        shadow=ShadowState(percent))


def measured(*reports) -> Measurement:
    return Measurement.of(list(reports))


def test_a_rollout_with_a_shadow_stage_starts_mirroring_at_weight_0() -> None:
    start = decide(SPEC, RolloutState(), "rev", NOW)
    new = start.state
    assert (start.action, new.phase, new.weight, new.shadow_percent) == ("start", SHADOWING, 0, 20)
    assert new.shadow == ShadowState(20) and new.shadow.outcome == RUNNING
    assert new.history[-1]["shadowPercent"] == 20 and new.history[-1]["weight"] == 0
    assert start.event[:2] == ("Normal", "RolloutStarted") and "shadow stage" in start.reason
    assert wants_measurement(SPEC, new, "rev", NOW + 1)  # waiting for the sidecars to apply it
    assert RolloutState.from_status(new.to_status()) == new  # the stage lives in status


def test_the_stage_waits_until_every_sidecar_applies_weight_0_and_the_share() -> None:
    state = shadowing(applied=None)
    stale = decide(SPEC, state, "rev", NOW, measured(shadow_report(0, weight=10), shadow_report(0, shadow=0)))
    assert stale.action == "hold" and "2 of 2 sidecars" in stale.reason and stale.state.applied_at is None
    # A report that does not say its share (older report shape) is taken at its weight.
    applied = decide(SPEC, state, "rev", NOW, measured(shadow_report(0, shadow=None), shadow_report(0)))
    assert applied.action == "hold" and applied.state.applied_at == NOW and "collecting pairs" in applied.reason
    assert not wants_measurement(SPEC, applied.state, "rev", NOW + 1)  # next look after the interval
    assert wants_measurement(SPEC, applied.state, "rev", NOW + SPEC.interval_s)


@pytest.mark.parametrize("pairs, verdict, failures, action, phase, result, outcome", [
    (150, "better", 0, "advance", PROGRESSING, PASS, PASSED),
    (150, "not_worse", 2, "advance", PROGRESSING, PASS, PASSED),  # a pass clears earlier failures
    (50, "better", 0, "hold", SHADOWING, WAIT, RUNNING),  # too few pairs yet
    (150, "insufficient", 0, "hold", SHADOWING, WAIT, RUNNING),  # the sidecar has not decided
    (50, "worse", 2, "hold", SHADOWING, WAIT, RUNNING),  # worse, but on fewer than minPairs: not counted
    (150, "worse", 0, "hold", SHADOWING, FAIL, RUNNING),  # one failed analysis
    (150, "worse", 2, "rollback", ROLLED_BACK, FAIL, FAILED),  # failureThreshold reached
])
def test_the_paired_verdict_gate(pairs, verdict, failures, action, phase, result, outcome) -> None:
    decision = decide(SPEC, shadowing(failures), "rev", NOW, measured(shadow_report(pairs, verdict)))
    new = decision.state
    assert (decision.action, new.phase, new.shadow.outcome) == (action, phase, outcome), decision.reason
    assert [(c.name, c.result) for c in decision.checks] == [("pairedVerdict", result)]
    assert (new.shadow.pairs, new.shadow.verdict) == (pairs, verdict)  # status: pairs so far, the verdict
    if action == "advance":  # the first step, mirroring off
        assert (new.step, new.weight, new.shadow_percent, new.failures) == (0, 10, 0, 0)
        assert new.applied_at is None and new.history[-1]["action"] == "advance"
        assert decision.event[:2] == ("Normal", "ShadowPassed") and "shadow stage passed" in decision.reason
    elif action == "rollback":
        assert (new.weight, new.shadow_percent, new.failures) == (0, 0, 3)
        assert decision.event[:2] == ("Warning", "RolledBack") and "shadow stage" in decision.reason
        assert new.history[-1] == {"weight": 0, "action": "rollback", "time": new.history[-1]["time"]}
    else:
        assert (new.weight, new.shadow_percent) == (0, 20)
        assert new.failures == failures + (1 if result == FAIL else 0)
        assert (decision.event or ("", ""))[:2] == (("Warning", "AnalysisFailed") if result == FAIL else ("", ""))
    analysis = analysis_status(decision, None)
    assert analysis["paired"]["pairs"] == pairs and analysis["paired"]["verdict"] == verdict
    assert analysis["paired"]["sidecars"]["pod-0"]["metrics"]["e2e"]["median_diff_s"] == -0.2  # as sent
    assert analysis["result"] == result and analysis["time"] is not None


def test_a_first_step_of_100_is_promoted_straight_from_the_shadow_stage() -> None:
    spec = replace(SPEC, steps=(100,))
    decision = decide(spec, shadowing(), "rev", NOW, measured(shadow_report(150, "better")))
    assert (decision.action, decision.state.phase, decision.weight) == ("promote", PROMOTED, 100)


def test_a_sidecar_without_paired_statistics_never_passes_and_the_stage_runs_out() -> None:
    held = decide(SPEC, shadowing(), "rev", NOW, measured(shadow_report(None)))
    assert held.action == "hold" and held.state.shadow.verdict == "insufficient" and NO_BLOCK in held.reason
    late = shadowing(started=NOW - 3600)
    assert wants_measurement(SPEC, replace(late, last_analysis_at=NOW - 1), "rev", NOW)  # a last look, early
    out = decide(SPEC, late, "rev", NOW, measured(shadow_report(None)))
    assert (out.action, out.state.phase, out.weight, out.state.shadow_percent) == ("rollback", ROLLED_BACK, 0, 0)
    assert "maxDurationSeconds (3600 s)" in out.reason and out.state.shadow.outcome == FAILED
    assert out.event[:2] == ("Warning", "RolledBack")
    # Unreadable sidecars, or sidecars that never applied the stage, run out the same way.
    assert decide(SPEC, late, "rev", NOW, Measurement.failed("1 of 1 sidecars unreadable", 1)).action == "rollback"
    never = decide(SPEC, replace(late, applied_at=None), "rev", NOW, measured(shadow_report(0, weight=5)))
    assert never.action == "rollback" and "no pairs judged" in never.reason
    # A passing verdict at the deadline still passes.
    assert decide(SPEC, late, "rev", NOW, measured(shadow_report(150, "better"))).action == "advance"


def test_several_sidecars_are_judged_by_the_most_cautious_verdict() -> None:
    def view(*verdicts, pairs=60):
        return PairedView.of({f"http://p{i}": PairedReport(pairs, v, f"basis {i}") for i, v in enumerate(verdicts)})

    assert (view("better", "better").verdict, view("better", "better").pairs) == ("better", 120)
    assert view("better", "not_worse").verdict == "not_worse"
    assert view("better", "insufficient").verdict == "insufficient"
    worse = view("better", "worse", "insufficient")
    assert worse.verdict == "worse" and worse.basis == "http://p1: basis 1"
    assert view().verdict == "insufficient" and view("worse").basis == "basis 0"  # one sidecar: its own words
    assert PairedReport.parse({"pairs": "many", "verdict": "better"}).verdict == "insufficient"
    assert PairedReport.parse(None) == PairedReport()
    # Pairs are summed over the sidecars: two of 60 pass a gate of 100 that neither passes alone.
    two = decide(SPEC, shadowing(), "rev", NOW, measured(shadow_report(60, "better"), shadow_report(60, "better")))
    assert two.action == "advance" and two.state.shadow.pairs == 120


def test_pause_keeps_mirroring_and_resumes_the_stage() -> None:
    paused_spec = replace(SPEC, paused=True)
    paused = decide(paused_spec, shadowing(), "rev", NOW, measured(shadow_report(150, "better")))
    assert (paused.action, paused.state.phase, paused.state.shadow_percent) == ("hold", PAUSED, 20)
    assert "shadow stage" in paused.reason and not wants_measurement(paused_spec, paused.state, "rev", NOW)
    resumed = decide(SPEC, paused.state, "rev", NOW + 10, measured(shadow_report(150, "better")))
    assert resumed.action == "advance"
    held = decide(SPEC, paused.state, "rev", NOW + 10, measured(shadow_report(10, "better")))
    assert held.state.phase == SHADOWING


def test_abort_ends_the_stage_and_clearing_it_shadows_again() -> None:
    aborted = decide(replace(SPEC, abort=True), shadowing(), "rev", NOW)
    assert (aborted.state.phase, aborted.state.shadow_percent, aborted.state.shadow.outcome) == (ABORTED, 0, CANCELLED)
    again = decide(SPEC, aborted.state, "rev", NOW + 5)
    assert (again.action, again.state.phase, again.state.shadow) == ("start", SHADOWING, ShadowState(20))


def test_changing_or_removing_the_stage_mid_way() -> None:
    wider = replace(SPEC, shadow=ShadowSpec(50, 100, 3600))
    changed = decide(wider, shadowing(), "rev", NOW, measured(shadow_report(150, "better", shadow=20)))
    assert changed.action == "hold" and changed.state.shadow_percent == 50 and changed.state.applied_at is None
    assert "apply weight 0 and shadow 50%" in changed.reason
    skipped = decide(replace(SPEC, shadow=None), shadowing(), "rev", NOW)
    assert (skipped.action, skipped.weight, skipped.state.shadow.outcome) == ("advance", 10, CANCELLED)
    assert "spec.rollout.shadow removed" in skipped.reason


def test_a_restart_mid_stage_resumes_it_from_status() -> None:
    held = decide(SPEC, shadowing(failures=1), "rev", NOW, measured(shadow_report(150, "worse")))
    status = rollout_status(held, {}, NOW)
    assert status["phase"] == SHADOWING and status["failedAnalyses"] == 2
    assert status["shadow"] == {"percent": 20, "outcome": RUNNING, "pairs": 150, "verdict": "worse",
                                "basis": held.state.shadow.basis}
    restored = RolloutState.from_status(status)
    assert restored == held.state
    again = decide(SPEC, restored, "rev", NOW + 30, measured(shadow_report(160, "worse")))
    assert again.action == "rollback" and again.state.failures == 3


def test_a_rollout_without_a_shadow_stage_writes_no_shadow_status() -> None:
    start = decide(replace(SPEC, shadow=None), RolloutState(), "rev", NOW)
    assert start.state.phase == PROGRESSING and "shadow" not in start.state.to_status()
    assert start.state.shadow_percent == 0


@pytest.mark.parametrize("shadow, message", [
    (5, "spec.rollout.shadow: must be an object"),
    ({"percent": 0}, "spec.rollout.shadow.percent: must be above 0"),
    ({"percent": 101}, r"spec.rollout.shadow.percent: 101 is outside \[0, 100\]"),
    ({"percent": "all"}, "spec.rollout.shadow.percent: must be a number"),
    ({"minPairs": 0}, r"spec.rollout.shadow.minPairs: 0 is outside \[1, inf\]"),
    ({"minPairs": 2.5}, "spec.rollout.shadow.minPairs: must be a whole number"),
    ({"maxDurationSeconds": 0}, r"spec.rollout.shadow.maxDurationSeconds: 0 is outside"),
])
def test_bad_shadow_specs_name_the_field(shadow, message) -> None:
    with pytest.raises(ValueError, match=message):
        RolloutSpec.from_spec({"shadow": shadow})


def test_shadow_defaults_and_the_revision() -> None:
    assert RolloutSpec.from_spec({"shadow": {}}).shadow == ShadowSpec(100, 100, 3600)
    assert RolloutSpec.from_spec({}).shadow is None
    spec = {"mode": "standalone", "router": {"weight": 0}, "rollout": {"steps": [5, 100]}}
    # The stage's settings and the manual mirroring share are switches, not what is rolled out.
    assert revision(spec) == revision({**spec, "router": {"weight": 0, "shadowPercent": 30},
                                       "rollout": {**spec["rollout"], "shadow": {"percent": 10}}})
