"""Scaling a standalone BatonDeployment: the autoscaler it owns (an ``autoscaling/v2``
HorizontalPodAutoscaler or a KEDA ScaledObject) and its PodDisruptionBudget.

Pure, like ``resources``: a BatonDeployment body in, desired objects out.

The metric each autoscaler reads is one of the sidecar's own engine gauges, per pod:

==================  ===================================  ==========================================
``metric``          series (``/baton/metrics``)           target means
==================  ===================================  ==========================================
``queueDepth``      ``baton_engine_waiting_requests``     requests waiting for admission, per pod
``kvUsage``         ``baton_engine_kv_usage_ratio``       KV slots used / budget (0..1), per pod
``runningRequests`` ``baton_engine_running_requests``     requests in the running batch, per pod
==================  ===================================  ==========================================

With ``hpa`` the series reaches the HPA as a Pods metric of the same name through the Prometheus adapter
(its rule is in the chart's values, ``prometheusAdapter``); with ``keda`` a Prometheus trigger sums it
over the Deployment's pods and KEDA divides by the target (``AverageValue``), which is the same
per-pod average. Either way the autoscaler writes the Deployment's ``replicas``, and the operator stops
writing it (``resources.desired_deployment`` leaves it out).
"""

from __future__ import annotations

from typing import Any, Mapping

from baton_operator import resources as res

HPA_API = ("autoscaling/v2", "horizontalpodautoscalers")
KEDA_API = ("keda.sh/v1alpha1", "scaledobjects")
PDB_API = ("policy/v1", "poddisruptionbudgets")
AUTOSCALER_KINDS = {"hpa": "HorizontalPodAutoscaler", "keda": "ScaledObject"}

METRIC_SERIES = {
    "queueDepth": "baton_engine_waiting_requests",
    "kvUsage": "baton_engine_kv_usage_ratio",
    "runningRequests": "baton_engine_running_requests",
}
DEFAULT_STABILIZATION_S = 300  # the HPA's own default for scaling down


def autoscaling_of(bd: Mapping[str, Any]) -> dict[str, Any] | None:
    """``spec.autoscaling`` of a standalone BatonDeployment (None: fixed ``replicas``)."""
    spec = bd.get("spec") or {}
    if spec.get("mode") == "sidecar":
        return None  # refused by the schema; the target Deployment's own scaling applies
    autoscaling = spec.get("autoscaling")
    return dict(autoscaling) if autoscaling else None


def engine_of(autoscaling: Mapping[str, Any]) -> str:
    return str(autoscaling.get("engine") or "hpa")


def desired_autoscaler(bd: Mapping[str, Any], prometheus_address: str | None) -> dict[str, Any] | None:
    """The HPA or ScaledObject for ``bd`` (named like its Deployment), or None without autoscaling.

    ``prometheus_address``: the operator's default Prometheus for KEDA triggers
    (``BATON_PROMETHEUS_ADDRESS``); ``spec.autoscaling.prometheusAddress`` overrides it.
    """
    autoscaling = autoscaling_of(bd)
    if autoscaling is None:
        return None
    if engine_of(autoscaling) == "keda":
        address = autoscaling.get("prometheusAddress") or prometheus_address
        if not address:
            raise res.SpecError("spec.autoscaling.prometheusAddress",
                                "required with engine keda: the operator has no default Prometheus "
                                "(BATON_PROMETHEUS_ADDRESS, the chart's autoscaling.prometheusAddress)")
        return _scaled_object(bd, autoscaling, address)
    return _hpa(bd, autoscaling)


def _bounds(autoscaling: Mapping[str, Any]) -> tuple[int, int]:
    return int(autoscaling.get("minReplicas", 1)), int(autoscaling["maxReplicas"])


def _target(autoscaling: Mapping[str, Any]) -> str:
    """The per-pod target as a Kubernetes quantity string (``0.7`` -> ``700m``; HPA targets are quantities).
    The CRD's minimum is 0.001, so it never rounds to an invalid ``0``."""
    milli = max(1, round(float(autoscaling["target"]) * 1000))
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def _threshold(autoscaling: Mapping[str, Any]) -> str:
    """The target as KEDA's prometheus scaler reads it: a plain decimal (Go's ParseFloat), never a
    quantity such as ``700m``, which it refuses."""
    return format(float(autoscaling["target"]), "g")


def _series(autoscaling: Mapping[str, Any]) -> str:
    return METRIC_SERIES[str(autoscaling.get("metric") or "queueDepth")]


def _stabilization(autoscaling: Mapping[str, Any]) -> int:
    return int(autoscaling.get("scaleDownStabilizationSeconds", DEFAULT_STABILIZATION_S))


def _scale_target(bd: Mapping[str, Any]) -> dict[str, str]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": bd["metadata"]["name"]}


def _hpa(bd: Mapping[str, Any], autoscaling: Mapping[str, Any]) -> dict[str, Any]:
    low, high = _bounds(autoscaling)
    return res.stamped({
        "apiVersion": HPA_API[0],
        "kind": "HorizontalPodAutoscaler",
        "metadata": res.child_metadata(bd, bd["metadata"]["name"]),
        "spec": {
            "scaleTargetRef": _scale_target(bd),
            "minReplicas": low,
            "maxReplicas": high,
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": _series(autoscaling)},
                "target": {"type": "AverageValue", "averageValue": _target(autoscaling)}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": _stabilization(autoscaling)}},
        },
    })


def prometheus_query(bd: Mapping[str, Any], series: str) -> str:
    """The sum of ``series`` over the Deployment's pods. Pods are matched by name (the Deployment's
    name, a ReplicaSet hash, a pod suffix), which every scrape config labels, unlike pod labels."""
    meta = bd["metadata"]
    return f'sum({series}{{namespace="{meta["namespace"]}",pod=~"{meta["name"]}-[a-z0-9]+-[a-z0-9]+"}})'


def _scaled_object(bd: Mapping[str, Any], autoscaling: Mapping[str, Any], address: str) -> dict[str, Any]:
    low, high = _bounds(autoscaling)
    series = _series(autoscaling)
    return res.stamped({
        "apiVersion": KEDA_API[0],
        "kind": "ScaledObject",
        "metadata": res.child_metadata(bd, bd["metadata"]["name"]),
        "spec": {
            "scaleTargetRef": _scale_target(bd),
            "minReplicaCount": low,
            "maxReplicaCount": high,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                "scaleDown": {"stabilizationWindowSeconds": _stabilization(autoscaling)}}}},
            "triggers": [{"type": "prometheus", "metricType": "AverageValue", "metadata": {
                "serverAddress": address,
                "query": prometheus_query(bd, series),
                "threshold": _threshold(autoscaling),
            }}],
        },
    })


# --- disruption budget ------------------------------------------------------------------------

def desired_disruption_budget(bd: Mapping[str, Any]) -> dict[str, Any] | None:
    """A PodDisruptionBudget keeping all but ``maxUnavailable`` (default 1) pods through voluntary
    disruptions (drains, node upgrades). On by default once there can be more than one pod: with one,
    ``maxUnavailable: 1`` protects nothing, and ``minAvailable: 1`` would block every drain."""
    spec = bd.get("spec") or {}
    if spec.get("mode") == "sidecar":
        return None  # the user's own Deployment: its PDB is theirs
    settings = spec.get("podDisruptionBudget") or {}
    autoscaling = autoscaling_of(bd)
    most = int(autoscaling["maxReplicas"]) if autoscaling else int(spec.get("replicas", 1))
    if not settings.get("enabled", most > 1):
        return None
    name = bd["metadata"]["name"]
    return res.stamped({
        "apiVersion": PDB_API[0],
        "kind": "PodDisruptionBudget",
        "metadata": res.child_metadata(bd, name),
        "spec": {
            "maxUnavailable": settings.get("maxUnavailable", 1),
            "selector": {"matchLabels": res.selector_labels(name)},
            # A pod still loading its model is not serving: evicting it costs nothing.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    })


def scale_status(bd: Mapping[str, Any], deployment: Mapping[str, Any] | None) -> dict[str, Any]:
    """``status.scale``: the Deployment's desired and current replicas, and who sets them."""
    autoscaling = autoscaling_of(bd)
    spec = (deployment or {}).get("spec") or {}
    status = (deployment or {}).get("status") or {}
    out: dict[str, Any] = {
        "desiredReplicas": int(spec.get("replicas", 1)),
        "replicas": int(status.get("replicas") or 0),
        "readyReplicas": int(status.get("readyReplicas") or 0),
    }
    # None removes a key in the status merge patch (autoscaling was turned off).
    out["autoscaler"] = out["minReplicas"] = out["maxReplicas"] = None
    if autoscaling is not None:
        out["autoscaler"] = f"{AUTOSCALER_KINDS[engine_of(autoscaling)]}/{bd['metadata']['name']}"
        out["minReplicas"], out["maxReplicas"] = _bounds(autoscaling)
    return out
