"""Per-arm A/B accounting and the GET /baton/ab/report statistics.

Each arm keeps its most recent ``window`` outcomes, each stamped with a sequence number that grows
by one per recorded outcome (both arms share one sequence). The latest number is the *cursor*; a
report ``since`` a cursor covers only the outcomes recorded after it, so a caller that keeps the
cursor of its last report can ask for exactly what happened in between. When outcomes after
``since`` have already left an arm's window, that arm's selection is ``truncated`` (and says so).

Percentiles come with distribution-free (order-statistic) 95% confidence intervals, and the verdict compares
p95 between arms, both with ``baton_sidecar.stats``: the same functions the operator's rollout gates
use, so a report's verdict and a rollout's decision on the same samples agree. Lower latency is
better. With ``samples=True`` the raw latencies are returned instead (point percentiles only, no CIs,
no verdicts): the caller pools pods and computes its own. A report sorts every arm's window, so it
is meant to run off the event loop; a computed report is cached until something new is recorded.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from baton_sidecar import stats

ARMS = ("baton", "incumbent")
QUANTILES = (50, 95, 99)
MIN_SAMPLES_FOR_VERDICT = 20
CACHED_REPORTS = 8  # distinct (since, samples, ...) reports kept; one scraper needs one or two
SAMPLE_DECIMALS = 6  # raw samples are sent rounded to the microsecond


@dataclass(frozen=True)
class Outcome:
    """What one routed request came to, as seen by the sidecar (seconds from request arrival)."""

    arm: str
    ok: bool  # False: refused for load, engine error, incumbent failure or 5xx
    ttft_s: float | None = None  # None when unknown (non-streamed incumbent responses)
    e2e_s: float | None = None
    completion_tokens: int | None = None
    sla_class: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or not self.completion_tokens \
                or self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)


@dataclass(frozen=True)
class SLATargets:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2e_ms is None


def sla_met(outcome: Outcome, targets: SLATargets) -> bool:
    """A failed request misses; a target whose measure is unknown is not held against it."""
    if not outcome.ok:
        return False
    checks = ((outcome.ttft_s, targets.ttft_ms), (outcome.tpot_s, targets.tpot_ms),
              (outcome.e2e_s, targets.e2e_ms))
    return all(v is None or t is None or v * 1000.0 <= t for v, t in checks)


def summarize(samples: Sequence[float], with_ci: bool = True
              ) -> tuple[dict[str, Any], stats.Estimate | None]:
    """p50/p95/p99 with 95% CIs, and the p95 estimate for the verdict (``with_ci=False``: point
    values only, no CIs, no estimate)."""
    if not samples:
        return {"n": 0}, None
    x = sorted(samples)
    summary: dict[str, Any] = {"n": len(x), "mean": stats.mean(x)}
    p95 = None
    for q in QUANTILES:
        value = stats.percentile(x, q)
        summary[f"p{q}"] = {"value": value}
        if with_ci:
            low, high = stats.percentile_ci(x, q)
            summary[f"p{q}"]["ci95"] = [low, high]
            if q == 95:
                p95 = stats.Estimate(value, low, high, len(x))
    return summary, p95


def verdict(baton: stats.Estimate | None, incumbent: stats.Estimate | None,
            min_samples: int = MIN_SAMPLES_FOR_VERDICT) -> dict[str, Any]:
    """One metric's p95 verdict (``stats.compare`` at margin 0, as the rollout gates judge)."""
    n_baton, n_incumbent = (baton.n if baton else 0), (incumbent.n if incumbent else 0)
    basis = f"{stats.BASIS}; at least {min_samples} samples per arm required"
    result: dict[str, Any] = {"statistic": "p95", "result": stats.INCONCLUSIVE, "basis": basis,
                              "n": {"baton": n_baton, "incumbent": n_incumbent}}
    if baton is None or incumbent is None or min(n_baton, n_incumbent) < min_samples:
        result["reason"] = "insufficient samples"
        return result
    comparison = stats.compare(baton, incumbent)
    result.update(difference_s=comparison.difference, ci95=[comparison.lower, comparison.upper],
                  result=comparison.verdict())
    if result["result"] == stats.INCONCLUSIVE:
        result["reason"] = "the 95% CI includes 0"
    return result


def combine(verdicts: Iterable[str]) -> str:
    """Overall: worse if any metric is worse, better if at least one is better and none worse."""
    vs = list(verdicts)
    if "worse" in vs:
        return "worse"
    return "better" if "better" in vs else "inconclusive"


def parse_since(value: str | None) -> int | None:
    """``?since=``: a cursor from an earlier report (an integer >= 0); ``ValueError`` names it."""
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        raise ValueError(f"since: must be a cursor from an earlier report (an integer >= 0), "
                         f"not {value[:40]!r}")
    return int(value)


def parse_flag(name: str, value: str | None) -> bool:
    """``?samples=``: true/false (also 1/0); ``ValueError`` names the field."""
    if value is None:
        return False
    flag = {"true": True, "1": True, "false": False, "0": False}.get(value.lower())
    if flag is None:
        raise ValueError(f"{name}: must be true or false, not {value[:40]!r}")
    return flag


@dataclass(frozen=True)
class Snapshot:
    """What the report is computed from, taken under the lock."""

    arms: Mapping[str, Sequence[tuple[int, Outcome]]]  # (sequence number, outcome), oldest first
    totals: Mapping[str, Mapping[str, int]]
    fallbacks: int
    cursor: int  # the latest sequence number (0: nothing recorded yet)
    dropped_through: Mapping[str, int]  # per arm, the newest sequence number evicted from it


class ABStats:
    """Thread-safe per-arm ring buffers of outcomes (recorded on the loop, read off it).

    Every outcome gets the next sequence number; it never goes back for the life of the object (not
    even on ``reset``), and ``instance`` tells one object's cursors from another's (a restarted
    sidecar starts a new sequence)."""

    def __init__(self, window: int = 5000) -> None:
        self._lock = threading.Lock()
        self._compute = threading.Lock()  # one report computed at a time; the rest hit the cache
        self._window = window
        self._arms: dict[str, deque[tuple[int, Outcome]]] = {
            arm: deque(maxlen=window) for arm in ARMS}
        self._totals = {arm: {"count": 0, "errors": 0} for arm in ARMS}
        self._fallbacks = 0
        self._seq = 0
        self._generation = 0  # bumped by the changes that record no outcome (fallbacks, reset)
        self._dropped = {arm: 0 for arm in ARMS}
        self._cache: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        self.instance = uuid.uuid4().hex[:16]

    @property
    def cursor(self) -> int:
        with self._lock:
            return self._seq

    def record(self, outcome: Outcome) -> None:
        with self._lock:
            self._seq += 1
            window = self._arms[outcome.arm]
            if len(window) == window.maxlen:
                self._dropped[outcome.arm] = window[0][0]
            window.append((self._seq, outcome))
            self._totals[outcome.arm]["count"] += 1
            self._totals[outcome.arm]["errors"] += 0 if outcome.ok else 1

    def record_fallback(self) -> None:
        with self._lock:
            self._fallbacks += 1
            self._generation += 1

    def reset(self) -> None:
        with self._lock:
            for arm in ARMS:
                self._arms[arm].clear()
                self._totals[arm] = {"count": 0, "errors": 0}
                self._dropped[arm] = self._seq  # everything so far is gone
            self._fallbacks = 0
            self._generation += 1
            self._cache.clear()

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot_locked()

    def _key(self, sla_classes: Mapping[str, SLATargets], default_sla_class: str | None,
             since: int | None, samples: bool) -> tuple:
        # With self._lock held. The cursor and the generation change whenever the data does.
        return (since, samples, self._seq, self._generation, tuple(sorted(sla_classes.items())),
                default_sla_class)

    def cached_report(self, sla_classes: Mapping[str, SLATargets], default_sla_class: str | None,
                      since: int | None = None, samples: bool = False) -> dict[str, Any] | None:
        """The report if it was computed since the last change (cheap: callable on the loop)."""
        with self._lock:
            hit = self._cache.get(self._key(sla_classes, default_sla_class, since, samples))
        return dict(hit) if hit is not None else None

    def report(self, sla_classes: Mapping[str, SLATargets], default_sla_class: str | None,
               since: int | None = None, samples: bool = False) -> dict[str, Any]:
        """The report of the outcomes recorded after ``since`` (None: the whole windows), with the
        raw latencies instead of CIs and verdicts when ``samples``. A shallow copy of a cached dict: add
        top-level keys freely, do not modify nested ones."""
        with self._compute:
            with self._lock:
                key = self._key(sla_classes, default_sla_class, since, samples)
                hit = self._cache.get(key)
                snap = None if hit is not None else self._snapshot_locked()
            if hit is None:
                hit = _compute_report(snap, self._window, self.instance, sla_classes,
                                      default_sla_class, since, samples)
                with self._lock:
                    self._cache[key] = hit
                    while len(self._cache) > CACHED_REPORTS:
                        self._cache.popitem(last=False)
            return dict(hit)

    def _snapshot_locked(self) -> Snapshot:
        return Snapshot({a: list(d) for a, d in self._arms.items()},
                        {a: dict(t) for a, t in self._totals.items()}, self._fallbacks, self._seq,
                        dict(self._dropped))


def _compute_report(snap: Snapshot, window: int, instance: str,
                    sla_classes: Mapping[str, SLATargets], default_sla_class: str | None,
                    since: int | None, samples: bool) -> dict[str, Any]:
    ahead = since is not None and since > snap.cursor  # a cursor from another sidecar process
    out: dict[str, Any] = {"window": window, "instance": instance, "cursor": snap.cursor,
                           "since": since, "truncated": False, "fallbacks_to_baton": snap.fallbacks,
                           "arms": {}}
    p95s: dict[str, dict[str, stats.Estimate | None]] = {}
    for arm in ARMS:
        outcomes = [o for seq, o in snap.arms[arm] if since is None or seq > since]
        truncated = since is not None and (ahead or snap.dropped_through[arm] > since)
        ok = [o for o in outcomes if o.ok]
        total = snap.totals[arm]
        entry: dict[str, Any] = {
            "count": total["count"],
            "errors": total["errors"],
            "error_rate": total["errors"] / total["count"] if total["count"] else None,
            "window_count": len(outcomes),
            "window_errors": len(outcomes) - len(ok),
            "truncated": truncated,
        }
        p95s[arm] = {}
        raw: dict[str, list[float]] = {}
        for metric in ("ttft_s", "e2e_s"):
            values = [getattr(o, metric) for o in ok if getattr(o, metric) is not None]
            entry[metric], p95s[arm][metric] = summarize(values, with_ci=not samples)
            if samples:
                raw[metric] = [round(v, SAMPLE_DECIMALS) for v in values]
        entry["sla"] = _attainment(outcomes, sla_classes, default_sla_class)
        if samples:
            entry["samples"] = raw
        out["truncated"] = out["truncated"] or truncated
        out["arms"][arm] = entry
    if samples:
        return out  # the caller pools pods and computes CIs and verdicts from the samples
    verdicts = {metric: verdict(p95s["baton"][metric], p95s["incumbent"][metric])
                for metric in ("ttft_s", "e2e_s")}
    out["verdicts"] = verdicts
    out["verdict"] = combine(v["result"] for v in verdicts.values())
    out["verdict_basis"] = ("p95 of ttft_s and e2e_s, each judged as the rollout gates judge it "
                            "(see each verdict's basis); worse if either is worse, better if at "
                            "least one is better and neither worse, otherwise inconclusive")
    return out


def _attainment(outcomes: Sequence[Outcome], classes: Mapping[str, SLATargets],
                default_class: str | None) -> dict[str, Any]:
    evaluated = met = 0
    for o in outcomes:
        targets = classes.get(o.sla_class or default_class or "")
        if targets is None or targets.empty:
            continue
        evaluated += 1
        met += sla_met(o, targets)
    return {"evaluated": evaluated, "met": met,
            "attainment": met / evaluated if evaluated else None,
            "default_class": default_class}
