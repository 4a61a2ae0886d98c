"""Status of a BatonDeployment: conditions (Ready, Progressing, Degraded), phase, and rollout readiness.

Pure. ``Observation`` is everything one reconcile learnt; ``build_status`` turns it into the
``status`` stanza, keeping ``lastTransitionTime`` of conditions whose status did not change.

Fields owned by the rollout controller (issue 7), which this module never writes: ``status.rollout``
(``step``, ``phase``, ``message``, ``lastAnalysisTime``). ``status.traffic.weight`` mirrors the
ConfigMap's ``router.baton_weight``, whoever set it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

READY, PROGRESSING, DEGRADED = "Ready", "Progressing", "Degraded"
PHASES = ("Pending", "Progressing", "Ready", "Degraded", "Failed")


@dataclass(frozen=True)
class Rollout:
    """Whether a Deployment has finished rolling out its current template (as `kubectl rollout status`)."""

    done: bool
    reason: str
    message: str


@dataclass(frozen=True)
class Problem:
    reason: str  # CamelCase, e.g. InvalidSpec, TargetNotFound
    message: str
    permanent: bool = False  # retrying will not help until the spec changes


@dataclass(frozen=True)
class Observation:
    generation: int | None
    rollout: Rollout | None = None  # None: no Deployment to look at (yet)
    problem: Problem | None = None  # blocks reconciliation
    warning: Problem | None = None  # reconciled, but not as asked (e.g. policy fallback)
    policy_hash: str | None = None
    policy_source: str | None = None
    weight: float | None = None


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def deployment_rollout(deployment: Mapping[str, Any] | None, require_container: str | None = None) -> Rollout:
    if deployment is None:
        return Rollout(False, "DeploymentMissing", "the Deployment does not exist")
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    name = deployment.get("metadata", {}).get("name")
    if require_container is not None:
        containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
        if not any(c.get("name") == require_container for c in containers):
            return Rollout(False, "SidecarMissing", f"Deployment {name!r} has no {require_container!r} container")
    generation = (deployment.get("metadata") or {}).get("generation")
    if generation is not None and (status.get("observedGeneration") or 0) < generation:
        return Rollout(False, "RolloutPending", f"Deployment {name!r}: waiting for the controller to see "
                                                f"generation {generation}")
    replicas = spec.get("replicas", 1)
    updated = status.get("updatedReplicas") or 0
    total = status.get("replicas") or 0
    available = status.get("availableReplicas") or 0
    if updated < replicas:
        return Rollout(False, "RollingOut", f"Deployment {name!r}: {updated} of {replicas} replicas updated")
    if total > updated:
        return Rollout(False, "RollingOut", f"Deployment {name!r}: {total - updated} old replicas terminating")
    if available < updated:
        return Rollout(False, "RollingOut", f"Deployment {name!r}: {available} of {updated} replicas available")
    return Rollout(True, "DeploymentAvailable", f"Deployment {name!r}: {available} of {replicas} replicas available")


def _condition(kind: str, ok: bool, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    cond: dict[str, Any] = {"type": kind, "status": "True" if ok else "False", "reason": reason,
                            "message": message}
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def conditions_for(obs: Observation) -> list[dict[str, Any]]:
    gen = obs.generation
    blocking = obs.problem
    rollout = obs.rollout
    if blocking is not None:
        ready = _condition(READY, False, blocking.reason, blocking.message, gen)
        progressing = _condition(PROGRESSING, False, blocking.reason, blocking.message, gen)
    elif rollout is None:
        ready = _condition(READY, False, "Reconciling", "children are being created", gen)
        progressing = _condition(PROGRESSING, True, "Reconciling", "children are being created", gen)
    else:
        ready = _condition(READY, rollout.done, rollout.reason, rollout.message, gen)
        progressing = _condition(PROGRESSING, not rollout.done, rollout.reason, rollout.message, gen)
    trouble = blocking or obs.warning
    degraded = (_condition(DEGRADED, True, trouble.reason, trouble.message, gen) if trouble
                else _condition(DEGRADED, False, "AsExpected", "", gen))
    return [ready, progressing, degraded]


def merge_conditions(previous: Iterable[Mapping[str, Any]] | None, current: list[dict[str, Any]],
                     now: str) -> list[dict[str, Any]]:
    """Stamp ``lastTransitionTime``: kept from ``previous`` when the status is unchanged."""
    before = {c.get("type"): c for c in previous or []}
    merged = []
    for cond in current:
        old = before.get(cond["type"])
        stamp = old.get("lastTransitionTime") if old and old.get("status") == cond["status"] else None
        merged.append({**cond, "lastTransitionTime": stamp or now})
    return merged


def phase_of(obs: Observation) -> str:
    if obs.problem is not None:
        return "Failed" if obs.problem.permanent else "Degraded"
    if obs.rollout is None:
        return "Pending"
    if not obs.rollout.done:
        return "Progressing"
    return "Degraded" if obs.warning is not None else "Ready"


def build_status(obs: Observation, previous: Mapping[str, Any] | None, now: str | None = None) -> dict[str, Any]:
    """The ``status`` stanza to merge-patch in; fields not observed this time are left out (kept)."""
    previous = previous or {}
    status: dict[str, Any] = {
        "phase": phase_of(obs),
        "conditions": merge_conditions(previous.get("conditions"), conditions_for(obs), now or now_iso()),
    }
    if obs.generation is not None:
        status["observedGeneration"] = obs.generation
    if obs.policy_hash is not None:
        status["policyHash"] = obs.policy_hash
        status["policySource"] = obs.policy_source
    if obs.weight is not None:
        status["traffic"] = {"weight": obs.weight}
    return status


def status_changed(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether merge-patching ``new`` would change ``previous`` (ignoring transition stamps)."""
    previous = previous or {}
    for key, value in new.items():
        if key == "conditions":
            strip = lambda conds: [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in conds or []]
            if strip(previous.get("conditions")) != strip(value):
                return True
        elif previous.get(key) != value:
            return True
    return False
