"""What one rollout tick writes into ``status.rollout``: the decision's state, the last analysis
(``analysis_status``) and ``lastDecision``, as ``rollout_status``; ``autoTune`` is the auto-tuner's.

Pure. Shapes (docs/operator.md, "Status of a rollout")::

    analysis:     {time, pods, arms: {baton: {...}, incumbent: {...}}, checks: [...], failedChecks: [...],
                   result, counted, rebased, truncated, latencyBasis, traffic: {...}}
                  in the shadow stage: {time, pods, arms: {}, checks: [pairedVerdict], failedChecks, result,
                   paired: {pairs, verdict, basis, sidecars: {url: the sidecar's paired block}}, traffic}
    lastDecision: {action, reason, time}   # time of the first of a run of identical decisions
    analyses:     [{time, step, weight, result, arms: {baton: {p95, ci95, ttftP95, requests}, incumbent: ...}}]
                  one entry per analysis round of the revision, the last ANALYSES_LIMIT (the rollout's
                  picture: weight and p95 with CIs over time)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from baton_operator.rollout.decide import Decision
from baton_operator.rollout.gates import FAIL, overall
from baton_operator.rollout.measurement import ARMS, Arm, PodReport
from baton_operator.rollout.times import iso


ANALYSES_LIMIT = 60  # analysis rounds kept in status.rollout.analyses (a few KB)


def rollout_status(decision: Decision, previous: Mapping[str, Any], now: float) -> dict[str, Any]:
    """``status.rollout`` after ``decision``, but for ``autoTune``; ``previous`` is the one it replaces."""
    new = decision.state.to_status()
    new["analysis"] = analysis_status(decision, previous.get("analysis"))
    new["lastDecision"] = last_decision(decision, previous.get("lastDecision"), now)
    same_revision = previous.get("revision") == new["revision"]
    new["analyses"] = analyses_status(decision, previous if same_revision else {})
    return new


def analyses_status(decision: Decision, previous: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``status.rollout.analyses``: ``previous``'s plus this tick's round, if one ran (bounded). The round
    judged the step ``previous`` stood at; the decision may already have moved on from it."""
    kept = [dict(entry) for entry in previous.get("analyses") or [] if isinstance(entry, Mapping)]
    if not decision.checks:
        return kept[-ANALYSES_LIMIT:]
    view = decision.view
    entry: dict[str, Any] = {"time": iso(decision.state.last_analysis_at), "step": previous.get("step"),
                             "weight": previous.get("weight"), "result": overall(decision.checks)}
    if view is not None:
        entry["arms"] = {name: _arm_point(view.arms[name]) for name in ARMS}
    if decision.paired is not None:
        entry["pairs"] = decision.paired.to_status().get("pairs")
    return [*kept, entry][-ANALYSES_LIMIT:]


def _arm_point(a: Arm) -> dict[str, Any]:
    """One arm of a round, compactly: e2e p95 with its CI, TTFT p95, requests."""
    point: dict[str, Any] = {"requests": a.requests}
    if a.e2e_p95 is not None:
        e2e = a.e2e_p95.to_status()
        point.update(p95=e2e["value"], ci95=e2e["ci95"])
    if a.ttft_p95 is not None:
        point["ttftP95"] = a.ttft_p95.to_status()["value"]
    return point


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
