"""``decide``: (spec, state in status, measurement, now) -> ``Decision``: start, advance, promote,
hold, roll back, abort, or wait. Pure, and the only place rollout policy lives.

At one step::

    weight written ──► sidecars report it (router.baton_weight) ──► baseline: per sidecar, its cursor
        and request/error totals
        ──► every interval: each sidecar's outcomes since its cursor, pooled (step_view);
            requests since the baseline >= minSamplesPerArm? ──► gates (evaluate)
            pass (and pauseSeconds over, and approved) ─► next step (100: Promoted)
            fail ─► failures += 1 ─► failureThreshold reached: weight 0, RolledBack
            inconclusive ─► hold

``decide`` reads as that table: the first rule that applies picks one small function per phase
(``_abort``, ``_start``, ``_pause``, ``_apply_weight``, ``_analyse`` and what follows an analysis:
``_failed``, ``_passed``). ``wants_measurement`` tells the caller whether reports are worth gathering.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from baton_operator.rollout.gates import FAIL, WAIT, Check, evaluate
from baton_operator.rollout.measurement import Baseline, Measurement, StepView, step_view
from baton_operator.rollout.spec import RolloutSpec
from baton_operator.rollout.state import (ABORTED, ACTIVE_PHASES, AWAITING_APPROVAL, FINAL_PHASES, PAUSED,
                                          PROGRESSING, PROMOTED, ROLLED_BACK, RolloutState, start_step)
from baton_operator.rollout.times import iso

Event = tuple[str, str, str]  # (type, reason, message)


@dataclass(frozen=True)
class Decision:
    action: str  # start, advance, promote, rollback, abort, hold, wait
    state: RolloutState
    reason: str
    checks: tuple[Check, ...] = ()
    measurement: Measurement | None = None
    event: Event | None = None
    view: StepView | None = None  # the step's figures the checks judged

    @property
    def weight(self) -> float:
        return self.state.weight if self.state.weight is not None else 0


def wants_measurement(spec: RolloutSpec, state: RolloutState, rev: str, now: float) -> bool:
    """Whether ``decide`` can use fresh reports now (the caller gathers only then: reports cost CPU)."""
    if spec.abort or spec.paused or state.revision != rev or state.phase not in ACTIVE_PHASES:
        return False
    if state.applied_at is None or state.last_analysis_at is None:
        return True  # waiting for the sidecars to apply the weight: look at every tick
    return now - state.last_analysis_at >= spec.interval_s


def decide(spec: RolloutSpec, state: RolloutState, rev: str, now: float,
           m: Measurement | None = None) -> Decision:
    """The next rollout state; pure. ``m`` is None when nothing was gathered (see ``wants_measurement``)."""
    if spec.abort:
        return _abort(state, rev, now)
    if state.revision != rev or state.phase is None or state.phase == ABORTED:
        return _start(spec, state, rev, now)
    if state.phase in FINAL_PHASES:
        return _wait(state)
    if spec.paused:
        return _pause(state)
    if state.phase == PAUSED:
        state = replace(state, phase=PROGRESSING, message=f"resumed at {state.weight}%")
    if m is None:
        return _wait(state)
    if m.problem is not None:
        return _hold(state, f"holding at {state.weight}%: {m.problem}", m)
    if state.applied_at is None or state.baseline is None:
        return _apply_weight(state, m, now)
    return _analyse(spec, state, state.baseline, m, now)


def _wait(state: RolloutState) -> Decision:
    return Decision("wait", state, state.message)


def _hold(state: RolloutState, msg: str, m: Measurement | None = None, event: Event | None = None) -> Decision:
    return Decision("hold", replace(state, message=msg), msg, measurement=m, event=event)


def _abort(state: RolloutState, rev: str, now: float) -> Decision:
    if state.phase == ABORTED and state.weight == 0 and state.revision == rev:
        return _wait(state)
    msg = "aborted by spec.rollout.abort: all traffic back to the incumbent"
    new = replace(start_step(state, state.step, 0, ABORTED, "abort", msg, now), revision=rev)
    return Decision("abort", new, msg, event=("Warning", "RolloutAborted", msg))


def _start(spec: RolloutSpec, state: RolloutState, rev: str, now: float) -> Decision:
    """A new revision (or the first look, or the first after an abort) starts at the first step."""
    first = spec.steps[0]
    phase = PROMOTED if first == 100 else PROGRESSING
    again = " again" if state.phase == ABORTED and state.revision == rev else ""
    msg = f"rollout started{again}: step 1 of {len(spec.steps)}, {first}% to Baton"
    new = replace(start_step(state, 0, first, phase, "start", msg, now), revision=rev)
    return Decision("start", new, msg, event=("Normal", "RolloutStarted", msg))


def _pause(state: RolloutState) -> Decision:
    if state.phase == PAUSED:
        return _wait(state)
    msg = f"paused by spec.rollout.paused at {state.weight}%"
    return _hold(replace(state, phase=PAUSED), msg, event=("Normal", "RolloutPaused", msg))


def _apply_weight(state: RolloutState, m: Measurement, now: float) -> Decision:
    """Hold until every sidecar reports the step's weight; then take the baseline the step counts from."""
    stale = [w for w in m.weights if w != state.weight]
    if stale:
        return _hold(state, f"waiting for {len(stale)} of {m.pods} sidecars to apply weight {state.weight}% "
                            f"(they report {sorted(set(stale))})", m)
    msg = f"{state.weight}% applied by {m.pods} sidecar(s); collecting samples"
    return _hold(replace(state, applied_at=now, baseline=Baseline.of(m), last_analysis_at=now), msg, m)


@dataclass(frozen=True)
class _Analysis:
    """One analysis of the step: what every decision taken on it carries."""

    checks: tuple[Check, ...]
    measurement: Measurement
    view: StepView
    at: str  # where the rollout stands, for messages: "step 2 of 4 (25%)"

    def decision(self, action: str, state: RolloutState, msg: str, event: Event | None = None) -> Decision:
        return Decision(action, state, msg, self.checks, self.measurement, event, self.view)


def _analyse(spec: RolloutSpec, state: RolloutState, baseline: Baseline, m: Measurement, now: float) -> Decision:
    view = step_view(m, baseline)
    if not view.counted:
        msg = (f"none of the {m.pods} sidecar(s) is known since the step's start (new, restarted, or their "
               f"counters went back); collecting samples again")
        return _hold(replace(state, baseline=view.baseline, applied_at=now, last_analysis_at=now), msg, m)
    weight: float = state.weight  # type: ignore[assignment]  (set when the step started)
    a = _Analysis(tuple(evaluate(spec, weight, view.arms)), m, view,
                  f"step {state.step + 1} of {len(spec.steps)} ({weight}%)")
    state = replace(state, last_analysis_at=now, baseline=view.baseline)
    failed = [c for c in a.checks if c.result == FAIL]
    if failed:
        return _failed(spec, state, a, failed, now)
    waiting = [c for c in a.checks if c.result == WAIT]
    if waiting:
        msg = f"holding at {a.at}: " + "; ".join(f"{c.name} inconclusive: {c.detail}" for c in waiting)
        return a.decision("hold", replace(state, message=msg), msg)
    return _passed(spec, replace(state, failures=0), a, now)


def _failed(spec: RolloutSpec, state: RolloutState, a: _Analysis, failed: list[Check], now: float) -> Decision:
    """One more failed analysis; at ``failureThreshold`` in a row, weight 0 and RolledBack."""
    failures = state.failures + 1
    why = "; ".join(f"{c.name}: {c.detail}" for c in failed)
    if failures >= spec.failure_threshold:
        msg = f"rolled back after {failures} failed analyses at {a.at}: {why}"
        new = replace(start_step(state, state.step, 0, ROLLED_BACK, "rollback", msg, now), failures=failures)
        return a.decision("rollback", new, msg, ("Warning", "RolledBack", msg))
    msg = f"analysis failed ({failures} of {spec.failure_threshold}) at {a.at}: {why}"
    return a.decision("hold", replace(state, failures=failures, message=msg), msg, ("Warning", "AnalysisFailed", msg))


def _passed(spec: RolloutSpec, state: RolloutState, a: _Analysis, now: float) -> Decision:
    """Every gate passed: on to the next step once ``pauseSeconds`` are over and any manual gate approved."""
    assert state.applied_at is not None  # decide analyses a step only once its weight was applied
    if now - state.applied_at < spec.pause_s:
        msg = f"analysis passed at {a.at}; pausing until {iso(state.applied_at + spec.pause_s)} (pauseSeconds)"
        return a.decision("hold", replace(state, message=msg), msg)
    nxt = spec.steps[state.step + 1]
    if nxt in spec.manual_gates and spec.approved_weight < nxt:
        msg = (f"analysis passed at {a.at}; awaiting approval to go to {nxt}% "
               f"(set spec.rollout.approvedWeight to {nxt} or more)")
        event = None if state.phase == AWAITING_APPROVAL else ("Normal", "RolloutAwaitingApproval", msg)
        return a.decision("hold", replace(state, phase=AWAITING_APPROVAL, message=msg), msg, event)
    if nxt == 100:
        msg = f"promoted: analysis passed at {a.at}; all traffic to Baton"
        new = start_step(state, state.step + 1, 100, PROMOTED, "promote", msg, now)
        return a.decision("promote", new, msg, ("Normal", "RolloutPromoted", msg))
    msg = f"analysis passed at {a.at}; advanced to step {state.step + 2} of {len(spec.steps)} ({nxt}%)"
    new = start_step(state, state.step + 1, nxt, PROGRESSING, "advance", msg, now)
    return a.decision("advance", new, msg, ("Normal", "RolloutAdvanced", msg))
