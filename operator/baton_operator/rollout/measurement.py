"""One step's traffic, from every sidecar's ``/baton/ab/report``: ``Measurement`` (the reports),
``Baseline`` (per sidecar, where the step started) and ``step_view`` (the two merged into this step's
per-arm figures).

Pure. Only the step's traffic counts. The baseline keeps, per sidecar URL, its process id
(``instance``), its cursor (the sequence number of its last recorded outcome) and its request and error
totals. Each analysis asks every sidecar for ``/baton/ab/report?samples=true&since=<cursor>``: the raw
latencies recorded since (at most the sidecar's window of them). Requests and errors are totals minus
the baseline (exact); p95 and its CI are computed over the samples of all pods pooled
(``pooled_p95``, with ``baton_sidecar.stats``, the module the sidecar's own verdicts use), so the merged
p95 is exact across pods. A sidecar that is new, restarted, or too old to have cursors is based when
first seen and counts from the next analysis; with sidecars too old to send samples the p95s fall back to
a sample-weighted mean of the pods' own p95s over their recent windows (``merge_estimates``, exact for
one pod only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from baton_sidecar import stats
from baton_sidecar.stats import Estimate

from baton_operator.rollout.paired import PairedReport

ARMS = ("baton", "incumbent")
LATENCIES = ("e2e_s", "ttft_s")  # the latency metrics of a report


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


@dataclass(frozen=True)
class PodReport:
    """One sidecar's ``/baton/ab/report?samples=true[&since=...]``, as far as the rollout uses it."""

    url: str
    weight: float  # router.baton_weight as the sidecar applies it
    shadow_percent: float | None  # router.shadow_percent as it applies it (None: the report does not say)
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
    paired: PairedReport = PairedReport()  # the shadow stage's paired statistics (none: no pairs, undecided)

    @classmethod
    def parse(cls, url: str, report: Mapping[str, Any]) -> "PodReport":
        arms = {a: (report.get("arms") or {}).get(a) or {} for a in ARMS}
        has_samples = "cursor" in report and all(isinstance(arms[a].get("samples"), Mapping) for a in ARMS)
        router = report.get("router") or {}
        shadow = router.get("shadow_percent")
        return cls(
            url=url, weight=float(router.get("baton_weight", -1)),
            shadow_percent=float(shadow) if isinstance(shadow, (int, float)) else None,
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
            ineligible=int((report.get("ineligible") or {}).get("count") or 0),
            paired=PairedReport.parse(report.get("paired")))


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
    """p95 and its distribution-free 95% CI over every pod's raw samples together (exact across pods)."""
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


# --- the step's figures ---------------------------------------------------------------------------

@dataclass(frozen=True)
class StepView:
    """The current step's traffic, from the sidecars known since the step's baseline."""

    arms: Mapping[str, Arm]
    baseline: Baseline  # new or restarted sidecars based from now, gone ones dropped
    counted: tuple[str, ...]  # sidecars whose traffic counts
    rebased: tuple[str, ...]  # sidecars based now: new to the step, restarted, or answering another cursor
    exact: bool  # latencies from the pooled raw samples (False: some sidecar is too old to send them)
    truncated: bool  # some counted sidecar's window no longer holds all of the step's outcomes


Counted = Sequence[tuple[PodReport, PodBaseline]]  # each counted sidecar's report and its baseline


def step_view(m: Measurement, base: Baseline) -> StepView:
    """Merge the sidecars' reports into this step's figures; pure.

    A sidecar counts when it is the same process that was based (``instance``), its report starts at
    the based cursor, and its totals did not go back. Requests and errors are its totals minus the
    baseline (exact); latencies are the raw samples since the cursor (bounded by its window), pooled
    over the counted sidecars: p95 and its CI over the pooled set. Any other sidecar is
    based now and counts from the next analysis.
    """
    counted: list[tuple[PodReport, PodBaseline]] = []
    rebased: list[str] = []
    pods: dict[str, PodBaseline] = {}
    for r in m.reports:
        b = base.pods.get(r.url)
        if b is not None and _continues(r, b):
            counted.append((r, b))
            pods[r.url] = b
        else:
            rebased.append(r.url)
            pods[r.url] = PodBaseline.of(r)
    exact = all(r.samples is not None for r, _ in counted)
    arms = {a: _arm(counted, a, exact) for a in ARMS}
    return StepView(arms, Baseline(pods), tuple(r.url for r, _ in counted), tuple(rebased), exact,
                    any(r.truncated for r, _ in counted))


def _continues(r: PodReport, b: PodBaseline) -> bool:
    """Whether ``r`` carries on from ``b``: same process, starting at the based cursor, totals not gone back."""
    return b.instance == r.instance and b.cursor == r.since and all(r.requests[a] >= b.requests[a] for a in ARMS)


def _arm(counted: Counted, a: str, exact: bool) -> Arm:
    """Arm ``a`` over the counted sidecars: pooled samples when ``exact``, else the older mean of p95s."""
    if exact:
        e2e, ttft = (pooled_p95(r.samples[a][k] for r, _ in counted) for k in LATENCIES)  # type: ignore[index]
    else:
        e2e, ttft = (merge_estimates([(pooled_p95([r.samples[a][k]]) if r.samples is not None
                                       else r.estimates[a][k]) for r, _ in counted]) for k in LATENCIES)
    return Arm(requests=sum(r.requests[a] - b.requests[a] for r, b in counted),
               errors=sum(r.errors[a] - b.errors[a] for r, b in counted),
               e2e_p95=e2e, ttft_p95=ttft,
               sla_evaluated=sum(r.sla[a][0] for r, _ in counted), sla_met=sum(r.sla[a][1] for r, _ in counted))
