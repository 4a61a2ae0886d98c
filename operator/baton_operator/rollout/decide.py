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

With ``spec.rollout.shadow`` a shadow stage comes first::

    weight 0, shadow_percent written ──► sidecars report weight 0 (and the share, if they say)
        ──► every interval: each sidecar's paired block, the most cautious verdict (PairedView)
            pairs >= minPairs and better / not_worse ─► the first step (the normal steps follow)
            worse ─► failures += 1 ─► failureThreshold reached: shadow 0, weight 0, RolledBack
            maxDurationSeconds since the stage started without a pass ─► RolledBack

``decide`` reads as that table: the first rule that applies picks one small function per phase
(``_abort``, ``_start``, ``_pause``, ``_shadow``, ``_apply_weight``, ``_analyse`` and what follows an
analysis: ``_failed``, ``_passed``; the shadow stage's ``_enter_first_step``, ``_shadow_ran_out``).
``wants_measurement`` tells the caller whether reports are worth gathering.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from baton_operator.rollout.gates import FAIL, PASS, WAIT, Check, evaluate, shadow_check
from baton_operator.rollout.measurement import Baseline, Measurement, StepView, step_view
from baton_operator.rollout.paired import PairedView
from baton_operator.rollout.spec import RolloutSpec
from baton_operator.rollout.state import (ABORTED, ACTIVE_PHASES, AWAITING_APPROVAL, CANCELLED, FAILED, FINAL_PHASES,
                                          PASSED, PAUSED, PROGRESSING, PROMOTED, ROLLED_BACK, SHADOWING, RolloutState,
                                          ShadowState, end_shadow, start_step)
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
    paired: PairedView | None = None  # the shadow stage's: the sidecars' paired verdicts it judged

    @property
    def weight(self) -> float:
        return self.state.weight if self.state.weight is not None else 0

    @property
    def shadow_percent(self) -> float:
        return self.state.shadow_percent


def wants_measurement(spec: RolloutSpec, state: RolloutState, rev: str, now: float) -> bool:
    """Whether ``decide`` can use fresh reports now (the caller gathers only then: reports cost CPU)."""
    if spec.abort or spec.paused or state.revision != rev or state.phase not in ACTIVE_PHASES:
        return False
    if state.applied_at is None or state.last_analysis_at is None:
        return True  # waiting for the sidecars to apply the weight: look at every tick
    if state.shadowing and _shadow_overdue(spec, state, now):
        return True  # one last look before the stage runs out
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
        resumed = SHADOWING if state.shadowing else PROGRESSING
        state = replace(state, phase=resumed, message=f"resumed at {_where(state)}")
    if state.shadowing:
        return _shadow(spec, state, now, m)
    if m is None:
        return _wait(state)
    if m.problem is not None:
        return _hold(state, f"holding at {state.weight}%: {m.problem}", m)
    if state.applied_at is None or state.baseline is None:
        return _apply_weight(state, m, now)
    return _analyse(spec, state, state.baseline, m, now)


def _where(state: RolloutState) -> str:
    return f"the shadow stage ({state.shadow_percent:g}% mirrored)" if state.shadowing else f"{state.weight}%"


def _wait(state: RolloutState) -> Decision:
    return Decision("wait", state, state.message)


def _hold(state: RolloutState, msg: str, m: Measurement | None = None, event: Event | None = None) -> Decision:
    return Decision("hold", replace(state, message=msg), msg, measurement=m, event=event)


def _abort(state: RolloutState, rev: str, now: float) -> Decision:
    if state.phase == ABORTED and state.weight == 0 and state.revision == rev:
        return _wait(state)
    msg = "aborted by spec.rollout.abort: all traffic back to the incumbent"
    new = replace(end_shadow(start_step(state, state.step, 0, ABORTED, "abort", msg, now), CANCELLED), revision=rev)
    return Decision("abort", new, msg, event=("Warning", "RolloutAborted", msg))


def _start(spec: RolloutSpec, state: RolloutState, rev: str, now: float) -> Decision:
    """A new revision (or the first look, or the first after an abort) starts at the shadow stage if
    there is one, else at the first step."""
    again = " again" if state.phase == ABORTED and state.revision == rev else ""
    if spec.shadow is not None:
        percent = spec.shadow.percent
        msg = (f"rollout started{again}: shadow stage, {percent:g}% of the incumbent's requests mirrored to Baton "
               f"(weight 0) until {spec.shadow.min_pairs} pairs give a verdict")
        new = start_step(state, 0, 0, SHADOWING, "start", msg, now, shadow_percent=percent)
        return Decision("start", replace(new, revision=rev, shadow=ShadowState(percent)), msg,
                        event=("Normal", "RolloutStarted", msg))
    first = spec.steps[0]
    phase = PROMOTED if first == 100 else PROGRESSING
    msg = f"rollout started{again}: step 1 of {len(spec.steps)}, {first}% to Baton"
    new = replace(start_step(state, 0, first, phase, "start", msg, now), revision=rev, shadow=None)
    return Decision("start", new, msg, event=("Normal", "RolloutStarted", msg))


def _pause(state: RolloutState) -> Decision:
    if state.phase == PAUSED:
        return _wait(state)
    msg = f"paused by spec.rollout.paused at {_where(state)}"
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
    view: StepView | None  # the weighted steps' figures
    at: str  # where the rollout stands, for messages: "step 2 of 4 (25%)"
    paired: PairedView | None = None  # the shadow stage's figures

    def decision(self, action: str, state: RolloutState, msg: str, event: Event | None = None) -> Decision:
        return Decision(action, state, msg, self.checks, self.measurement, event, self.view, self.paired)


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
    """One more failed analysis; at ``failureThreshold`` since the last passing one (inconclusive
    analyses neither add nor reset, as Flagger counts failed checks), weight 0 and RolledBack."""
    failures = state.failures + 1
    why = "; ".join(f"{c.name}: {c.detail}" for c in failed)
    if failures >= spec.failure_threshold:
        msg = f"rolled back after {failures} failed analyses at {a.at}: {why}"
        new = replace(end_shadow(start_step(state, state.step, 0, ROLLED_BACK, "rollback", msg, now), FAILED),
                      failures=failures)
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


# --- the shadow stage ------------------------------------------------------------------------------

def _shadow_overdue(spec: RolloutSpec, state: RolloutState, now: float) -> bool:
    """``maxDurationSeconds`` since the stage started (paused time counts)."""
    limit = spec.shadow.max_duration_s if spec.shadow is not None else 0
    return now - (state.step_started_at if state.step_started_at is not None else now) >= limit


def _shadow(spec: RolloutSpec, state: RolloutState, now: float, m: Measurement | None) -> Decision:
    """Weight 0, mirroring on: wait for the sidecars to apply it, then judge their paired verdicts every
    interval until they pass (the first step), fail (``_failed``) or the stage runs out of time."""
    assert state.shadow is not None  # state.shadowing
    if spec.shadow is None:  # removed mid-stage: the user skips the gate
        return _enter_first_step(spec, end_shadow(state, CANCELLED), now, "spec.rollout.shadow removed", None)
    if state.shadow.percent != spec.shadow.percent:  # changed mid-stage: the sidecars apply the new share
        state = replace(state, shadow=replace(state.shadow, percent=spec.shadow.percent), applied_at=None)
    percent = state.shadow.percent
    overdue = _shadow_overdue(spec, state, now)
    if m is None or m.problem is not None:
        if overdue:
            sh = state.shadow
            last = f"last verdict {sh.verdict} on {sh.pairs} pairs" if sh.verdict else "no verdict yet"
            return _shadow_ran_out(spec, state, now, f"{m.problem if m else 'no reports read'}; {last}", m)
        return _wait(state) if m is None else _hold(state, f"holding the shadow stage: {m.problem}", m)
    if state.applied_at is None:
        stale = [r for r in m.reports if r.weight != 0 or r.shadow_percent not in (None, percent)]
        waiting = f"{len(stale)} of {m.pods} sidecars to apply weight 0 and shadow {percent:g}%"
        if overdue:
            return _shadow_ran_out(spec, state, now, f"no pairs judged; waited for {waiting}", m)
        if stale:
            return _hold(state, f"waiting for {waiting}", m)
        msg = f"shadow {percent:g}% applied by {m.pods} sidecar(s); collecting pairs"
        return _hold(replace(state, applied_at=now, last_analysis_at=now), msg, m)
    view = PairedView.of({r.url: r.paired for r in m.reports})
    check = shadow_check(view, spec.shadow.min_pairs)
    state = replace(state, last_analysis_at=now,
                    shadow=replace(state.shadow, pairs=view.pairs, verdict=view.verdict, basis=view.basis))
    a = _Analysis((check,), m, None, _where(state), view)
    if check.result == PASS:
        msg = f"shadow stage passed: {check.detail}"
        return _enter_first_step(spec, replace(end_shadow(state, PASSED), failures=0), now, msg, a)
    if overdue:
        return _shadow_ran_out(spec, state, now, check.detail, m, a)
    if check.result == FAIL:
        return _failed(spec, state, a, [check], now)
    msg = f"holding at {a.at}: {check.name} inconclusive: {check.detail}"
    return a.decision("hold", replace(state, message=msg), msg)


def _enter_first_step(spec: RolloutSpec, state: RolloutState, now: float, why: str, a: _Analysis | None) -> Decision:
    """From the shadow stage to the first weighted step (at once Promoted when it is 100)."""
    first = spec.steps[0]
    action, phase = ("promote", PROMOTED) if first == 100 else ("advance", PROGRESSING)
    msg = f"{why}; step 1 of {len(spec.steps)}, {first}% to Baton"
    new = start_step(state, 0, first, phase, action, msg, now)
    event = ("Normal", "ShadowPassed" if a is not None else "RolloutAdvanced", msg)
    return a.decision(action, new, msg, event) if a is not None else Decision(action, new, msg, event=event)


def _shadow_ran_out(spec: RolloutSpec, state: RolloutState, now: float, detail: str, m: Measurement | None,
                    a: _Analysis | None = None) -> Decision:
    """No passing verdict within ``maxDurationSeconds``: mirroring off, weight 0, RolledBack."""
    limit = spec.shadow.max_duration_s if spec.shadow is not None else 0
    msg = (f"rolled back: no passing paired verdict within maxDurationSeconds ({limit:g} s) of the shadow "
           f"stage: {detail}")
    new = end_shadow(start_step(state, state.step, 0, ROLLED_BACK, "rollback", msg, now), FAILED)
    event = ("Warning", "RolledBack", msg)
    return a.decision("rollback", new, msg, event) if a is not None else Decision("rollback", new, msg,
                                                                                      measurement=m, event=event)
