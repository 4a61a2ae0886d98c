"""kopf handlers: thin adapters from kopf's triggers to ``reconcile`` and back to status and Events.

Triggers that reconcile one BatonDeployment:
- the BatonDeployment itself is created, changed, or seen at operator start (resume);
- a BatonPolicy of its namespace is created, changed or deleted (every BatonDeployment there);
- a Deployment labelled ``baton.dev/deployment=<name>`` changes (its child, or its sidecar target).

The progressive rollout runs beside these, as a daemon per BatonDeployment with ``spec.rollout``
(``rollout_controller``): it writes the ConfigMap's ``router.baton_weight`` and ``router.shadow_percent``
and ``status.rollout``, and has phase and conditions recomputed through ``reconcile_and_write_status``.
``reconcile`` keeps whatever weight and shadow share it finds while ``spec.rollout`` is set, so the two
never fight.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
from typing import Any

import kopf

from baton_operator import reconcile as rec
from baton_operator import resources as res
from baton_operator import tracing
from baton_operator.config import OperatorConfig
from baton_operator.health import serve_health
from baton_operator.kube import (ApiError, Kube, classify, load_api_client, path,
                                 refresh_kubeconfig_location)
from baton_operator.leadership import ElectionSettings, LeaderElection
from baton_operator.resources import SpecError
from baton_operator.status import Observation, Problem, build_status, status_changed

BD = (res.GROUP, res.VERSION, "batondeployments")
BP = (res.GROUP, res.VERSION, "batonpolicies")
DRAIN_S = 10.0  # how long a stopping leader waits for its threads' API calls before releasing the Lease


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    settings.persistence.finalizer = f"{res.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=res.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=res.GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # user-visible Events are posted explicitly, not from logs
    settings.scanning.disabled = True  # CRDs are installed before the operator; no namespace listing
    settings.peering.standalone = True  # replicas elect a leader with a Lease instead (leadership.py)
    settings.execution.max_workers = 8
    # Only Deployments the operator created or injected into; filtered by the API server, not here.
    settings.watching.label_selectors["apps", "deployments"] = res.LABEL_INSTANCE
    memo.config = OperatorConfig.from_env()
    memo.kube = Kube(load_api_client())
    if tracing.setup():
        logger.info("exporting traces over OTLP/HTTP")
    if getattr(memo, "health", None) is None:  # kopf retries a failed startup handler: serve once
        address = os.environ.get("BATON_HEALTH_ADDRESS")
        memo.health = await serve_health(address) if address else None
    try:
        election = ElectionSettings.from_env()
    except ValueError as exc:  # bad timings: no retry helps, so stop with the reason
        raise kopf.PermanentError(str(exc)) from exc
    # kopf starts no watch, daemon or timer before the startup handlers return: a standby waits here.
    memo.election = None
    if election is not None:
        memo.election = LeaderElection(memo.kube, election, logging.getLogger("baton_operator.leadership"))
        await memo.election.acquire()
        memo.keeping_lead = memo.election.start_keeping()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster credentials, else the kubeconfig named by ``KUBECONFIG`` now (exec plugins included)."""
    refresh_kubeconfig_location()
    return kopf.login_via_client(**kwargs)


@kopf.on.cleanup()
async def step_aside(memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """A clean stop hands the Lease back at once, so a standby need not wait for it to expire; but only
    once the API calls that stopped rollout daemons left running in threads (``asyncio.to_thread``: kopf
    cancels the coroutine, not the thread) have ended, so none of ours lands after a new leader's."""
    if getattr(memo, "election", None) is not None:
        memo.keeping_lead.cancel()
        try:
            await asyncio.wait_for(asyncio.get_running_loop().shutdown_default_executor(), DRAIN_S)
        except asyncio.TimeoutError:
            logger.warning(f"API calls still running after {DRAIN_S} s; the Lease is left to expire")
        else:
            await memo.election.release_soon()
    if getattr(memo, "health", None) is not None:
        await memo.health.cleanup()


@kopf.on.cleanup()
def flush_traces(**_: Any) -> None:
    tracing.shutdown()


# --- indexes: what reconcile needs without extra API calls -------------------------------------

@kopf.index(*BP)
def baton_policies(namespace: str, name: str, spec: kopf.Spec, **_: Any) -> dict[str, Any]:
    return {namespace: (name, copy.deepcopy(dict(spec)))}


@kopf.index(*BD)
def baton_deployments(namespace: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
    return {namespace: rec.snapshot(body)}


# --- BatonDeployment ---------------------------------------------------------------------------

@kopf.on.resume(*BD)
@kopf.on.create(*BD)
@kopf.on.update(*BD)
def reconcile_deployment(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo,
                         reason: str, baton_policies: kopf.Index, logger: logging.Logger, **_: Any) -> None:
    bd = rec.snapshot(body)
    policies = rec.policies_in(baton_policies.get(bd["metadata"]["namespace"], []))
    trigger = str(getattr(reason, "value", reason))
    new_status, events, error = _reconcile(memo, bd, policies, trigger, dict(status))
    patch.status.update(new_status)
    _post(bd, events)
    if error is not None:
        raise error


@kopf.on.delete(*BD, when=lambda spec, **_: spec.get("mode") == "sidecar")
def restore_target(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    bd = rec.snapshot(body)
    meta = bd["metadata"]
    with tracing.span("restore", namespace=meta["namespace"], resource_name=meta["name"],
                      generation=meta["generation"], action="delete"):
        try:
            events = rec.restore(memo.kube, bd)
        except rec.Waiting as wait:
            raise kopf.TemporaryError(wait.message, delay=wait.delay) from wait
        except ApiError as exc:
            raise classify(exc, "restoring the sidecar target") from exc
    _post(bd, events)


def _autoscaler_unavailable(status: kopf.Status, **_: Any) -> bool:
    return any(c.get("type") == "Degraded" and c.get("reason") == rec.AUTOSCALER_UNAVAILABLE
               for c in status.get("conditions") or [])


@kopf.timer(*BD, id="autoscaler-recheck", interval=60, initial_delay=60, when=_autoscaler_unavailable)
def recheck_autoscaler(body: kopf.Body, memo: kopf.Memo, baton_policies: kopf.Index, logger: logging.Logger,
                       **_: Any) -> None:
    """KEDA may be installed after the BatonDeployment that wants it: look again every minute. A retry of
    the main handler would do it too, but would hold back every spec change until it ran."""
    bd = rec.snapshot(body)
    policies = rec.policies_in(baton_policies.get(bd["metadata"]["namespace"], []))
    reconcile_and_write_status(memo, bd, policies, "autoscaler-recheck", logger)


# --- BatonPolicy: re-reconcile every BatonDeployment of the namespace ---------------------------

@kopf.on.create(*BP)
@kopf.on.update(*BP)
def policy_changed(namespace: str, name: str, spec: kopf.Spec, memo: kopf.Memo, baton_policies: kopf.Index,
                   baton_deployments: kopf.Index, logger: logging.Logger, **_: Any) -> None:
    policies = rec.policies_in(baton_policies.get(namespace, []))
    policies[name] = dict(spec)
    _propagate(memo, namespace, policies, baton_deployments, logger)


@kopf.on.delete(*BP)
def policy_deleted(namespace: str, name: str, memo: kopf.Memo, baton_policies: kopf.Index,
                   baton_deployments: kopf.Index, logger: logging.Logger, **_: Any) -> None:
    policies = rec.policies_in(baton_policies.get(namespace, []))
    policies.pop(name, None)
    _propagate(memo, namespace, policies, baton_deployments, logger)


def _propagate(memo: kopf.Memo, namespace: str, policies: dict[str, Any], baton_deployments: kopf.Index,
               logger: logging.Logger) -> None:
    retry: kopf.TemporaryError | None = None
    for bd in list(baton_deployments.get(namespace, [])):
        if bd["metadata"].get("deletionTimestamp"):
            continue
        error = reconcile_and_write_status(memo, bd, policies, "policy-change", logger)
        if isinstance(error, kopf.TemporaryError) and "Conflict" in str(error):
            retry = error  # a concurrent writer won; go round again with fresh reads
    if retry is not None:
        raise retry


# --- Deployments the operator manages or injected into -----------------------------------------

@kopf.on.event("apps", "v1", "deployments", labels={res.LABEL_INSTANCE: kopf.PRESENT})
def deployment_event(type: str, body: kopf.Body, namespace: str, memo: kopf.Memo,
                     baton_policies: kopf.Index, baton_deployments: kopf.Index, logger: logging.Logger,
                     **_: Any) -> None:
    owner = body.get("metadata", {}).get("labels", {}).get(res.LABEL_INSTANCE)
    bd = next((b for b in baton_deployments.get(namespace, []) if b["metadata"]["name"] == owner), None)
    if bd is None or bd["metadata"].get("deletionTimestamp"):
        return
    policies = rec.policies_in(baton_policies.get(namespace, []))
    reconcile_and_write_status(memo, bd, policies, f"deployment-{(type or 'listed').lower()}", logger)


# --- shared plumbing ---------------------------------------------------------------------------

def _reconcile(memo: kopf.Memo, bd: dict[str, Any], policies: dict[str, Any], trigger: str,
               previous: dict[str, Any]) -> tuple[dict[str, Any], list[rec.Event], Exception | None]:
    """Run one reconcile in a span; returns (status to write, events to post, kopf error to raise)."""
    meta = bd["metadata"]
    generation = meta.get("generation")
    ended = not bd["spec"].get("rollout") and previous.get("rollout") is not None
    if ended:  # spec.rollout was removed: its state no longer shapes the conditions, and is cleared
        previous = {k: v for k, v in previous.items() if k != "rollout"}
    error: Exception | None = None
    events: list[rec.Event] = []
    try:
        with tracing.span("reconcile", namespace=meta["namespace"], resource_name=meta["name"],
                          generation=generation, action=trigger, mode=bd["spec"].get("mode")) as span:
            try:
                outcome = rec.reconcile(memo.kube, memo.config, bd, policies)
            except SpecError as exc:
                obs = Observation(generation, problem=Problem("InvalidSpec", str(exc), permanent=True))
                events.append(("Warning", "InvalidSpec", str(exc)))
                raise kopf.PermanentError(str(exc)) from exc
            except rec.Waiting as wait:
                obs = Observation(generation, problem=Problem(wait.reason, wait.message))
                raise kopf.TemporaryError(f"{wait.reason}: {wait.message}", delay=wait.delay) from wait
            except ApiError as exc:
                kopf_error = classify(exc, "reconciling")
                obs = Observation(generation, problem=Problem(
                    "ApiError", str(exc), permanent=isinstance(kopf_error, kopf.PermanentError)))
                raise kopf_error from exc
            span.set_attribute("baton.changes", ",".join(outcome.changes) or "none")
            span.set_attribute("baton.phase", build_status(outcome.observation, previous)["phase"])
            obs, events = outcome.observation, outcome.events
            if outcome.retry_after is not None:
                error = kopf.TemporaryError(outcome.observation.progress.message if outcome.observation.progress
                                            else "waiting", delay=outcome.retry_after)
    except (kopf.PermanentError, kopf.TemporaryError) as exc:
        error = exc
    status = build_status(obs, previous)
    if ended:
        status["rollout"] = None
    return status, events, error


def reconcile_and_write_status(memo: kopf.Memo, bd: dict[str, Any], policies: dict[str, Any], trigger: str,
                               logger: logging.Logger) -> Exception | None:
    """Reconcile outside the BatonDeployment's own handler (a policy or Deployment event, the rollout
    controller): status goes through the API."""
    meta = bd["metadata"]
    previous = bd.get("status") or {}
    new_status, events, error = _reconcile(memo, bd, policies, trigger, previous)
    if status_changed(previous, new_status):
        try:
            memo.kube.merge_patch(path(res.API_VERSION, "batondeployments", meta["namespace"], meta["name"],
                                       "status"), {"status": new_status})
        except ApiError as exc:
            logger.warning(f"could not update the status of {meta['namespace']}/{meta['name']}: {exc}")
    _post(bd, events)
    if error is not None:
        logger.info(f"{meta['namespace']}/{meta['name']} ({trigger}): {error}")
    return error


def _post(bd: dict[str, Any], events: list[rec.Event]) -> None:
    for kind, reason, message in events:
        kopf.event(bd, type=kind, reason=reason, message=message)
