"""The rollout controller: one kopf daemon per BatonDeployment with ``spec.rollout``; a thin adapter.

Every ``BATON_ROLLOUT_TICK_SECONDS`` it reads the rollout state from ``status.rollout``, gathers the
sidecars' ``/baton/ab/report`` when an analysis is due, asks ``rollout.decide.decide`` what to do, and
applies the decision: the weight (and, in the shadow stage, the share of the incumbent's requests mirrored
to Baton) into the ConfigMap the sidecars read (first), ``status.rollout`` and
``status.traffic.weight`` (then), a Kubernetes Event and a ``baton.rollout`` span. Phase and conditions
are recomputed by the same reconcile that every other trigger runs (``status.build_status`` reads the
rollout's phase), so the two writers agree. Nothing lives in memory between ticks: an operator restarted
mid-rollout resumes at the recorded step, and asks each sidecar for the outcomes since the cursor recorded
for it in ``status.rollout.baseline.pods`` (the same step's traffic, no more).

Where the reports come from: the ready endpoints of the Service in front of the sidecars (standalone:
the BatonDeployment's own Service; sidecar mode: the target Service), from its EndpointSlices, at
``http://<podIP>:<spec.port>``. With
``BATON_ROLLOUT_ALLOW_REPORT_URLS=true`` the annotation ``baton.dev/report-urls`` (comma-separated base
URLs) replaces the EndpointSlices: for sidecars the operator cannot reach by pod IP, and for tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Mapping

import kopf

from baton_operator import configmap as cm
from baton_operator import handlers
from baton_operator import reconcile as rec
from baton_operator import resources as res
from baton_operator import tracing
from baton_operator.kube import ApiError, Kube, path
from baton_operator.policy import DEFAULT_POLICY
from baton_operator.rollout.autotune import KNOBS, TuneResult, TuneState, auto_tune
from baton_operator.rollout.decide import Decision, decide, wants_measurement
from baton_operator.rollout.gather import (ANN_REPORT_URLS, endpoint_report_urls, engine_sample, fetch_all, measure,
                                           report_urls_from_annotation, service_name)
from baton_operator.rollout.record import rollout_status
from baton_operator.rollout.spec import RolloutSpec, revision
from baton_operator.rollout.state import FAILED_PHASES, RolloutState
from baton_operator.status import traffic_conditions_stale


def _has_rollout(spec: kopf.Spec, **_: Any) -> bool:
    return bool(spec.get("rollout"))


@kopf.daemon(*handlers.BD, id="rollout", when=_has_rollout, cancellation_timeout=10)
async def rollout_daemon(stopped: kopf.DaemonStopped, body: kopf.Body, memo: kopf.Memo,
                         baton_policies: kopf.Index, logger: logging.Logger, **_: Any) -> None:
    meta = body.get("metadata") or {}
    bd_path = path(res.API_VERSION, "batondeployments", meta.get("namespace"), meta.get("name"))
    while not stopped:
        try:
            # Read afresh, not from the watch: the last tick's own status write must be seen.
            fresh = await asyncio.to_thread(memo.kube.get, bd_path)
            if fresh is None or (fresh.get("metadata") or {}).get("deletionTimestamp"):
                return
            await tick(memo, fresh, baton_policies, logger)
        except ApiError as exc:  # a conflict or an unreachable API: the next tick starts afresh
            logger.warning(f"rollout tick: {exc}")
        except Exception:
            logger.exception("rollout tick failed")
        await stopped.wait(memo.config.rollout_tick_s)


async def tick(memo: kopf.Memo, body: Mapping[str, Any], baton_policies: Any, logger: logging.Logger,
               now: float | None = None) -> Decision | None:
    """One look at one rollout: gather and decide, write the weight and ``status.rollout``, post the
    Events, and have phase and conditions recomputed when they moved. None: nothing to decide yet."""
    bd = rec.snapshot(body)
    annotations = dict((body.get("metadata") or {}).get("annotations") or {})
    previous = dict(bd["status"].get("rollout") or {})
    ready = await _ready(memo.kube, bd)
    if isinstance(ready, str):  # why there is nothing to decide: recorded as the rollout's message
        await _write_rollout_status(memo.kube, bd["metadata"], previous, {**previous, "message": ready}, None)
        return None
    rspec, config_map = ready
    now = time.time() if now is None else now
    decision, urls = await _decide(memo, bd, annotations, rspec, previous, now, logger)
    tuned = await _auto_tune(memo, rspec, decision, previous, urls, bd, annotations, now, logger)
    new = {**rollout_status(decision, previous, now), "autoTune": tuned.status if tuned else previous.get("autoTune")}
    weight_changed = await _apply(memo.kube, bd, config_map, decision, tuned, previous, new)
    _post_events(body, decision, tuned)
    fresh_status = {**bd["status"], "rollout": new}
    if (weight_changed or decision.state.phase != previous.get("phase") or (tuned and tuned.change)
            or traffic_conditions_stale(fresh_status)):
        # Phase and conditions (and the tuned policy) come from the one reconcile every trigger runs.
        policies = rec.policies_in(baton_policies.get(bd["metadata"]["namespace"], []))
        await asyncio.to_thread(handlers.reconcile_and_write_status, memo, {**bd, "status": fresh_status},
                                policies, "rollout", logger)
    if decision.action != "wait":
        logger.info(f"rollout {decision.action} at {decision.weight}%: {decision.reason}")
    return decision


async def _ready(kube: Kube, bd: Mapping[str, Any]) -> tuple[RolloutSpec, dict[str, Any]] | str:
    """The parsed ``spec.rollout`` and the observed ConfigMap, or why the rollout cannot go on."""
    try:
        rspec = RolloutSpec.from_spec(bd["spec"].get("rollout"))
    except ValueError as exc:
        return str(exc)
    config_map = await asyncio.to_thread(kube.get, _config_map_path(bd["metadata"]))
    if config_map is None:
        return "waiting for the ConfigMap"
    if not (cm.parse_config(config_map).get("router") or {}).get("incumbent_url"):
        return "no incumbent: Baton serves all traffic, there is nothing to roll out"
    return rspec, config_map


async def _decide(memo: kopf.Memo, bd: Mapping[str, Any], annotations: Mapping[str, str], rspec: RolloutSpec,
                  previous: Mapping[str, Any], now: float, logger: logging.Logger
                  ) -> tuple[Decision, list[str] | None]:
    """Gather the sidecars' reports if ``decide`` can use them now, and decide: (decision, the URLs read)."""
    state = RolloutState.from_status(previous)
    rev = revision(bd["spec"])
    urls: list[str] | None = None
    measurement = None
    if wants_measurement(rspec, state, rev, now):
        urls = await _report_urls(memo, bd, annotations, logger)
        # The shadow stage reads only the paired block: no raw samples to pool.
        measurement = await measure(urls, memo.config.report_timeout_s, state.baseline, samples=not state.shadowing)
    # Pure, but pooling and sorting every pod's samples is CPU work: off the loop.
    return await asyncio.to_thread(decide, rspec, state, rev, now, measurement), urls


async def _apply(kube: Kube, bd: Mapping[str, Any], config_map: Mapping[str, Any], decision: Decision,
                 tuned: TuneResult | None, previous: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """The weight and shadow share into the ConfigMap the sidecars read (first), then ``status.rollout``
    (the record of it), in a ``baton.rollout`` span; returns whether either changed."""
    meta = bd["metadata"]
    analysis = new["analysis"] or {}
    with tracing.span("rollout", namespace=meta["namespace"], resource_name=meta["name"],
                      generation=meta.get("generation"), action=decision.action, step=decision.state.step,
                      weight=decision.weight, shadow_percent=decision.shadow_percent or None,
                      phase=decision.state.phase,
                      result=analysis.get("result") if decision.checks else None,
                      failed_checks=",".join(analysis.get("failedChecks") or []) or None,
                      tuned=tuned.change.knob if tuned and tuned.change else None):
        weight_changed = (cm.config_weight(config_map), cm.config_shadow(config_map)) != (
            decision.weight, decision.shadow_percent)
        if weight_changed:
            await asyncio.to_thread(kube.merge_patch, _config_map_path(meta),
                                    cm.config_map_traffic_patch(config_map, decision.weight, decision.shadow_percent))
        await _write_rollout_status(kube, meta, previous, new, decision.weight)
    return weight_changed


def _post_events(body: Mapping[str, Any], decision: Decision, tuned: TuneResult | None) -> None:
    if decision.event is not None:
        kopf.event(dict(body), type=decision.event[0], reason=decision.event[1], message=decision.event[2])
    if tuned and tuned.change:
        change = tuned.change
        kopf.event(dict(body), type="Normal", reason="PolicyTuned",
                   message=f"padding.{change.knob} {change.from_} -> {change.to}: {change.reason}")


def _config_map_path(meta: Mapping[str, Any]) -> str:
    return path("v1", "configmaps", meta["namespace"], res.config_map_name(meta["name"]))


async def _write_rollout_status(kube: Kube, meta: Mapping[str, Any], previous: Mapping[str, Any],
                                new: Mapping[str, Any], weight: float | None) -> None:
    if dict(new) == dict(previous):
        return
    status: dict[str, Any] = {"rollout": res.with_removals(dict(new), dict(previous))}
    if weight is not None:
        status["traffic"] = {"weight": weight}
    await asyncio.to_thread(kube.merge_patch, path(res.API_VERSION, "batondeployments", meta["namespace"],
                                                   meta["name"], "status"), {"status": status})


async def _report_urls(memo: kopf.Memo, bd: Mapping[str, Any], annotations: Mapping[str, str],
                       logger: logging.Logger) -> list[str]:
    explicit = report_urls_from_annotation({"metadata": {"annotations": annotations}})
    if explicit is not None:
        if memo.config.allow_report_urls:
            return explicit
        logger.warning(f"ignoring the {ANN_REPORT_URLS} annotation (BATON_ROLLOUT_ALLOW_REPORT_URLS is off)")
    meta, spec = bd["metadata"], bd["spec"]
    slices = await asyncio.to_thread(memo.kube.list, path("discovery.k8s.io/v1", "endpointslices", meta["namespace"]),
                                     f"kubernetes.io/service-name={service_name(bd)}")
    return endpoint_report_urls(slices, res.baton_port(spec))


async def _auto_tune(memo: kopf.Memo, rspec: RolloutSpec, decision: Decision, previous: Mapping[str, Any],
                     urls: list[str] | None, bd: Mapping[str, Any], annotations: Mapping[str, str], now: float,
                     logger: logging.Logger) -> TuneResult | None:
    """One auto-tune round per analysis interval while Baton takes traffic (off unless enabled)."""
    if not rspec.auto_tune.enabled or decision.weight <= 0 or decision.state.phase in FAILED_PHASES:
        return None
    state = TuneState.from_status(previous.get("autoTune"))
    if state.last_time is not None and now - state.last_time < rspec.interval_s:
        return None
    if urls is None:
        urls = await _report_urls(memo, bd, annotations, logger)
    pages, errors = await fetch_all(urls, res.METRICS_PATH, memo.config.report_timeout_s, as_json=False)
    sample = engine_sample(pages, now) if pages and not errors else None
    if sample is None:
        return None
    config_map = await asyncio.to_thread(memo.kube.get, _config_map_path(bd["metadata"]))
    padding = (cm.parse_config(config_map).get("policy") or {}).get("padding") or {}
    defaults = DEFAULT_POLICY["padding"]
    current = {camel: float(padding.get(snake, defaults[snake])) for camel, snake in KNOBS}
    return auto_tune(rspec.auto_tune, current, state, sample)
