"""Progressive rollout: step Baton's traffic weight from the sidecars' A/B reports.

One analysis per ``analysisIntervalSeconds`` reads every sidecar's ``GET /baton/ab/report``, merges the
pods' traffic of the current step (``step_view``) and judges it against the gates; ``decide`` turns (spec,
state in status, measurement, now) into a ``Decision``: advance, promote, hold or roll back. Everything
except the gathering at the bottom is pure: the state lives in ``status.rollout`` (``RolloutState``), so an
operator restarted mid-rollout resumes at the same step.

At one step::

    weight written ──► sidecars report it (router.baton_weight) ──► baseline: per sidecar, its cursor
        and request/error totals
        ──► every interval: each sidecar's outcomes since its cursor, pooled;
            requests since the baseline >= minSamplesPerArm? ──► gates
            pass (and pauseSeconds over, and approved) ─► next step (100: Promoted)
            fail ─► failures += 1 ─► failureThreshold reached: weight 0, RolledBack
            inconclusive ─► hold

Latency gates compare p95 with confidence intervals: Baton passes when the upper bound of the 95% CI of
``p95(baton) - p95(incumbent)`` is within the margin (``margin% x p95(incumbent)``), fails when even the
lower bound exceeds it, else the analysis is inconclusive. A margin of 0 asks Baton to be demonstrably no
slower. The CI of the difference combines the arms' half-widths as independent errors.

Only the step's traffic counts. The baseline keeps, per sidecar, its process id (``instance``), its
cursor (the sequence number of its last recorded outcome) and its request and error totals. Each analysis
asks every sidecar for ``/baton/ab/report?samples=true&since=<cursor>``: the raw latencies recorded since
(at most the sidecar's window of them). Requests and errors are totals minus the baseline (exact); p95 and
its bootstrap CI are computed over the samples of all pods pooled, so the merged p95 is exact across pods.
A sidecar that is new, restarted, or too old to have cursors is based when first seen and counts from the
next analysis; with sidecars too old to send samples the p95s fall back to a sample-weighted mean of the
pods' own p95s over their recent windows (exact for one pod only).
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

from baton_sidecar import stats
from baton_sidecar.stats import Estimate

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
class Arm:
    """One arm over the current step, all counted sidecars together."""

    requests: int = 0
    errors: int = 0
    e2e_p95: Estimate | None = None
    ttft_p95: Estimate | None = None
    sla_evaluated: int = 0
    sla_met: int = 0

    @property
    def sla_attainment(self) -> float | None:
        return self.sla_met / self.sla_evaluated if self.sla_evaluated else None


LATENCIES = ("e2e_s", "ttft_s")  # the latency metrics of a report


@dataclass(frozen=True)
class PodReport:
    """One sidecar's ``/baton/ab/report?samples=true[&since=...]``, as far as the rollout uses it."""

    url: str
    weight: float  # router.baton_weight as the sidecar applies it
    instance: str | None  # which sidecar process (None: an older sidecar without cursors)
    cursor: int | None  # its latest sequence number
    since: int | None  # the cursor the selection starts after (None: the whole windows)
    truncated: bool  # outcomes after ``since`` already left a window
    requests: Mapping[str, int]  # totals since the sidecar started
    errors: Mapping[str, int]
    samples: Mapping[str, Mapping[str, Sequence[float]]] | None  # arm -> metric -> raw latencies (s)
    estimates: Mapping[str, Mapping[str, Estimate | None]]  # arm -> metric -> reported p95 (older sidecars)
    sla: Mapping[str, tuple[int, int]]  # arm -> (evaluated, met) over the selection
    eligible: int = 0  # requests the A/B split took, since the sidecar started
    ineligible: int = 0  # requests passed to the incumbent because Baton cannot serve them

    @classmethod
    def parse(cls, url: str, report: Mapping[str, Any]) -> "PodReport":
        arms = {a: (report.get("arms") or {}).get(a) or {} for a in ARMS}
        has_samples = "cursor" in report and all(isinstance(arms[a].get("samples"), Mapping) for a in ARMS)
        return cls(
            url=url, weight=float((report.get("router") or {}).get("baton_weight", -1)),
            instance=report.get("instance"), cursor=report.get("cursor"), since=report.get("since"),
            truncated=bool(report.get("truncated")),
            requests={a: int(arms[a].get("count") or 0) for a in ARMS},
            errors={a: int(arms[a].get("errors") or 0) for a in ARMS},
            samples=({a: {k: [float(v) for v in arms[a]["samples"].get(k) or ()] for k in LATENCIES} for a in ARMS}
                     if has_samples else None),
            estimates={a: {k: Estimate.from_summary(arms[a].get(k)) for k in LATENCIES} for a in ARMS},
            sla={a: (int((arms[a].get("sla") or {}).get("evaluated") or 0),
                     int((arms[a].get("sla") or {}).get("met") or 0)) for a in ARMS},
            eligible=int((report.get("eligible") or {}).get("count") or 0),
            ineligible=int((report.get("ineligible") or {}).get("count") or 0))


@dataclass(frozen=True)
class Measurement:
    """Every sidecar's report; ``problem`` set when they could not all be read."""

    reports: tuple[PodReport, ...] = ()
    problem: str | None = None
    unread: int = 0  # sidecars listed but not read (with ``problem``)

    @property
    def pods(self) -> int:
        return len(self.reports) or self.unread

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(r.weight for r in self.reports)

    @classmethod
    def failed(cls, problem: str, pods: int = 0) -> "Measurement":
        return cls(problem=problem, unread=pods)

    @classmethod
    def of(cls, reports: Sequence[Mapping[str, Any]], urls: Sequence[str] | None = None) -> "Measurement":
        if not reports:
            return cls.failed("no sidecar to read /baton/ab/report from")
        urls = list(urls) if urls is not None else [f"pod-{i}" for i in range(len(reports))]
        return cls(tuple(PodReport.parse(u, r) for u, r in zip(urls, reports)))


def pooled_p95(parts: Iterable[Sequence[float]]) -> Estimate | None:
    """p95 and its exact bootstrap 95% CI over every pod's raw samples together (exact across pods)."""
    return stats.estimate((v for part in parts for v in part), 95)


def merge_estimates(parts: Sequence[Estimate | None]) -> Estimate | None:
    """Older sidecars (no raw samples): the sample-weighted mean of the pods' p95s, CI half-widths
    combined as independent errors, ``sqrt(sum((w_i * half_i)^2))``. Exact for one pod only."""
    parts = [p for p in parts if p is not None and p.n]
    total = sum(p.n for p in parts)
    if not total:
        return None
    value = low2 = high2 = 0.0
    for p in parts:
        w = p.n / total
        value += w * p.value
        low2 += (w * (p.value - p.low)) ** 2
        high2 += (w * (p.high - p.value)) ** 2
    return Estimate(value, value - math.sqrt(low2), value + math.sqrt(high2), total)


# --- the step's baseline: per sidecar, where the step started ------------------------------------

@dataclass(frozen=True)
class PodBaseline:
    """One sidecar at the start of the step (or since it was first seen in it)."""

    instance: str | None
    cursor: int | None
    requests: Mapping[str, int]
    errors: Mapping[str, int]

    @classmethod
    def of(cls, r: PodReport) -> "PodBaseline":
        return cls(r.instance, r.cursor, dict(r.requests), dict(r.errors))

    def to_status(self) -> dict[str, Any]:
        return {"instance": self.instance, "cursor": self.cursor,
                **{a: {"requests": self.requests[a], "errors": self.errors[a]} for a in ARMS}}

    @classmethod
    def from_status(cls, d: Any) -> "PodBaseline | None":
        if not isinstance(d, Mapping) or not all(isinstance(d.get(a), Mapping) for a in ARMS):
            return None
        cursor = d.get("cursor")
        return cls(d.get("instance"), int(cursor) if isinstance(cursor, (int, float)) else None,
                   {a: int(d[a].get("requests") or 0) for a in ARMS}, {a: int(d[a].get("errors") or 0) for a in ARMS})


@dataclass(frozen=True)
class Baseline:
    """Per sidecar URL: its process, cursor and request/error totals where this step started for it.

    Kept in ``status.rollout.baseline.pods`` (not in memory), so a restarted operator asks every
    sidecar for the same step's outcomes; a status without it (older operators) re-bases every sidecar."""

    pods: Mapping[str, PodBaseline] = field(default_factory=dict)

    @classmethod
    def of(cls, m: Measurement) -> "Baseline":
        return cls({r.url: PodBaseline.of(r) for r in m.reports})

    def since(self, url: str) -> int | None:
        pod = self.pods.get(url)
        return pod.cursor if pod is not None else None

    def to_status(self) -> dict[str, Any]:
        totals = {a: {"requests": sum(p.requests[a] for p in self.pods.values()),
                      "errors": sum(p.errors[a] for p in self.pods.values())} for a in ARMS}
        return {**totals, "pods": {url: p.to_status() for url, p in sorted(self.pods.items())}}

    @classmethod
    def from_status(cls, data: Any) -> "Baseline | None":
        if not isinstance(data, Mapping):
            return None
        pods = {url: b for url, d in (data.get("pods") or {}).items() if (b := PodBaseline.from_status(d))}
        return cls(pods)


@dataclass(frozen=True)
class StepView:
    """The current step's traffic, from the sidecars known since the step's baseline."""

    arms: Mapping[str, Arm]
    baseline: Baseline  # new or restarted sidecars based from now, gone ones dropped
    counted: tuple[str, ...]  # sidecars whose traffic counts
    rebased: tuple[str, ...]  # sidecars based now: new to the step, restarted, or answering another cursor
    exact: bool  # latencies from the pooled raw samples (False: some sidecar is too old to send them)
    truncated: bool  # some counted sidecar's window no longer holds all of the step's outcomes


def step_view(m: Measurement, base: Baseline) -> StepView:
    """Merge the sidecars' reports into this step's figures; pure.

    A sidecar counts when it is the same process that was based (``instance``), its report starts at
    the based cursor, and its totals did not go back. Requests and errors are its totals minus the
    baseline (exact); latencies are the raw samples since the cursor (bounded by its window), pooled
    over the counted sidecars: p95 and its bootstrap CI over the pooled set. Any other sidecar is
    based now and counts from the next analysis.
    """
    counted: list[tuple[PodReport, PodBaseline]] = []
    rebased: list[str] = []
    pods: dict[str, PodBaseline] = {}
    for r in m.reports:
        b = base.pods.get(r.url)
        if (b is not None and b.instance == r.instance and b.cursor == r.since
                and all(r.requests[a] >= b.requests[a] for a in ARMS)):
            counted.append((r, b))
            pods[r.url] = b
        else:
            rebased.append(r.url)
            pods[r.url] = PodBaseline.of(r)
    exact = all(r.samples is not None for r, _ in counted)
    arms = {}
    for a in ARMS:
        if exact:
            e2e, ttft = (pooled_p95(r.samples[a][k] for r, _ in counted) for k in LATENCIES)
        else:
            e2e, ttft = (merge_estimates([(pooled_p95([r.samples[a][k]]) if r.samples is not None
                                           else r.estimates[a][k]) for r, _ in counted]) for k in LATENCIES)
        arms[a] = Arm(requests=sum(r.requests[a] - b.requests[a] for r, b in counted),
                      errors=sum(r.errors[a] - b.errors[a] for r, b in counted),
                      e2e_p95=e2e, ttft_p95=ttft,
                      sla_evaluated=sum(r.sla[a][0] for r, _ in counted), sla_met=sum(r.sla[a][1] for r, _ in counted))
    return StepView(arms, Baseline(pods), tuple(r.url for r, _ in counted), tuple(rebased), exact,
                    any(r.truncated for r, _ in counted))


# --- the gates ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    name: str
    result: str  # PASS, FAIL, WAIT (inconclusive) or SKIP
    detail: str

    def to_status(self) -> dict[str, Any]:
        return {"name": self.name, "result": self.result, "detail": self.detail}


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def latency_check(name: str, baton: Estimate | None, incumbent: Estimate | None, margin_pct: float,
                  min_samples: int) -> Check:
    """Pass when the CI of p95(baton) - p95(incumbent) lies within the margin, fail when it lies beyond."""
    if baton is None or incumbent is None or min(baton.n, incumbent.n) < min_samples:
        nb, ni = (baton.n if baton else 0), (incumbent.n if incumbent else 0)
        return Check(name, WAIT, f"too few latency samples (baton {nb}, incumbent {ni}, need {min_samples})")
    allowed = incumbent.value * margin_pct / 100.0
    c = stats.compare(baton, incumbent)  # the comparison /baton/ab/report's verdicts use too
    detail = (f"p95 baton {_ms(baton.value)} [{_ms(baton.low)}, {_ms(baton.high)}], incumbent "
              f"{_ms(incumbent.value)} [{_ms(incumbent.low)}, {_ms(incumbent.high)}]; difference "
              f"{_ms(c.difference)}, 95% CI [{_ms(c.lower)}, {_ms(c.upper)}]; allowed +{_ms(allowed)} "
              f"({margin_pct:g}%)")
    return Check(name, {stats.BETTER: PASS, stats.WORSE: FAIL}.get(c.verdict(allowed), WAIT), detail)


def evaluate(spec: RolloutSpec, weight: float, arms: Mapping[str, Arm]) -> list[Check]:
    """The gates for one analysis over this step's figures (``step_view``)."""
    if weight <= 0:
        return [Check("traffic", SKIP, "no traffic goes to Baton at 0%; nothing to compare")]
    new = {a: arms[a].requests for a in ARMS}
    samples = Check("samples", PASS if min(new.values()) >= spec.min_samples else WAIT,
                    f"requests this step: baton {new['baton']}, incumbent {new['incumbent']} "
                    f"(need {spec.min_samples} per arm)")
    if samples.result != PASS:
        return [samples]
    checks = [samples]
    errors = arms["baton"].errors
    rate = errors / new["baton"]
    checks.append(Check("errorRate", PASS if rate <= spec.gates.max_error_rate else FAIL,
                        f"baton error rate {rate:.2%} ({errors} of {new['baton']}); "
                        f"allowed {spec.gates.max_error_rate:.2%}"))
    b, i = arms["baton"], arms["incumbent"]
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
    baseline: Baseline | None = None  # per sidecar: where the step started
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
            applied_at=from_iso(d.get("weightAppliedAt")), baseline=Baseline.from_status(d.get("baseline")),
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
    view: StepView | None = None  # the step's figures the checks judged

    @property
    def weight(self) -> float:
        return self.state.weight if self.state.weight is not None else 0

    def analysis_status(self, previous: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """``status.rollout.analysis``: the last analysis (kept from ``previous`` when none ran now)."""
        if not self.checks:
            return dict(previous) if previous else None
        m, view = self.measurement, self.view
        arms: dict[str, Any] = {}
        if view is not None:
            for name in ARMS:
                a = view.arms[name]
                arms[name] = {
                    "requests": a.requests, "errors": a.errors,
                    "errorRate": round(a.errors / a.requests, 6) if a.requests > 0 else None,
                    "p95LatencySeconds": a.e2e_p95.to_status() if a.e2e_p95 else None,
                    "p95TtftSeconds": a.ttft_p95.to_status() if a.ttft_p95 else None,
                    "slaAttainment": round(a.sla_attainment, 6) if a.sla_attainment is not None else None,
                }
        out = {
            "time": iso(self.state.last_analysis_at), "pods": m.pods if m else 0, "arms": arms,
            "checks": [c.to_status() for c in self.checks],
            "failedChecks": [c.name for c in self.checks if c.result == FAIL],
            "result": _overall(self.checks),
        }
        if view is not None:
            out.update(counted=len(view.counted), rebased=list(view.rebased), truncated=view.truncated,
                       latencyBasis="pooled samples" if view.exact else "mean of the pods' p95s (older sidecars)")
        if m is not None and m.reports:
            out["traffic"] = traffic_status(m.reports)
        return out


def traffic_status(reports: Sequence[PodReport]) -> dict[str, Any]:
    """How much of the traffic the pilot judges: requests both arms can serve (split by weight) and
    the rest (passed to the incumbent), summed over the sidecars since they started."""
    eligible = sum(r.eligible for r in reports)
    ineligible = sum(r.ineligible for r in reports)
    total = eligible + ineligible
    return {"eligibleRequests": eligible, "ineligibleRequests": ineligible,
            "judgedShare": round(eligible / total, 4) if total else None}


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
        return Decision("hold", replace(state, applied_at=now, baseline=Baseline.of(m), last_analysis_at=now,
                                        message=msg), msg, measurement=m)

    view = step_view(m, state.baseline)
    if not view.counted:
        msg = (f"none of the {m.pods} sidecar(s) is known since the step's start (new, restarted, or their "
               f"counters went back); collecting samples again")
        return Decision("hold", replace(state, baseline=view.baseline, applied_at=now, last_analysis_at=now,
                                        message=msg), msg, measurement=m)

    checks = tuple(evaluate(spec, state.weight, view.arms))
    state = replace(state, last_analysis_at=now, baseline=view.baseline)
    failed = [c for c in checks if c.result == FAIL]
    waiting = [c for c in checks if c.result == WAIT]
    at = f"step {state.step + 1} of {len(steps)} ({state.weight}%)"
    if failed:
        failures = state.failures + 1
        why = "; ".join(f"{c.name}: {c.detail}" for c in failed)
        if failures >= spec.failure_threshold:
            msg = f"rolled back after {failures} failed analyses at {at}: {why}"
            new = replace(_start_step(state, state.step, 0, ROLLED_BACK, "rollback", msg, now), failures=failures)
            return Decision("rollback", new, msg, checks, m, event=("Warning", "RolledBack", msg), view=view)
        msg = f"analysis failed ({failures} of {spec.failure_threshold}) at {at}: {why}"
        return Decision("hold", replace(state, failures=failures, message=msg), msg, checks, m,
                        event=("Warning", "AnalysisFailed", msg), view=view)
    if waiting:
        msg = f"holding at {at}: " + "; ".join(f"{c.name} inconclusive: {c.detail}" for c in waiting)
        return Decision("hold", replace(state, message=msg), msg, checks, m, view=view)

    state = replace(state, failures=0)
    if now - state.applied_at < spec.pause_s:
        msg = f"analysis passed at {at}; pausing until {iso(state.applied_at + spec.pause_s)} (pauseSeconds)"
        return Decision("hold", replace(state, message=msg), msg, checks, m, view=view)
    nxt = steps[state.step + 1]
    if nxt in spec.manual_gates and spec.approved_weight < nxt:
        msg = (f"analysis passed at {at}; awaiting approval to go to {nxt}% "
               f"(set spec.rollout.approvedWeight to {nxt} or more)")
        event = None if state.phase == AWAITING_APPROVAL else ("Normal", "RolloutAwaitingApproval", msg)
        return Decision("hold", replace(state, phase=AWAITING_APPROVAL, message=msg), msg, checks, m, event,
                        view=view)
    if nxt == 100:
        msg = f"promoted: analysis passed at {at}; all traffic to Baton"
        new = _start_step(state, state.step + 1, 100, PROMOTED, "promote", msg, now)
        return Decision("promote", new, msg, checks, m, event=("Normal", "RolloutPromoted", msg), view=view)
    msg = f"analysis passed at {at}; advanced to step {state.step + 2} of {len(steps)} ({nxt}%)"
    new = _start_step(state, state.step + 1, nxt, PROGRESSING, "advance", msg, now)
    return Decision("advance", new, msg, checks, m, event=("Normal", "RolloutAdvanced", msg), view=view)


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
    """From the sidecars' /baton/metrics at ``time``: the padding-ratio gauge (mean over pods), the Baton
    arm's completion tokens, and the KV slot and padding-slot counters (summed over pods; None when some
    sidecar is too old to export them)."""

    padding_ratio: float
    completion_tokens: float
    time: float
    kv_slots: float | None = None
    kv_padding_slots: float | None = None


def round_padding_ratio(sample: EngineSample, prev: Mapping[str, Any]) -> tuple[float, str]:
    """The padding ratio over the round since ``prev`` (status.rollout.autoTune): the increase of the
    padding-slot counter over that of the slot counter, exact over every decode step of the round; the
    instantaneous gauge when the counters are absent (older sidecars), new, or went back (a restart)."""
    slots, padding = prev.get("lastKvSlots"), prev.get("lastKvPaddingSlots")
    if sample.kv_slots is not None and sample.kv_padding_slots is not None and slots is not None \
            and padding is not None and sample.kv_slots > slots and sample.kv_padding_slots >= padding:
        return (sample.kv_padding_slots - padding) / (sample.kv_slots - slots), "counters"
    return sample.padding_ratio, "gauge"


@dataclass(frozen=True)
class TuneResult:
    values: Mapping[str, float]  # camelCase knob -> value now in force
    status: dict[str, Any]  # status.rollout.autoTune
    change: Mapping[str, Any] | None  # the nudge made now, if any


def auto_tune(spec: AutoTuneSpec, current: Mapping[str, float], previous: Mapping[str, Any] | None,
              sample: EngineSample) -> TuneResult:
    """One tuning round: ``maxPaddingRatio`` moves by at most ``spec.step``, within its bounds. Pure.

    Throughput is completion tokens per second over the round; the padding ratio is the round's too
    (``round_padding_ratio``: from the KV slot counters, else the gauge). A nudge that cost more than
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
    padding_ratio, padding_basis = round_padding_ratio(sample, prev)
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
                "paddingRatio": round(padding_ratio, 4),
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
        mpr, b_mpr, p = values["maxPaddingRatio"], spec.max_padding_ratio, padding_ratio
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
              "lastTime": iso(sample.time), "lastPaddingRatio": round(padding_ratio, 4),
              "paddingRatioBasis": padding_basis, "lastKvSlots": sample.kv_slots,
              "lastKvPaddingSlots": sample.kv_padding_slots,
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
    """Padding-ratio gauge (mean over pods), Baton's completion tokens and the KV slot counters (sums)
    from /baton/metrics pages."""
    ratios = [r for t in metrics_texts if (r := metric_sum(t, "baton_engine_padding_ratio")) is not None]
    tokens = [metric_sum(t, "baton_tokens_total", {"arm": "baton", "kind": "completion"}) or 0.0
              for t in metrics_texts]
    if not ratios:
        return None

    def counter(name: str) -> float | None:  # summed only when every pod exports it
        values = [metric_sum(t, name) for t in metrics_texts]
        return None if any(v is None for v in values) else sum(values)

    return EngineSample(sum(ratios) / len(ratios), sum(tokens), now, counter("baton_engine_kv_slots_total"),
                        counter("baton_engine_kv_padding_slots_total"))


async def fetch_all(urls: Sequence[str], path: str | Sequence[str], timeout_s: float, as_json: bool = True
                    ) -> tuple[list[Any], list[str]]:
    """GET ``path`` (one for all, or one per URL) from every base URL concurrently: (answers in order, errors)."""
    import aiohttp

    paths = [path] * len(urls) if isinstance(path, str) else list(path)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def one(url: str) -> Any:
            async with session.get(url) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                return await (resp.json() if as_json else resp.text())

        results = await asyncio.gather(*(one(u + p) for u, p in zip(urls, paths)), return_exceptions=True)
    answers, errors = [], []
    for url, p, result in zip(urls, paths, results):
        if isinstance(result, BaseException):
            errors.append(f"{url}{p}: {type(result).__name__} {result}".strip())
        else:
            answers.append(result)
    return answers, errors


def report_path(since: int | None) -> str:
    """The raw samples since the step's cursor (no bootstrap on the sidecar: the operator pools them)."""
    return f"{res.AB_REPORT_PATH}?samples=true" + (f"&since={since}" if since is not None else "")


async def measure(urls: Sequence[str], timeout_s: float, baseline: Baseline | None = None) -> Measurement:
    """Every sidecar's /baton/ab/report since its cursor in ``baseline``; any unreadable sidecar makes the
    measurement a problem."""
    if not urls:
        return Measurement.failed("no ready sidecar pod to read /baton/ab/report from")
    base = baseline or Baseline()
    reports, errors = await fetch_all(urls, [report_path(base.since(u)) for u in urls], timeout_s)
    if errors:
        return Measurement.failed(f"{len(errors)} of {len(urls)} sidecars unreadable ({errors[0]})", len(urls))
    return Measurement.of(reports, urls)
