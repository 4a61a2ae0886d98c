"""Progressive rollout: step Baton's traffic weight from the sidecars' A/B reports.

One analysis per ``analysisIntervalSeconds`` reads every sidecar's ``GET /ab/report``, merges the pods
into one ``Measurement`` and judges it against the gates; ``decide`` turns (spec, state in status,
measurement, now) into a ``Decision``: advance, promote, hold or roll back. Everything except the
gathering at the bottom is pure: the state lives in ``status.rollout`` (``RolloutState``), so an
operator restarted mid-rollout resumes at the same step.

At one step::

    weight written ──► sidecars report it (router.baton_weight) ──► baseline counts taken
        ──► every interval: samples since baseline >= minSamplesPerArm? ──► gates
            pass (and pauseSeconds over, and approved) ─► next step (100: Promoted)
            fail ─► failures += 1 ─► failureThreshold reached: weight 0, RolledBack
            inconclusive ─► hold

Latency gates compare p95 with the confidence intervals the sidecars report: Baton passes when the
upper bound of the 95% CI of ``p95(baton) - p95(incumbent)`` is within the margin
(``margin% x p95(incumbent)``), fails when even the lower bound exceeds it, else the analysis is
inconclusive. A margin of 0 asks Baton to be demonstrably no slower.

Merging pods: the sidecar reports percentiles and their bootstrap CIs, not raw samples, so a merged
p95 is the sample-weighted mean of the pods' p95s (exact for one pod; consistent when the Service
spreads traffic evenly), and its CI half-widths combine as independent errors:
``sqrt(sum((w_i * half_i)^2))``. The CI of the difference combines the arms' half-widths the same way.
Request and error counts are totals since each sidecar started, so per-step counts are differences
from the baseline; latency percentiles and SLA attainment cover each sidecar's recent window
(``/ab/report``'s ``window`` outcomes per arm), which may reach back into earlier steps.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import math
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

from baton_operator import resources as res
from baton_operator.policy import policy_hash

ARMS = ("baton", "incumbent")

PROGRESSING, PAUSED, AWAITING_APPROVAL = "Progressing", "Paused", "AwaitingApproval"
PROMOTED, ROLLED_BACK, ABORTED = "Promoted", "RolledBack", "Aborted"
ACTIVE_PHASES = (PROGRESSING, PAUSED, AWAITING_APPROVAL)

PASS, FAIL, WAIT, SKIP = "pass", "fail", "inconclusive", "skipped"

HISTORY_LIMIT = 20  # weight changes kept in status.rollout.history
CHANGES_LIMIT = 20  # auto-tune changes kept in status.rollout.autoTune.changes
Z95 = 1.959963984540054

DEFAULT_STEPS = (5, 10, 25, 50, 100)


# --- spec ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gates:
    p95_margin_pct: float = 10.0  # Baton's p95 e2e latency may exceed the incumbent's by this much
    ttft_margin_pct: float = 10.0
    max_error_rate: float = 0.01  # Baton's errors / requests during the step
    min_sla_attainment: float | None = None  # None: not checked


@dataclass(frozen=True)
class Bounds:
    low: float
    high: float


@dataclass(frozen=True)
class AutoTuneSpec:
    """Nudges ``padding.max_padding_ratio`` within bounds.

    ``padding.compaction_threshold`` is not tuned: it compares live KV slots with the allocated cache
    buffers (memory), not the batch's padding, so the padding ratio says nothing about it.
    ``spec.rollout.autoTune.compactionThreshold`` is still accepted, and ignored.
    """

    enabled: bool = False
    max_padding_ratio: Bounds = Bounds(0.6, 0.95)
    step: float = 0.05
    min_throughput_change: float = 0.05  # a nudge that cost more throughput than this is reverted


@dataclass(frozen=True)
class RolloutSpec:
    steps: tuple[int, ...] = DEFAULT_STEPS  # ascending, unique, always ending at 100
    pause_s: float = 0.0
    interval_s: float = 60.0
    min_samples: int = 50
    gates: Gates = Gates()
    failure_threshold: int = 3
    paused: bool = False
    abort: bool = False
    manual_gates: frozenset[int] = frozenset()  # steps that need approvedWeight >= step to enter
    approved_weight: int = 0
    attempt: int = 0
    auto_tune: AutoTuneSpec = AutoTuneSpec()

    @classmethod
    def from_spec(cls, rollout: Mapping[str, Any] | None) -> "RolloutSpec":
        """Parse ``spec.rollout`` (camelCase), filling defaults; ``ValueError`` names the bad field."""
        r = dict(rollout or {})
        steps = [_number("steps", s, 0, 100) for s in r.get("steps") or DEFAULT_STEPS]
        if any(b < a for a, b in zip(steps, steps[1:])):
            raise ValueError("spec.rollout.steps: must be in ascending order")
        unique = tuple(dict.fromkeys(int(s) for s in steps))
        if unique[-1] != 100:
            unique += (100,)
        g = dict(r.get("gates") or {})
        gates = Gates(
            p95_margin_pct=_number("gates.p95LatencyMarginPct", g.get("p95LatencyMarginPct", 10.0), 0, 1000),
            ttft_margin_pct=_number("gates.ttftMarginPct", g.get("ttftMarginPct", 10.0), 0, 1000),
            max_error_rate=_number("gates.maxErrorRate", g.get("maxErrorRate", 0.01), 0, 1),
            min_sla_attainment=(None if g.get("minSlaAttainment") is None else
                                _number("gates.minSlaAttainment", g["minSlaAttainment"], 0, 1)))
        return cls(
            steps=unique,
            pause_s=_number("pauseSeconds", r.get("pauseSeconds", 0), 0, None),
            interval_s=_number("analysisIntervalSeconds", r.get("analysisIntervalSeconds", 60), 0.001, None),
            min_samples=int(_number("minSamplesPerArm", r.get("minSamplesPerArm", 50), 1, None)),
            gates=gates,
            failure_threshold=int(_number("failureThreshold", r.get("failureThreshold", 3), 1, None)),
            paused=bool(r.get("paused", False)),
            abort=bool(r.get("abort", False)),
            manual_gates=frozenset(int(_number("manualGates", w, 0, 100)) for w in r.get("manualGates") or ()),
            approved_weight=int(_number("approvedWeight", r.get("approvedWeight", 0), 0, 100)),
            attempt=int(_number("attempt", r.get("attempt", 0), 0, None)),
            auto_tune=_auto_tune(r.get("autoTune") or {}),
        )


def _number(name: str, value: Any, low: float | None, high: float | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"spec.rollout.{name}: must be a number, not {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"spec.rollout.{name}: {value} is outside [{low}, {high if high is not None else 'inf'}]")
    return value


def _auto_tune(t: Mapping[str, Any]) -> AutoTuneSpec:
    d = AutoTuneSpec()

    def bounds(key: str, default: Bounds) -> Bounds:
        b = t.get(key) or {}
        low = _number(f"autoTune.{key}.min", b.get("min", default.low), 0, 1)
        high = _number(f"autoTune.{key}.max", b.get("max", default.high), 0, 1)
        if low > high:
            raise ValueError(f"spec.rollout.autoTune.{key}: min {low} is above max {high}")
        return Bounds(low, high)

    return AutoTuneSpec(
        enabled=bool(t.get("enabled", False)),
        max_padding_ratio=bounds("maxPaddingRatio", d.max_padding_ratio),
        step=_number("autoTune.stepSize", t.get("stepSize", d.step), 0.001, 0.5),
        min_throughput_change=d.min_throughput_change,
    )


def revision(spec: Mapping[str, Any]) -> str:
    """What is being rolled out: the BatonDeployment's spec without the rollout's own switches, plus the
    steps and ``attempt``. A new revision starts the rollout again from the first step."""
    candidate = {k: v for k, v in spec.items() if k != "rollout"}
    router = {k: v for k, v in (candidate.get("router") or {}).items() if k != "weight"}
    candidate["router"] = router
    rollout = spec.get("rollout") or {}
    candidate["rollout"] = {"steps": list(rollout.get("steps") or DEFAULT_STEPS), "attempt": rollout.get("attempt", 0)}
    return policy_hash(candidate)


# --- time ---------------------------------------------------------------------------------------

def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def from_iso(s: Any) -> float | None:
    if not isinstance(s, str) or not s:
        return None
    try:
        return float(calendar.timegm(time.strptime(s[:19], "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return None


# --- measurements -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Estimate:
    """A percentile with its 95% confidence interval (seconds) and the samples behind it."""

    value: float
    low: float
    high: float
    n: int

    def to_status(self) -> dict[str, Any]:
        return {"value": round(self.value, 6), "ci95": [round(self.low, 6), round(self.high, 6)], "n": self.n}


@dataclass(frozen=True)
class Arm:
    requests: int = 0  # totals since each sidecar started, summed over pods
    errors: int = 0
    e2e_p95: Estimate | None = None  # over the sidecars' recent windows
    ttft_p95: Estimate | None = None
    sla_evaluated: int = 0
    sla_met: int = 0

    @property
    def sla_attainment(self) -> float | None:
        return self.sla_met / self.sla_evaluated if self.sla_evaluated else None


@dataclass(frozen=True)
class Measurement:
    """All sidecars' reports merged; ``problem`` set when they could not all be read."""

    pods: int
    weights: tuple[float, ...] = ()  # router.baton_weight as each sidecar applies it
    arms: Mapping[str, Arm] = field(default_factory=lambda: {a: Arm() for a in ARMS})
    problem: str | None = None

    @classmethod
    def failed(cls, problem: str, pods: int = 0) -> "Measurement":
        return cls(pods=pods, problem=problem)


def merge_estimates(parts: Sequence[Mapping[str, Any]]) -> Estimate | None:
    """Merge one percentile summary per pod (``{"n", "p95": {"value", "ci95"}}``) into one estimate."""
    parts = [p for p in parts if p and p.get("n") and isinstance(p.get("p95"), Mapping)]
    total = sum(int(p["n"]) for p in parts)
    if not total:
        return None
    value = low2 = high2 = 0.0
    for p in parts:
        w = int(p["n"]) / total
        v = float(p["p95"]["value"])
        lo, hi = (float(x) for x in p["p95"].get("ci95") or (v, v))
        value += w * v
        low2 += (w * (v - lo)) ** 2
        high2 += (w * (hi - v)) ** 2
    return Estimate(value, value - math.sqrt(low2), value + math.sqrt(high2), total)


def merge_reports(reports: Sequence[Mapping[str, Any]]) -> Measurement:
    """One ``Measurement`` from every pod's ``/ab/report`` (see the module docstring for the method)."""
    if not reports:
        return Measurement.failed("no sidecar to read /ab/report from")
    arms = {}
    for arm in ARMS:
        entries = [((r.get("arms") or {}).get(arm) or {}) for r in reports]
        arms[arm] = Arm(
            requests=sum(int(e.get("count") or 0) for e in entries),
            errors=sum(int(e.get("errors") or 0) for e in entries),
            e2e_p95=merge_estimates([e.get("e2e_s") or {} for e in entries]),
            ttft_p95=merge_estimates([e.get("ttft_s") or {} for e in entries]),
            sla_evaluated=sum(int((e.get("sla") or {}).get("evaluated") or 0) for e in entries),
            sla_met=sum(int((e.get("sla") or {}).get("met") or 0) for e in entries),
        )
    weights = tuple(float((r.get("router") or {}).get("baton_weight", -1)) for r in reports)
    return Measurement(pods=len(reports), weights=weights, arms=arms)


# --- the gates ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    name: str
    result: str  # PASS, FAIL, WAIT (inconclusive) or SKIP
    detail: str

    def to_status(self) -> dict[str, Any]:
        return {"name": self.name, "result": self.result, "detail": self.detail}


@dataclass(frozen=True)
class Counts:
    """Request and error totals per arm at the start of a step (the baseline of per-step counts)."""

    requests: Mapping[str, int]
    errors: Mapping[str, int]

    @classmethod
    def of(cls, m: Measurement) -> "Counts":
        return cls({a: m.arms[a].requests for a in ARMS}, {a: m.arms[a].errors for a in ARMS})

    def to_status(self) -> dict[str, Any]:
        return {arm: {"requests": self.requests[arm], "errors": self.errors[arm]} for arm in ARMS}

    @classmethod
    def from_status(cls, data: Any) -> "Counts | None":
        if not isinstance(data, Mapping) or not all(isinstance(data.get(a), Mapping) for a in ARMS):
            return None
        return cls({a: int(data[a].get("requests") or 0) for a in ARMS},
                   {a: int(data[a].get("errors") or 0) for a in ARMS})


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def latency_check(name: str, baton: Estimate | None, incumbent: Estimate | None, margin_pct: float,
                  min_samples: int) -> Check:
    """Pass when the CI of p95(baton) - p95(incumbent) lies within the margin, fail when it lies beyond."""
    if baton is None or incumbent is None or min(baton.n, incumbent.n) < min_samples:
        nb, ni = (baton.n if baton else 0), (incumbent.n if incumbent else 0)
        return Check(name, WAIT, f"too few latency samples (baton {nb}, incumbent {ni}, need {min_samples})")
    allowed = incumbent.value * margin_pct / 100.0
    diff = baton.value - incumbent.value
    upper = diff + math.hypot(baton.high - baton.value, incumbent.value - incumbent.low)
    lower = diff - math.hypot(baton.value - baton.low, incumbent.high - incumbent.value)
    detail = (f"p95 baton {_ms(baton.value)} [{_ms(baton.low)}, {_ms(baton.high)}], incumbent "
              f"{_ms(incumbent.value)} [{_ms(incumbent.low)}, {_ms(incumbent.high)}]; difference "
              f"{_ms(diff)}, 95% CI [{_ms(lower)}, {_ms(upper)}]; allowed +{_ms(allowed)} ({margin_pct:g}%)")
    if upper <= allowed:
        return Check(name, PASS, detail)
    if lower > allowed:
        return Check(name, FAIL, detail)
    return Check(name, WAIT, detail)


def evaluate(spec: RolloutSpec, weight: float, m: Measurement, baseline: Counts) -> list[Check]:
    """The gates for one analysis; requests and errors count from ``baseline`` (the step's start)."""
    if weight <= 0:
        return [Check("traffic", SKIP, "no traffic goes to Baton at 0%; nothing to compare")]
    new = {a: m.arms[a].requests - baseline.requests[a] for a in ARMS}
    samples = Check("samples", PASS if min(new.values()) >= spec.min_samples else WAIT,
                    f"requests this step: baton {new['baton']}, incumbent {new['incumbent']} "
                    f"(need {spec.min_samples} per arm)")
    if samples.result != PASS:
        return [samples]
    checks = [samples]
    errors = m.arms["baton"].errors - baseline.errors["baton"]
    rate = errors / new["baton"]
    checks.append(Check("errorRate", PASS if rate <= spec.gates.max_error_rate else FAIL,
                        f"baton error rate {rate:.2%} ({errors} of {new['baton']}); "
                        f"allowed {spec.gates.max_error_rate:.2%}"))
    b, i = m.arms["baton"], m.arms["incumbent"]
    checks.append(latency_check("p95Latency", b.e2e_p95, i.e2e_p95, spec.gates.p95_margin_pct, spec.min_samples))
    if b.ttft_p95 and i.ttft_p95 and min(b.ttft_p95.n, i.ttft_p95.n) >= spec.min_samples:
        checks.append(latency_check("ttft", b.ttft_p95, i.ttft_p95, spec.gates.ttft_margin_pct, spec.min_samples))
    else:
        checks.append(Check("ttft", SKIP, "too few time-to-first-token samples to compare (the incumbent's "
                                          "TTFT is known only for streamed responses)"))
    if spec.gates.min_sla_attainment is not None:
        checks.append(sla_check(b, i, spec.gates.min_sla_attainment, spec.min_samples))
    return checks


def sla_check(baton: Arm, incumbent: Arm, minimum: float, min_samples: int) -> Check:
    """Baton meets ``minimum``, or does at least as well as the incumbent (the floor is then out of reach
    for the workload, not for Baton)."""
    if baton.sla_evaluated < min_samples:
        return Check("slaAttainment", WAIT, f"{baton.sla_evaluated} Baton requests judged against an SLA "
                                            f"(need {min_samples}; requests need an sla_class with targets)")
    att_b, att_i = baton.sla_attainment, incumbent.sla_attainment
    vs = f", incumbent {att_i:.1%}" if att_i is not None else ""
    detail = f"SLA attainment baton {att_b:.1%}{vs}; required {minimum:.1%} or at least the incumbent's"
    ok = att_b >= minimum or (incumbent.sla_evaluated >= min_samples and att_i is not None and att_b >= att_i)
    return Check("slaAttainment", PASS if ok else FAIL, detail)


# --- state and decisions ------------------------------------------------------------------------

@dataclass(frozen=True)
class RolloutState:
    """``status.rollout`` as the decision function sees it."""

    revision: str | None = None
    phase: str | None = None
    step: int = 0
    weight: float | None = None
    step_started_at: float | None = None  # when the step's weight was written
    applied_at: float | None = None  # when every sidecar reported the weight (None: not yet)
    baseline: Counts | None = None
    failures: int = 0  # consecutive failed analyses
    last_analysis_at: float | None = None
    message: str = ""
    history: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def from_status(cls, data: Mapping[str, Any] | None) -> "RolloutState":
        d = dict(data or {})
        return cls(
            revision=d.get("revision"), phase=d.get("phase"), step=int(d.get("step") or 0),
            weight=d.get("weight"), step_started_at=from_iso(d.get("stepStartedAt")),
            applied_at=from_iso(d.get("weightAppliedAt")), baseline=Counts.from_status(d.get("baseline")),
            failures=int(d.get("failedAnalyses") or 0), last_analysis_at=from_iso(d.get("lastAnalysisTime")),
            message=d.get("message") or "", history=tuple(d.get("history") or ()))

    def to_status(self) -> dict[str, Any]:
        return {
            "revision": self.revision, "phase": self.phase, "step": self.step, "weight": self.weight,
            "stepStartedAt": iso(self.step_started_at), "weightAppliedAt": iso(self.applied_at),
            "baseline": self.baseline.to_status() if self.baseline else None,
            "failedAnalyses": self.failures, "lastAnalysisTime": iso(self.last_analysis_at),
            "message": self.message, "history": [dict(h) for h in self.history],
        }


Event = tuple[str, str, str]  # (type, reason, message)


@dataclass(frozen=True)
class Decision:
    action: str  # start, advance, promote, rollback, abort, hold, wait
    state: RolloutState
    reason: str
    checks: tuple[Check, ...] = ()
    measurement: Measurement | None = None
    event: Event | None = None
    baseline: Counts | None = None  # what the checks counted from (the step's start)

    @property
    def weight(self) -> float:
        return self.state.weight if self.state.weight is not None else 0

    def analysis_status(self, previous: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """``status.rollout.analysis``: the last analysis (kept from ``previous`` when none ran now)."""
        if not self.checks:
            return dict(previous) if previous else None
        m, base = self.measurement, self.baseline
        arms: dict[str, Any] = {}
        if m is not None and m.problem is None:
            for name in ARMS:
                a = m.arms[name]
                requests = a.requests - (base.requests[name] if base else 0)
                errors = a.errors - (base.errors[name] if base else 0)
                arms[name] = {
                    "requests": requests, "errors": errors,
                    "errorRate": round(errors / requests, 6) if requests > 0 else None,
                    "p95LatencySeconds": a.e2e_p95.to_status() if a.e2e_p95 else None,
                    "p95TtftSeconds": a.ttft_p95.to_status() if a.ttft_p95 else None,
                    "slaAttainment": round(a.sla_attainment, 6) if a.sla_attainment is not None else None,
                }
        return {
            "time": iso(self.state.last_analysis_at), "pods": m.pods if m else 0, "arms": arms,
            "checks": [c.to_status() for c in self.checks],
            "failedChecks": [c.name for c in self.checks if c.result == FAIL],
            "result": _overall(self.checks),
        }


def _overall(checks: Iterable[Check]) -> str:
    results = {c.result for c in checks}
    return FAIL if FAIL in results else WAIT if WAIT in results else PASS


def wants_measurement(spec: RolloutSpec, state: RolloutState, rev: str, now: float) -> bool:
    """Whether ``decide`` can use fresh reports now (the caller gathers only then: reports cost CPU)."""
    if spec.abort or spec.paused or state.revision != rev or state.phase not in ACTIVE_PHASES:
        return False
    if state.applied_at is None or state.last_analysis_at is None:
        return True  # waiting for the sidecars to apply the weight: look at every tick
    return now - state.last_analysis_at >= spec.interval_s


def _with_history(state: RolloutState, weight: float, action: str, now: float) -> tuple[Mapping[str, Any], ...]:
    entry = {"weight": weight, "action": action, "time": iso(now)}
    return (*state.history, entry)[-HISTORY_LIMIT:]


def _start_step(state: RolloutState, step: int, weight: float, phase: str, action: str, message: str,
                now: float) -> RolloutState:
    return replace(state, phase=phase, step=step, weight=weight, step_started_at=now, applied_at=None,
                   baseline=None, failures=0, message=message,
                   history=_with_history(state, weight, action, now))


def decide(spec: RolloutSpec, state: RolloutState, rev: str, now: float,
           m: Measurement | None = None) -> Decision:
    """The next rollout state; pure. ``m`` is None when nothing was gathered (see ``wants_measurement``)."""
    steps = spec.steps
    if spec.abort:
        if state.phase == ABORTED and state.weight == 0 and state.revision == rev:
            return Decision("wait", state, state.message)
        msg = "aborted by spec.rollout.abort: all traffic back to the incumbent"
        new = replace(_start_step(state, state.step, 0, ABORTED, "abort", msg, now), revision=rev)
        return Decision("abort", new, msg, event=("Warning", "RolloutAborted", msg))

    if state.revision != rev or state.phase is None or state.phase == ABORTED:
        first = steps[0]
        phase = PROMOTED if first == 100 else PROGRESSING
        again = " again" if state.phase == ABORTED and state.revision == rev else ""
        msg = f"rollout started{again}: step 1 of {len(steps)}, {first}% to Baton"
        new = replace(_start_step(state, 0, first, phase, "start", msg, now), revision=rev)
        return Decision("start", new, msg, event=("Normal", "RolloutStarted", msg))

    if state.phase in (PROMOTED, ROLLED_BACK):
        return Decision("wait", state, state.message)

    if spec.paused:
        if state.phase == PAUSED:
            return Decision("wait", state, state.message)
        msg = f"paused by spec.rollout.paused at {state.weight}%"
        return Decision("hold", replace(state, phase=PAUSED, message=msg), msg,
                        event=("Normal", "RolloutPaused", msg))
    if state.phase == PAUSED:
        state = replace(state, phase=PROGRESSING, message=f"resumed at {state.weight}%")

    if m is None:
        return Decision("wait", state, state.message)
    if m.problem is not None:
        msg = f"holding at {state.weight}%: {m.problem}"
        return Decision("hold", replace(state, message=msg), msg, measurement=m)

    if state.applied_at is None or state.baseline is None:
        stale = [w for w in m.weights if w != state.weight]
        if stale:
            msg = (f"waiting for {len(stale)} of {m.pods} sidecars to apply weight {state.weight}% "
                   f"(they report {sorted(set(stale))})")
            return Decision("hold", replace(state, message=msg), msg, measurement=m)
        msg = f"{state.weight}% applied by {m.pods} sidecar(s); collecting samples"
        return Decision("hold", replace(state, applied_at=now, baseline=Counts.of(m), last_analysis_at=now,
                                        message=msg), msg, measurement=m)

    if any(m.arms[a].requests < state.baseline.requests[a] for a in ARMS):
        msg = "the sidecars' request counters went back (a restart?); collecting samples again"
        return Decision("hold", replace(state, baseline=Counts.of(m), applied_at=now, last_analysis_at=now,
                                        message=msg), msg, measurement=m)

    base = state.baseline
    checks = tuple(evaluate(spec, state.weight, m, base))
    state = replace(state, last_analysis_at=now)
    failed = [c for c in checks if c.result == FAIL]
    waiting = [c for c in checks if c.result == WAIT]
    at = f"step {state.step + 1} of {len(steps)} ({state.weight}%)"
    if failed:
        failures = state.failures + 1
        why = "; ".join(f"{c.name}: {c.detail}" for c in failed)
        if failures >= spec.failure_threshold:
            msg = f"rolled back after {failures} failed analyses at {at}: {why}"
            new = replace(_start_step(state, state.step, 0, ROLLED_BACK, "rollback", msg, now), failures=failures)
            return Decision("rollback", new, msg, checks, m, event=("Warning", "RolledBack", msg), baseline=base)
        msg = f"analysis failed ({failures} of {spec.failure_threshold}) at {at}: {why}"
        return Decision("hold", replace(state, failures=failures, message=msg), msg, checks, m,
                        event=("Warning", "AnalysisFailed", msg), baseline=base)
    if waiting:
        msg = f"holding at {at}: " + "; ".join(f"{c.name} inconclusive: {c.detail}" for c in waiting)
        return Decision("hold", replace(state, message=msg), msg, checks, m, baseline=base)

    state = replace(state, failures=0)
    if now - state.applied_at < spec.pause_s:
        msg = f"analysis passed at {at}; pausing until {iso(state.applied_at + spec.pause_s)} (pauseSeconds)"
        return Decision("hold", replace(state, message=msg), msg, checks, m, baseline=base)
    nxt = steps[state.step + 1]
    if nxt in spec.manual_gates and spec.approved_weight < nxt:
        msg = (f"analysis passed at {at}; awaiting approval to go to {nxt}% "
               f"(set spec.rollout.approvedWeight to {nxt} or more)")
        event = None if state.phase == AWAITING_APPROVAL else ("Normal", "RolloutAwaitingApproval", msg)
        return Decision("hold", replace(state, phase=AWAITING_APPROVAL, message=msg), msg, checks, m, event,
                        baseline=base)
    if nxt == 100:
        msg = f"promoted: analysis passed at {at}; all traffic to Baton"
        new = _start_step(state, state.step + 1, 100, PROMOTED, "promote", msg, now)
        return Decision("promote", new, msg, checks, m, event=("Normal", "RolloutPromoted", msg), baseline=base)
    msg = f"analysis passed at {at}; advanced to step {state.step + 2} of {len(steps)} ({nxt}%)"
    new = _start_step(state, state.step + 1, nxt, PROGRESSING, "advance", msg, now)
    return Decision("advance", new, msg, checks, m, event=("Normal", "RolloutAdvanced", msg), baseline=base)


def config_map_weight_patch(config_map: Mapping[str, Any], weight: float) -> dict[str, Any]:
    """Merge patch setting ``router.baton_weight`` in the ConfigMap's ``baton.yaml``, leaving the rest as
    it is, conditional on the observed resourceVersion; the last-applied record follows, so the
    reconciler sees nothing to undo."""
    config = res.parse_config(config_map)
    config["router"] = {**(config.get("router") or {}), "baton_weight": weight}
    data = {res.CONFIG_KEY: res.render_config(config)}
    meta = config_map.get("metadata") or {}
    try:
        last = json.loads((meta.get("annotations") or {}).get(res.ANN_LAST_APPLIED) or "{}")
    except ValueError:
        last = {}
    last["data"] = data
    patch_meta: dict[str, Any] = {"annotations": {res.ANN_LAST_APPLIED: json.dumps(
        last, sort_keys=True, separators=(",", ":"))}}
    if meta.get("resourceVersion"):
        patch_meta["resourceVersion"] = meta["resourceVersion"]
    return {"metadata": patch_meta, "data": data}


def config_weight(config_map: Mapping[str, Any] | None) -> float | None:
    return (res.parse_config(config_map).get("router") or {}).get("baton_weight")


# --- policy auto-tune ----------------------------------------------------------------------------

KNOBS = (("maxPaddingRatio", "max_padding_ratio"),)  # (status / custom resource, baton.yaml)
# The cap is raised only while the padding ratio sits more than this many steps under it: after the
# raise it is still two steps under the new cap, one clear of the rule that lowers it again.
RAISE_MARGIN_STEPS = 3


@dataclass(frozen=True)
class EngineSample:
    """From the sidecars' /metrics: mean padding ratio of the running batches, and the Baton arm's
    completion tokens (a counter, summed over pods) at ``time``."""

    padding_ratio: float
    completion_tokens: float
    time: float


@dataclass(frozen=True)
class TuneResult:
    values: Mapping[str, float]  # camelCase knob -> value now in force
    status: dict[str, Any]  # status.rollout.autoTune
    change: Mapping[str, Any] | None  # the nudge made now, if any


def auto_tune(spec: AutoTuneSpec, current: Mapping[str, float], previous: Mapping[str, Any] | None,
              sample: EngineSample) -> TuneResult:
    """One tuning round: ``maxPaddingRatio`` moves by at most ``spec.step``, within its bounds. Pure.

    Throughput is completion tokens per second over the round. A nudge that cost more than
    ``min_throughput_change`` of the throughput measured before it is undone, and the knob is then
    left alone in that direction. Otherwise: a padding ratio within one step of the admission cap
    lowers the cap (hold back padding-heavy newcomers); one more than ``RAISE_MARGIN_STEPS`` steps
    under it raises the cap back toward its upper bound (admit more freely), unless throughput fell
    over the last round.
    """
    prev = dict(previous or {})
    values = {k: float((prev.get("padding") or {}).get(k, current[k])) for k, _ in KNOBS}
    changes = list(prev.get("changes") or [])
    # Entries for knobs no longer tuned (compactionThreshold, before) are dropped.
    blocked = {b for b in prev.get("blocked") or [] if b.split(":")[0] in values}
    last_tokens, last_time = prev.get("lastTokens"), from_iso(prev.get("lastTime"))
    last_throughput = prev.get("lastThroughput")
    throughput = None
    if last_tokens is not None and last_time is not None and sample.time > last_time \
            and sample.completion_tokens >= last_tokens:
        throughput = (sample.completion_tokens - last_tokens) / (sample.time - last_time)
    change: dict[str, Any] | None = None
    pending = prev.get("pending")  # the last nudge, awaiting its throughput verdict
    if pending and pending.get("knob") not in values:
        pending = None

    def nudge(knob: str, to: float, reason: str) -> dict[str, Any]:
        return {"time": iso(sample.time), "knob": knob, "from": round(values[knob], 4), "to": round(to, 4),
                "paddingRatio": round(sample.padding_ratio, 4),
                "throughput": round(throughput, 3) if throughput is not None else None, "reason": reason}

    if pending and throughput is not None and pending.get("throughputBefore"):
        before = float(pending["throughputBefore"])
        if throughput < before * (1 - spec.min_throughput_change):
            knob = pending["knob"]
            change = nudge(knob, float(pending["from"]),
                           f"reverted: throughput fell from {before:.2f} to {throughput:.2f} tokens/s")
            blocked.add(f"{knob}:{'down' if pending['to'] < pending['from'] else 'up'}")
        pending = None
    elif throughput is not None and pending is None:
        mpr, b_mpr, p = values["maxPaddingRatio"], spec.max_padding_ratio, sample.padding_ratio
        falling = last_throughput is not None and throughput < last_throughput * (1 - spec.min_throughput_change)
        options = [
            (p >= mpr - spec.step, max(b_mpr.low, mpr - spec.step),
             f"padding ratio {p:.2f} at the admission cap: hold back padding-heavy newcomers"),
            (p < mpr - RAISE_MARGIN_STEPS * spec.step and not falling, min(b_mpr.high, mpr + spec.step),
             f"padding ratio {p:.2f} well under the admission cap: admit more freely"),
        ]
        for wanted, to, reason in options:
            direction = "down" if to < mpr else "up"
            if wanted and abs(to - mpr) > 1e-9 and f"maxPaddingRatio:{direction}" not in blocked:
                change = nudge("maxPaddingRatio", to, reason)
                break
    if change is not None:
        values[change["knob"]] = float(change["to"])
        changes = (changes + [change])[-CHANGES_LIMIT:]
        if not change["reason"].startswith("reverted") and throughput is not None:
            pending = {**change, "throughputBefore": throughput}
    status = {"padding": {k: round(v, 4) for k, v in values.items()}, "lastTokens": sample.completion_tokens,
              "lastTime": iso(sample.time), "lastPaddingRatio": round(sample.padding_ratio, 4),
              "lastThroughput": round(throughput, 3) if throughput is not None else None,
              "pending": pending, "blocked": sorted(blocked), "changes": changes}
    return TuneResult(values, status, change)


def tuned_padding(rollout_spec: Mapping[str, Any] | None, rollout_status: Mapping[str, Any] | None) -> dict[str, float]:
    """The auto-tuned padding knobs in config shape (snake_case), or {} when auto-tune is off."""
    if not ((rollout_spec or {}).get("autoTune") or {}).get("enabled"):
        return {}
    padding = ((rollout_status or {}).get("autoTune") or {}).get("padding") or {}
    return {snake: float(padding[camel]) for camel, snake in KNOBS if isinstance(padding.get(camel), (int, float))}


# --- gathering ----------------------------------------------------------------------------------

ANN_REPORT_URLS = "baton.dev/report-urls"


def report_urls_from_annotation(bd: Mapping[str, Any]) -> list[str] | None:
    """Explicit sidecar base URLs (comma-separated) from the ``baton.dev/report-urls`` annotation."""
    value = ((bd.get("metadata") or {}).get("annotations") or {}).get(ANN_REPORT_URLS)
    if not value:
        return None
    return [u.strip().rstrip("/") for u in value.split(",") if u.strip()]


def service_name(bd: Mapping[str, Any]) -> str:
    """The Service in front of the sidecars: standalone, the BatonDeployment's own; sidecar mode, the target's."""
    spec = bd.get("spec") or {}
    if spec.get("mode") == "sidecar":
        return spec.get("targetService") or spec["targetDeployment"]
    return bd["metadata"]["name"]


def endpoint_report_urls(slices: Iterable[Mapping[str, Any]], port: int) -> list[str]:
    """Base URLs of the ready endpoints of a Service's EndpointSlices, at Baton's port.

    In sidecar mode the pods are the target's, with Baton beside the incumbent on ``port``; a pod that
    has not got the sidecar yet answers nothing there, which holds the analysis until the pods rolled.
    """
    urls = set()
    for endpoint_slice in slices:
        if endpoint_slice.get("addressType") not in (None, "IPv4", "IPv6"):
            continue
        for endpoint in endpoint_slice.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            for ip in endpoint.get("addresses") or []:
                urls.add(f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}")
    return sorted(urls)


_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", re.M)


def metric_sum(text: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """Sum of a metric's samples in Prometheus text format whose labels include ``labels``."""
    total, found = 0.0, False
    for m in _METRIC.finditer(text):
        if m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if labels and any(got.get(k) != v for k, v in labels.items()):
            continue
        try:
            total += float(m.group(3))
            found = True
        except ValueError:
            continue
    return total if found else None


def engine_sample(metrics_texts: Sequence[str], now: float) -> EngineSample | None:
    """Padding ratio (mean over pods) and Baton's completion tokens (sum) from /metrics pages."""
    ratios = [r for t in metrics_texts if (r := metric_sum(t, "baton_engine_padding_ratio")) is not None]
    tokens = [metric_sum(t, "baton_tokens_total", {"arm": "baton", "kind": "completion"}) or 0.0
              for t in metrics_texts]
    if not ratios:
        return None
    return EngineSample(sum(ratios) / len(ratios), sum(tokens), now)


async def fetch_all(urls: Sequence[str], path: str, timeout_s: float, as_json: bool = True
                    ) -> tuple[list[Any], list[str]]:
    """GET ``path`` from every base URL concurrently: (answers in order, errors)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def one(url: str) -> Any:
            async with session.get(url + path) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                return await (resp.json() if as_json else resp.text())

        results = await asyncio.gather(*(one(u) for u in urls), return_exceptions=True)
    answers, errors = [], []
    for url, result in zip(urls, results):
        if isinstance(result, BaseException):
            errors.append(f"{url}{path}: {type(result).__name__} {result}".strip())
        else:
            answers.append(result)
    return answers, errors


async def measure(urls: Sequence[str], timeout_s: float) -> Measurement:
    """Every sidecar's /ab/report, merged; any unreadable sidecar makes the measurement a problem."""
    if not urls:
        return Measurement.failed("no ready sidecar pod to read /ab/report from")
    reports, errors = await fetch_all(urls, "/ab/report", timeout_s)
    if errors:
        return Measurement.failed(f"{len(errors)} of {len(urls)} sidecars unreadable ({errors[0]})", len(urls))
    return merge_reports(reports)
