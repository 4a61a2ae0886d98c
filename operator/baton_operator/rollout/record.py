"""What one rollout tick writes into ``status.rollout``: the decision's state, the last analysis
(``analysis_status``) and ``lastDecision``, as ``rollout_status``; ``autoTune`` is the auto-tuner's.

Pure. Shapes (docs/operator.md, "Status of a rollout")::

    analysis:     {time, pods, arms: {baton: {...}, incumbent: {...}}, checks: [...], failedChecks: [...],
                   result, counted, rebased, truncated, latencyBasis, traffic: {...}}
                  in the shadow stage: {time, pods, arms: {}, checks: [pairedVerdict], failedChecks, result,
                   paired: {pairs, verdict, basis, sidecars: {url: the sidecar's paired block}}, traffic}
    lastDecision: {action, reason, time}   # time of the first of a run of identical decisions
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from baton_operator.rollout.decide import Decision
from baton_operator.rollout.gates import FAIL, overall
from baton_operator.rollout.measurement import ARMS, Arm, PodReport
from baton_operator.rollout.times import iso


def rollout_status(decision: Decision, previous: Mapping[str, Any], now: float) -> dict[str, Any]:
    """``status.rollout`` after ``decision``, but for ``autoTune``; ``previous`` is the one it replaces."""
    new = decision.state.to_status()
    new["analysis"] = analysis_status(decision, previous.get("analysis"))
    new["lastDecision"] = last_decision(decision, previous.get("lastDecision"), now)
    return new


def last_decision(decision: Decision, previous: Mapping[str, Any] | None, now: float) -> Mapping[str, Any] | None:
    """``lastDecision``: a ``wait`` keeps the previous one; a decision repeating the previous (same
    action and reason) keeps its time, so the time says since when the rollout has stood so."""
    last = previous or {}
    if decision.action == "wait":
        return last or None
    same = last.get("action") == decision.action and last.get("reason") == decision.reason
    return {"action": decision.action, "reason": decision.reason, "time": last.get("time") if same else iso(now)}


def analysis_status(decision: Decision, previous: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``status.rollout.analysis``: the last analysis (kept from ``previous`` when none ran now)."""
    if not decision.checks:
        return dict(previous) if previous else None
    m, view = decision.measurement, decision.view
    out = {
        "time": iso(decision.state.last_analysis_at), "pods": m.pods if m else 0,
        "arms": {name: _arm_status(view.arms[name]) for name in ARMS} if view is not None else {},
        "checks": [c.to_status() for c in decision.checks],
        "failedChecks": [c.name for c in decision.checks if c.result == FAIL],
        "result": overall(decision.checks),
    }
    if view is not None:
        out.update(counted=len(view.counted), rebased=list(view.rebased), truncated=view.truncated,
                   latencyBasis="pooled samples" if view.exact else "mean of the pods' p95s (older sidecars)")
    if decision.paired is not None:
        out["paired"] = decision.paired.to_status()
    if m is not None and m.reports:
        out["traffic"] = traffic_status(m.reports)
    return out


def _arm_status(a: Arm) -> dict[str, Any]:
    return {
        "requests": a.requests, "errors": a.errors,
        "errorRate": round(a.errors / a.requests, 6) if a.requests > 0 else None,
        "p95LatencySeconds": a.e2e_p95.to_status() if a.e2e_p95 else None,
        "p95TtftSeconds": a.ttft_p95.to_status() if a.ttft_p95 else None,
        "slaAttainment": round(a.sla_attainment, 6) if a.sla_attainment is not None else None,
    }


def traffic_status(reports: Sequence[PodReport]) -> dict[str, Any]:
    """How much of the traffic the pilot judges: requests both arms can serve (split by weight) and
    the rest (passed to the incumbent), summed over the sidecars since they started."""
    eligible = sum(r.eligible for r in reports)
    ineligible = sum(r.ineligible for r in reports)
    total = eligible + ineligible
    return {"eligibleRequests": eligible, "ineligibleRequests": ineligible,
            "judgedShare": round(eligible / total, 4) if total else None}
