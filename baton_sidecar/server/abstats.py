"""Per-arm A/B accounting and the GET /ab/report statistics.

Each arm keeps its most recent ``window`` outcomes. Percentiles come with percentile-bootstrap 95%
confidence intervals; the verdict compares p95 between arms with a bootstrap CI of the difference
``p95(baton) - p95(incumbent)`` (arms resampled independently): entirely below zero -> "better",
entirely above -> "worse", otherwise (or with too few samples) "inconclusive". Lower latency is
better. Report computation is CPU work (numpy) and is meant to run off the event loop.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

ARMS = ("baton", "incumbent")
QUANTILES = (50, 95, 99)
DEFAULT_RESAMPLES = 1000
MIN_SAMPLES_FOR_VERDICT = 20


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


def bootstrap_quantiles(samples: Sequence[float], quantiles: Sequence[float], resamples: int,
                        rng: np.random.Generator, chunk: int = 100) -> np.ndarray:
    """Bootstrap replicates of each quantile: shape (resamples, len(quantiles))."""
    x = np.asarray(samples, dtype=np.float64)
    out = np.empty((resamples, len(quantiles)))
    for start in range(0, resamples, chunk):  # bounds memory at chunk * n
        stop = min(start + chunk, resamples)
        idx = rng.integers(0, len(x), size=(stop - start, len(x)))
        out[start:stop] = np.percentile(x[idx], quantiles, axis=1).T
    return out


def _ci(replicates: np.ndarray) -> list[float]:
    lo, hi = np.percentile(replicates, [2.5, 97.5])
    return [float(lo), float(hi)]


def summarize(samples: Sequence[float], resamples: int, rng: np.random.Generator
              ) -> tuple[dict[str, Any], np.ndarray | None]:
    """p50/p95/p99 with 95% CIs, plus the p95 bootstrap replicates for the verdict."""
    if not samples:
        return {"n": 0}, None
    x = np.asarray(samples, dtype=np.float64)
    point = np.percentile(x, QUANTILES)
    reps = bootstrap_quantiles(x, QUANTILES, resamples, rng)
    summary: dict[str, Any] = {"n": len(x), "mean": float(x.mean())}
    for k, q in enumerate(QUANTILES):
        summary[f"p{q}"] = {"value": float(point[k]), "ci95": _ci(reps[:, k])}
    return summary, reps[:, QUANTILES.index(95)]


def verdict(baton: np.ndarray | None, incumbent: np.ndarray | None, n_baton: int, n_incumbent: int,
            point_baton: float | None, point_incumbent: float | None, resamples: int,
            min_samples: int = MIN_SAMPLES_FOR_VERDICT) -> dict[str, Any]:
    basis = (f"percentile bootstrap ({resamples} resamples per arm, arms resampled independently): "
             f"95% CI of p95(baton) - p95(incumbent); better if the CI lies entirely below 0, "
             f"worse if entirely above 0, otherwise inconclusive; at least {min_samples} samples "
             f"per arm required")
    result: dict[str, Any] = {"statistic": "p95", "result": "inconclusive", "basis": basis,
                              "n": {"baton": n_baton, "incumbent": n_incumbent}}
    if baton is None or incumbent is None or min(n_baton, n_incumbent) < min_samples:
        result["reason"] = "insufficient samples"
        return result
    lo, hi = _ci(baton - incumbent)
    result.update(difference_s=float(point_baton - point_incumbent), ci95=[lo, hi])
    if hi < 0:
        result["result"] = "better"
    elif lo > 0:
        result["result"] = "worse"
    else:
        result["reason"] = "the 95% CI includes 0"
    return result


def combine(verdicts: Iterable[str]) -> str:
    """Overall: worse if any metric is worse, better if at least one is better and none worse."""
    vs = list(verdicts)
    if "worse" in vs:
        return "worse"
    return "better" if "better" in vs else "inconclusive"


class ABStats:
    """Thread-safe per-arm ring buffers of outcomes (recorded on the loop, read off it)."""

    def __init__(self, window: int = 5000) -> None:
        self._lock = threading.Lock()
        self._window = window
        self._arms: dict[str, deque[Outcome]] = {arm: deque(maxlen=window) for arm in ARMS}
        self._totals = {arm: {"count": 0, "errors": 0} for arm in ARMS}
        self._fallbacks = 0

    def record(self, outcome: Outcome) -> None:
        with self._lock:
            self._arms[outcome.arm].append(outcome)
            self._totals[outcome.arm]["count"] += 1
            self._totals[outcome.arm]["errors"] += 0 if outcome.ok else 1

    def record_fallback(self) -> None:
        with self._lock:
            self._fallbacks += 1

    def reset(self) -> None:
        with self._lock:
            for arm in ARMS:
                self._arms[arm].clear()
                self._totals[arm] = {"count": 0, "errors": 0}
            self._fallbacks = 0

    def snapshot(self) -> tuple[dict[str, list[Outcome]], dict[str, dict[str, int]], int]:
        with self._lock:
            return ({a: list(d) for a, d in self._arms.items()},
                    {a: dict(t) for a, t in self._totals.items()}, self._fallbacks)

    def report(self, sla_classes: Mapping[str, SLATargets], default_sla_class: str | None,
               resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, Any]:
        arms, totals, fallbacks = self.snapshot()
        rng = np.random.default_rng(seed)
        out: dict[str, Any] = {"window": self._window, "fallbacks_to_baton": fallbacks, "arms": {}}
        reps: dict[str, dict[str, tuple[np.ndarray | None, int, float | None]]] = {}
        for arm in ARMS:
            outcomes = arms[arm]
            ok = [o for o in outcomes if o.ok]
            entry: dict[str, Any] = {
                "count": totals[arm]["count"],
                "errors": totals[arm]["errors"],
                "error_rate": totals[arm]["errors"] / totals[arm]["count"] if totals[arm]["count"]
                else None,
                "window_count": len(outcomes),
            }
            reps[arm] = {}
            for metric in ("ttft_s", "e2e_s"):
                values = [getattr(o, metric) for o in ok if getattr(o, metric) is not None]
                summary, p95_reps = summarize(values, resamples, rng)
                entry[metric] = summary
                reps[arm][metric] = (p95_reps, len(values),
                                     summary["p95"]["value"] if values else None)
            entry["sla"] = _attainment(outcomes, sla_classes, default_sla_class)
            out["arms"][arm] = entry
        verdicts = {}
        for metric in ("ttft_s", "e2e_s"):
            (b, nb, pb), (i, ni, pi) = reps["baton"][metric], reps["incumbent"][metric]
            verdicts[metric] = verdict(b, i, nb, ni, pb, pi, resamples)
        out["verdicts"] = verdicts
        out["verdict"] = combine(v["result"] for v in verdicts.values())
        out["verdict_basis"] = ("p95 of ttft_s and e2e_s compared by bootstrap CI of the difference; "
                                "worse if either is worse, better if at least one is better and "
                                "neither worse, otherwise inconclusive")
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
