"""Shared helpers for the rollout tests: synthetic A/B reports in the sidecar's own format, states.

Named uniquely (not ``helpers``): ``tests/`` has no packages, so every test directory shares one module
namespace. Puts ``operator/`` and ``tests/operator/`` (the API emulator harness) on ``sys.path``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for extra in (ROOT / "operator", ROOT / "tests" / "operator"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from baton_sidecar.server.abstats import ABStats, Outcome, SLATargets  # noqa: E402

from baton_operator import rollout as ro  # noqa: E402

SLA = {"interactive": SLATargets(ttft_ms=1000.0, e2e_ms=2000.0)}


def arm_outcomes(arm: str, latencies: Sequence[float], errors: int = 0, ttft_fraction: float | None = 0.3,
                 ) -> list[Outcome]:
    """Outcomes with the given e2e latencies (s); TTFT a fixed fraction of e2e (None: unknown, as for a
    non-streamed incumbent answer); ``errors`` failed requests on top."""
    out = [Outcome(arm, ok=True, e2e_s=float(x), ttft_s=None if ttft_fraction is None else float(x) * ttft_fraction,
                   completion_tokens=8) for x in latencies]
    out += [Outcome(arm, ok=False, e2e_s=0.01) for _ in range(errors)]
    return out


def report(baton: Sequence[Outcome], incumbent: Sequence[Outcome], weight: float = 25,
           resamples: int = 400) -> dict[str, Any]:
    """A real ``GET /ab/report`` body (the sidecar's ``ABStats``) for the given outcomes."""
    stats = ABStats()
    for outcome in [*baton, *incumbent]:
        stats.record(outcome)
    rep = stats.report(SLA, "interactive", resamples=resamples)
    rep["router"] = {"incumbent_url": "http://incumbent", "baton_weight": weight, "sticky_header": "",
                     "fallback_to_baton": False}
    return rep


def normal(mean: float, sd: float, n: int, seed: int) -> np.ndarray:
    return np.clip(np.random.default_rng(seed).normal(mean, sd, n), 0.001, None)


def state_at(step: int, weight: float, rev: str = "rev", failures: int = 0, applied_at: float = 0.0,
             baseline: ro.Counts | None = None, phase: str = ro.PROGRESSING) -> ro.RolloutState:
    """A rollout at ``step`` whose weight every sidecar applies since ``applied_at``, analysed long ago."""
    return ro.RolloutState(revision=rev, phase=phase, step=step, weight=weight, step_started_at=applied_at,
                           applied_at=applied_at, last_analysis_at=applied_at, failures=failures,
                           baseline=baseline or ro.Counts({a: 0 for a in ro.ARMS}, {a: 0 for a in ro.ARMS}))
