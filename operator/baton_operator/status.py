"""Status of a BatonDeployment: conditions (Ready, Progressing, Degraded), phase, and whether its
Deployment has rolled out (``DeploymentProgress``).

Pure. ``Observation`` is everything one reconcile learnt; ``build_status`` turns it into the
``status`` stanza, keeping ``lastTransitionTime`` of conditions whose status did not change.

``status.rollout`` is the progressive (traffic) rollout, not the Deployment's: it belongs to the rollout
controller (the ``rollout`` package). This module never writes it, but reads its ``phase`` so that every
writer derives the same conditions from it: a rollout under way keeps ``Progressing`` true (reason
``TrafficShifting``), a promoted one turns it false (``Promoted``), a rolled back or aborted one sets
``Degraded`` (reason ``RolledBack``/``Aborted``, phase ``Degraded``).
``status.traffic.weight`` mirrors the ConfigMap's ``router.baton_weight``, whoever set it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from baton_operator.rollout.state import ACTIVE_PHASES, FAILED_PHASES, PROMOTED

READY, PROGRESSING, DEGRADED = "Ready", "Progressing", "Degraded"
PHASES = ("Pending", "Progressing", "Ready", "Degraded", "Failed")
# status.rollout.phase values, as the rollout package writes them.
TRAFFIC_ACTIVE = ACTIVE_PHASES
TRAFFIC_FAILED = FAILED_PHASES
TRAFFIC_PROMOTED = PROMOTED
TRAFFIC_SHIFTING = "TrafficShifting"  # the Progressing condition's reason while traffic shifts


@dataclass(frozen=True)
class DeploymentProgress:
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
    progress: DeploymentProgress | None = None  # None: no Deployment to look at (yet)
    problem: Problem | None = None  # blocks reconciliation
    warning: Problem | None = None  # reconciled, but not as asked (e.g. policy fallback)
    policy_hash: str | None = None
    policy_source: str | None = None
    weight: float | None = None
    scale: dict[str, Any] | None = None  # status.scale (standalone mode): replicas and who sets them


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def deployment_progress(deployment: Mapping[str, Any] | None,
                        require_container: str | None = None) -> DeploymentProgress:
    if deployment is None:
        return DeploymentProgress(False, "DeploymentMissing", "the Deployment does not exist")
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    name = deployment.get("metadata", {}).get("name")

    def rolling(message: str) -> DeploymentProgress:
        return DeploymentProgress(False, "RollingOut", f"Deployment {name!r}: {message}")

    if require_container is not None:
        containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
        if not any(c.get("name") == require_container for c in containers):
            return DeploymentProgress(False, "SidecarMissing",
                                      f"Deployment {name!r} has no {require_container!r} container")
    generation = (deployment.get("metadata") or {}).get("generation")
    if generation is not None and (status.get("observedGeneration") or 0) < generation:
        return DeploymentProgress(False, "RolloutPending", f"Deployment {name!r}: waiting for the controller to see "
                                                           f"generation {generation}")
    replicas = spec.get("replicas", 1)
    updated = status.get("updatedReplicas") or 0
    total = status.get("replicas") or 0
    available = status.get("availableReplicas") or 0
    if updated < replicas:
        return rolling(f"{updated} of {replicas} replicas updated")
    if total > updated:
        return rolling(f"{total - updated} old replicas terminating")
    if available < updated:
        return rolling(f"{available} of {updated} replicas available")
    return DeploymentProgress(True, "DeploymentAvailable", f"Deployment {name!r}: {available} of {replicas} replicas "
                                                           f"available")


def _condition(kind: str, ok: bool, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    cond: dict[str, Any] = {"type": kind, "status": "True" if ok else "False", "reason": reason,
                            "message": message}
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def conditions_for(obs: Observation, traffic: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Ready/Progressing/Degraded; ``traffic`` is ``status.rollout`` (the rollout controller's state)."""
    gen = obs.generation
    blocking = obs.problem
    progress = obs.progress
    traffic_phase, traffic_message = _traffic(traffic)
    if blocking is not None:
        ready = _condition(READY, False, blocking.reason, blocking.message, gen)
        progressing = _condition(PROGRESSING, False, blocking.reason, blocking.message, gen)
    elif progress is None:
        ready = _condition(READY, False, "Reconciling", "children are being created", gen)
        progressing = _condition(PROGRESSING, True, "Reconciling", "children are being created", gen)
    else:
        ready = _condition(READY, progress.done, progress.reason, progress.message, gen)
        progressing = _condition(PROGRESSING, not progress.done, progress.reason, progress.message, gen)
        if progress.done and traffic_phase in TRAFFIC_ACTIVE:
            progressing = _condition(PROGRESSING, True, TRAFFIC_SHIFTING, traffic_message, gen)
        elif progress.done and traffic_phase == TRAFFIC_PROMOTED:
            progressing = _condition(PROGRESSING, False, TRAFFIC_PROMOTED, traffic_message, gen)
    if blocking is None and traffic_phase in TRAFFIC_FAILED:
        degraded = _condition(DEGRADED, True, traffic_phase, traffic_message, gen)
    elif trouble := blocking or obs.warning:
        degraded = _condition(DEGRADED, True, trouble.reason, trouble.message, gen)
    else:
        degraded = _condition(DEGRADED, False, "AsExpected", "", gen)
    return [ready, progressing, degraded]


def _traffic(traffic: Mapping[str, Any] | None) -> tuple[str | None, str]:
    traffic = traffic or {}
    return traffic.get("phase"), str(traffic.get("message") or "")


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


def phase_of(obs: Observation, traffic: Mapping[str, Any] | None = None) -> str:
    if obs.problem is not None:
        return "Failed" if obs.problem.permanent else "Degraded"
    if obs.progress is None:
        return "Pending"
    if not obs.progress.done:
        return "Progressing"
    traffic_phase, _ = _traffic(traffic)
    if obs.warning is not None or traffic_phase in TRAFFIC_FAILED:
        return "Degraded"
    return "Progressing" if traffic_phase in TRAFFIC_ACTIVE else "Ready"


def traffic_conditions_stale(status: Mapping[str, Any] | None) -> bool:
    """Whether phase and conditions lag behind ``status.rollout.phase`` (a concurrent writer built them
    from an older rollout state); the rollout controller then has them recomputed."""
    status = status or {}
    traffic_phase, _ = _traffic(status.get("rollout"))
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    degraded, progressing = conditions.get(DEGRADED) or {}, conditions.get(PROGRESSING) or {}
    if traffic_phase in TRAFFIC_FAILED:
        return degraded.get("status") != "True"
    if traffic_phase in TRAFFIC_ACTIVE:
        return degraded.get("reason") in TRAFFIC_FAILED or progressing.get("status") != "True"
    if traffic_phase == TRAFFIC_PROMOTED:
        return degraded.get("reason") in TRAFFIC_FAILED or progressing.get("reason") == TRAFFIC_SHIFTING
    return False


def build_status(obs: Observation, previous: Mapping[str, Any] | None, now: str | None = None) -> dict[str, Any]:
    """The ``status`` stanza to merge-patch in; fields not observed this time are left out (kept)."""
    previous = previous or {}
    traffic = previous.get("rollout")
    status: dict[str, Any] = {
        "phase": phase_of(obs, traffic),
        "conditions": merge_conditions(previous.get("conditions"), conditions_for(obs, traffic), now or now_iso()),
    }
    if obs.generation is not None:
        status["observedGeneration"] = obs.generation
    if obs.policy_hash is not None:
        status["policyHash"] = obs.policy_hash
        status["policySource"] = obs.policy_source
    if obs.weight is not None:
        status["traffic"] = {"weight": obs.weight}
    if obs.scale is not None:
        status["scale"] = obs.scale
    return status


def status_changed(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether merge-patching ``new`` would change ``previous`` (ignoring transition stamps)."""
    previous = previous or {}
    for key, value in new.items():
        if key == "conditions":
            strip = lambda conds: [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in conds or []]
            if strip(previous.get("conditions")) != strip(value):
                return True
        elif isinstance(value, dict) and isinstance(previous.get(key), dict):
            if previous[key] != {k: v for k, v in value.items() if v is not None}:  # None: a key removed
                return True
        elif previous.get(key) != value:
            return True
    return False
