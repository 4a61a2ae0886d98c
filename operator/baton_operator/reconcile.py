"""Bring the cluster in line with one BatonDeployment: read, compare with the pure builders, write.

The only module besides ``kube`` that talks to the API. Every trigger (the BatonDeployment changed, its
namespace's BatonPolicy changed, its Deployment changed) runs the same idempotent ``reconcile``; the
results come back as an ``Outcome`` (observation for the status, events to post) or as one of:

- ``SpecError``: the spec cannot be realised; permanent until the spec changes;
- ``Waiting``: something outside the spec is missing or in the way; retry after ``delay``;
- ``kube.ApiError``: the API failed; ``kube.classify`` decides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from baton_operator import configmap as cm
from baton_operator import injection as inj
from baton_operator import resources as res
from baton_operator import scaling
from baton_operator.config import OperatorConfig
from baton_operator.kube import ApiError, Kube, path
from baton_operator.policy import deep_merge, effective_policy, policy_hash, select_policy
from baton_operator.rollout.autotune import tuned_padding
from baton_operator.status import Observation, Problem, deployment_progress

Event = tuple[str, str, str]  # (type, reason, message)


AUTOSCALER_UNAVAILABLE = "AutoscalerUnavailable"  # the condition's reason; handlers look again every minute


class Waiting(Exception):
    def __init__(self, reason: str, message: str, delay: float) -> None:
        super().__init__(message)
        self.reason, self.message, self.delay = reason, message, delay


@dataclass
class Outcome:
    observation: Observation
    events: list[Event] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)  # e.g. "created Deployment/x", for traces and logs
    retry_after: float | None = None  # a sidecar rollout is still under way


def reconcile(kube: Kube, cfg: OperatorConfig, bd: Mapping[str, Any],
              policies: Mapping[str, Mapping[str, Any]]) -> Outcome:
    res.check_accelerator(bd.get("spec") or {})
    if (bd.get("spec") or {}).get("mode") == "sidecar":
        return _reconcile_sidecar(kube, cfg, bd, policies)
    return _reconcile_standalone(kube, cfg, bd, policies)


def _reconcile_standalone(kube: Kube, cfg: OperatorConfig, bd: Mapping[str, Any],
                          policies: Mapping[str, Mapping[str, Any]]) -> Outcome:
    meta, spec = bd["metadata"], bd.get("spec") or {}
    ns = meta["namespace"]
    incumbent_url = (spec.get("router") or {}).get("incumbentUrl")
    outcome = Outcome(Observation(meta.get("generation")))
    config_obs = _apply_config(kube, cfg, bd, policies, incumbent_url, outcome)
    autoscaler = scaling.desired_autoscaler(bd, cfg.prometheus_address)
    # The autoscaler first: one being removed must be gone before the Deployment's replicas are restored.
    unavailable = _apply_optional(kube, bd, outcome, autoscaler, [scaling.HPA_API, scaling.KEDA_API])
    # Replicas are written only from spec.replicas, and never nulled: while an autoscaler is wanted they
    # are its own, and without spec.replicas they stay as whoever set them last left them (a removed
    # autoscaler, kubectl scale) rather than snapping back to 1.
    deployment = _apply(kube, path("apps/v1", "deployments", ns), res.desired_deployment(bd, cfg), bd, outcome,
                        handed_over=("replicas",))
    _apply(kube, path("v1", "services", ns), res.desired_service(bd), bd, outcome)
    _apply_optional(kube, bd, outcome, scaling.desired_disruption_budget(bd), [scaling.PDB_API])
    if unavailable is not None:  # everything else is applied; handlers.recheck_autoscaler looks again
        config_obs["warning"] = unavailable
    outcome.observation = Observation(meta.get("generation"), progress=deployment_progress(deployment),
                                      scale=scaling.scale_status(bd, deployment), **config_obs)
    return outcome


def _apply_optional(kube: Kube, bd: Mapping[str, Any], outcome: Outcome, desired: Mapping[str, Any] | None,
                    kinds: list[tuple[str, str]]) -> Problem | None:
    """Make ``desired`` (of one of ``kinds``; None: none) this BatonDeployment's only object of those kinds.
    The others are deleted first, so switching the autoscaler's engine never leaves two autoscalers on one
    Deployment. When the cluster does not serve the wanted kind (KEDA not installed), nothing is deleted
    (an autoscaler already there keeps working) and the problem is returned, for the caller to report
    once the Deployment and Service are applied."""
    ns, name = bd["metadata"]["namespace"], bd["metadata"]["name"]
    wanted = next((kind for kind in kinds if desired is not None and desired["apiVersion"] == kind[0]), None)
    others = []  # this BatonDeployment's objects of the other kinds (a GET of an unserved API is None too)
    for kind in kinds:
        observed = kube.get(path(*kind, ns, name)) if kind != wanted else None
        if observed is not None and res.is_owned_by(observed, bd["metadata"]["uid"]):
            others.append((kind, observed))
    current = kube.get(path(*wanted, ns, name)) if wanted is not None else None
    if wanted is not None and current is None and not _served(kube, *wanted):  # asked only to create one
        return _unavailable(desired)
    for kind, observed in others:
        kube.delete(path(*kind, ns, name))
        outcome.events.append(("Normal", "Deleted", f"Deleted {observed['kind']}/{name}"))
        outcome.changes.append(f"deleted {observed['kind']}/{name}")
    if wanted is not None:
        try:
            _apply(kube, path(*wanted, ns), desired, bd, outcome, observed=current, known=True)
        except ApiError as exc:
            if exc.status != 404:  # 404: the API went away since _served looked
                raise
            return _unavailable(desired)
    return None


def _served(kube: Kube, api_version: str, plural: str) -> bool:
    """Whether the cluster serves ``plural`` (a CRD's kind is not served until the CRD is installed), from
    the API discovery document, which every authenticated client may read: no extra RBAC."""
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    discovery = kube.get(root)
    return discovery is not None and any(r.get("name") == plural for r in discovery.get("resources") or [])


def _unavailable(desired: Mapping[str, Any]) -> Problem:
    return Problem(AUTOSCALER_UNAVAILABLE, f"{desired['kind']} ({desired['apiVersion']}) is not served by this "
                                            f"cluster; install it or choose another engine")


def _reconcile_sidecar(kube: Kube, cfg: OperatorConfig, bd: Mapping[str, Any],
                       policies: Mapping[str, Mapping[str, Any]]) -> Outcome:
    meta, spec = bd["metadata"], bd.get("spec") or {}
    ns, name = meta["namespace"], meta["name"]
    target_name = spec["targetDeployment"]
    service_name = spec.get("targetService") or target_name
    target_path = path("apps/v1", "deployments", ns, target_name)
    service_path = path("v1", "services", ns, service_name)

    target = kube.get(target_path)
    if target is None:
        raise Waiting("TargetNotFound", f"Deployment {target_name!r} not found in {ns!r}", delay=30)
    inj.check_target(target, bd)
    service = kube.get(service_path)
    if service is None:
        raise Waiting("ServiceNotFound", f"Service {service_name!r} not found in {ns!r}", delay=30)
    svc_target = inj.resolve_service_target(service, target, bd)

    outcome = Outcome(Observation(meta.get("generation")))
    config_obs = _apply_config(kube, cfg, bd, policies, f"http://127.0.0.1:{svc_target.incumbent_port}", outcome)

    ops = inj.injection_patch(target, bd, cfg)
    if ops:
        first = inj.injected_by(target) is None
        target = _guarded_patch(kube, target_path, ops, target, f"Deployment {target_name!r}")
        verb = "Injected" if first else "SidecarUpdated"
        outcome.events.append(("Normal", verb, f"{verb} the Baton container in Deployment {target_name!r}"))
        outcome.changes.append(f"{verb.lower()} Deployment/{target_name}")

    progress = deployment_progress(target, require_container=res.CONTAINER_NAME)
    if progress.done and not svc_target.repointed:
        # Only now: before the sidecar pods are available, no pod would carry the port Baton serves on.
        ops = inj.repoint_patch(service, svc_target, by=name)
        _guarded_patch(kube, service_path, ops, service, f"Service {service_name!r}")
        outcome.events.append(("Normal", "ServiceRepointed",
                               f"Service {service_name!r} port {svc_target.port} now routes through Baton "
                               f"(was targetPort {svc_target.original_target_port!r})"))
        outcome.changes.append(f"repointed Service/{service_name}")
    elif not progress.done:
        outcome.retry_after = cfg.rollout_poll_s
    outcome.observation = Observation(meta.get("generation"), progress=progress, **config_obs)
    return outcome


def restore(kube: Kube, bd: Mapping[str, Any]) -> list[Event]:
    """Undo sidecar mode: the Service's targetPort first (the incumbent still listens), then the container.

    Objects that are gone, or that carry no mark of this BatonDeployment, are left alone.
    """
    meta, spec = bd["metadata"], bd.get("spec") or {}
    ns, name = meta["namespace"], meta["name"]
    target_name = spec.get("targetDeployment")
    if not target_name:
        return []
    events: list[Event] = []
    service_name = spec.get("targetService") or target_name
    service_path = path("v1", "services", ns, service_name)
    service = kube.get(service_path)
    if service is not None and (ops := inj.restore_patch(service, by=name)):
        _guarded_patch(kube, service_path, ops, service, f"Service {service_name!r}")
        events.append(("Normal", "ServiceRestored", f"Service {service_name!r} routes to the incumbent again"))
    target_path = path("apps/v1", "deployments", ns, target_name)
    target = kube.get(target_path)
    if target is not None and inj.injected_by(target) == name and (ops := inj.removal_patch(target)):
        _guarded_patch(kube, target_path, ops, target, f"Deployment {target_name!r}")
        events.append(("Normal", "SidecarRemoved", f"Removed the Baton container from Deployment {target_name!r}"))
    return events


# --- helpers ----------------------------------------------------------------------------------

def _apply_config(kube: Kube, cfg: OperatorConfig, bd: Mapping[str, Any],
                  policies: Mapping[str, Mapping[str, Any]], incumbent_url: str | None,
                  outcome: Outcome) -> dict[str, Any]:
    """Write the sidecar's ConfigMap; returns the policy/weight fields for the Observation."""
    meta, spec = bd["metadata"], bd.get("spec") or {}
    ns = meta["namespace"]
    cm_path = path("v1", "configmaps", ns, res.config_map_name(meta["name"]))
    observed = kube.get(cm_path)
    current_weight = cm.config_weight(observed)
    choice = select_policy(policies, (spec.get("policyRef") or {}).get("name"))
    policy = effective_policy(cfg.default_policy, choice.spec, spec)
    if tuned := tuned_padding(spec.get("rollout"), (bd.get("status") or {}).get("rollout")):
        policy = deep_merge(policy, {"padding": tuned})  # the rollout's auto-tune, recorded in status
    digest = policy_hash(policy)
    weight = cm.desired_weight(spec, incumbent_url, current_weight)
    shadow = cm.desired_shadow(spec, incumbent_url, cm.config_shadow(observed))
    config = cm.sidecar_config(policy, cm.router_config(spec, incumbent_url, weight, shadow))
    desired = cm.desired_config_map(bd, config, digest)
    previous_hash = ((observed or {}).get("metadata", {}).get("annotations") or {}).get(res.ANN_POLICY_HASH)
    _apply(kube, path("v1", "configmaps", ns), desired, bd, outcome, observed=observed, known=True)
    source = f"{ns}/{choice.name}" if choice.name else "operator-defaults"
    if previous_hash is not None and previous_hash != digest:
        outcome.events.append(("Normal", "PolicyApplied", f"effective policy {digest} (from {source})"))
    warning = Problem("PolicyFallback", choice.problem) if choice.problem else None
    return {"policy_hash": digest, "policy_source": source, "weight": weight, "warning": warning}


def _apply(kube: Kube, collection: str, desired: Mapping[str, Any], bd: Mapping[str, Any], outcome: Outcome,
           observed: Mapping[str, Any] | None = None, known: bool = False,
           handed_over: tuple[str, ...] = ()) -> dict[str, Any]:
    """Create ``desired`` or merge-patch it into an existing object this BatonDeployment owns."""
    name = desired["metadata"]["name"]
    what = f"{desired['kind']}/{name}"
    object_path = f"{collection}/{name}"
    if not known:
        observed = kube.get(object_path)
    if observed is None:
        try:
            created = kube.create(collection, desired)
            outcome.events.append(("Normal", "Created", f"Created {what}"))
            outcome.changes.append(f"created {what}")
            return created
        except ApiError as exc:
            if exc.status != 409:
                raise
            observed = kube.get(object_path)  # created meanwhile (a concurrent reconcile): patch it instead
            if observed is None:
                raise Waiting("Conflict", f"{what} is being created and deleted concurrently", delay=2) from exc
    if not res.is_owned_by(observed, bd["metadata"]["uid"]):
        raise Waiting("ObjectConflict", f"{what} exists and is not owned by this BatonDeployment; "
                                        f"rename or delete it", delay=60)
    body = res.update_body(desired, observed, handed_over)
    if body is None:
        return dict(observed)
    try:
        updated = kube.merge_patch(object_path, body)
    except ApiError as exc:
        if exc.status == 409:
            raise Waiting("Conflict", f"{what} changed while being updated; retrying", delay=1) from exc
        raise
    outcome.changes.append(f"updated {what}")
    return updated


def _guarded_patch(kube: Kube, object_path: str, ops: list[dict[str, Any]], observed: Mapping[str, Any],
                   what: str) -> dict[str, Any]:
    """Apply a JSON patch built from ``observed``; a failed ``test`` op (422) or 409 means a concurrent
    change, told apart from an invalid patch by re-reading the resourceVersion."""
    try:
        return kube.json_patch(object_path, ops)
    except ApiError as exc:
        if exc.status == 409:
            raise Waiting("Conflict", f"{what} changed concurrently; retrying", delay=1) from exc
        if exc.status == 422:
            fresh = kube.get(object_path)
            seen = (observed.get("metadata") or {}).get("resourceVersion")
            if fresh is None or (fresh.get("metadata") or {}).get("resourceVersion") != seen:
                raise Waiting("Conflict", f"{what} changed concurrently; retrying", delay=1) from exc
        raise


def policies_in(entries: Any) -> dict[str, dict[str, Any]]:
    """``{name: spec}`` from an index store of ``(name, spec)`` pairs (kopf.Store or any iterable)."""
    return {name: dict(spec) for name, spec in entries or []}


def snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a BatonDeployment that reconcile needs, as plain data (safe to keep in an index)."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion", res.API_VERSION),
        "kind": body.get("kind", res.KIND),
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid", "generation", "deletionTimestamp")},
        "spec": json.loads(json.dumps(dict(body.get("spec") or {}))),
        "status": json.loads(json.dumps(dict(body.get("status") or {}))),
    }
