"""Scaling builders (autoscalers, disruption budget, replicas handed over), the accelerator check, and
leader election's settings: pure functions, plus validation of what they build against the Kubernetes
schemas (kubernetes-validate) and KEDA's CRD (../shared/crds)."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml

from baton_operator import resources as res
from baton_operator import scaling
from baton_operator.config import OperatorConfig
from baton_operator.leadership import ElectionSettings
from baton_operator.resources import SpecError
from crd_schema import CRDValidator
from operator_testlib import ROOT

CFG = OperatorConfig(sidecar_image="registry.example/baton-sidecar:test")
K8S_VERSIONS = ("1.28", "1.32")
SHARED_CRDS = ROOT.parent / "shared" / "crds"
PROMETHEUS = "http://prometheus.monitoring:9090"


def bd(**spec) -> dict:
    return {"apiVersion": res.API_VERSION, "kind": res.KIND,
            "metadata": {"name": "b1", "namespace": "ns", "uid": "uid-1", "generation": 3},
            "spec": {"mode": "standalone", **spec}}


def keda_validator() -> CRDValidator:
    path = SHARED_CRDS / "keda.sh_scaledobjects.yaml"
    if not path.exists():
        pytest.skip(f"{path} is absent (reference CRDs live beside the repository; see its README)")
    return CRDValidator(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize("metric, series", sorted(scaling.METRIC_SERIES.items()))
def test_hpa_reads_the_metric_per_pod_and_validates(metric, series) -> None:
    target = 0.7 if metric == "kvUsage" else 4
    hpa = scaling.desired_autoscaler(bd(autoscaling={"maxReplicas": 5, "metric": metric, "target": target}), None)
    assert hpa["kind"] == "HorizontalPodAutoscaler" and hpa["metadata"]["name"] == "b1"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "b1"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 5)
    (entry,) = hpa["spec"]["metrics"]
    assert entry["type"] == "Pods" and entry["pods"]["metric"]["name"] == series
    assert entry["pods"]["target"] == {"type": "AverageValue",
                                       "averageValue": "700m" if metric == "kvUsage" else "4"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert res.is_owned_by(hpa, "uid-1")
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(hpa, version, strict=True)


def test_metric_series_are_ones_the_sidecar_exports() -> None:
    """A renamed engine gauge must break this, not the autoscaler in production."""
    import inspect

    from baton_sidecar.server import metrics
    source = inspect.getsource(metrics.EngineCollector)
    for series in scaling.METRIC_SERIES.values():
        assert f'"{series}"' in source


def test_keda_scaled_object_sums_the_deployments_pods_and_validates() -> None:
    spec = {"autoscaling": {"engine": "keda", "minReplicas": 2, "maxReplicas": 8, "metric": "queueDepth",
                            "target": 3, "scaleDownStabilizationSeconds": 120}}
    obj = scaling.desired_autoscaler(bd(**spec), PROMETHEUS)
    assert obj["apiVersion"] == "keda.sh/v1alpha1" and obj["kind"] == "ScaledObject"
    assert (obj["spec"]["minReplicaCount"], obj["spec"]["maxReplicaCount"]) == (2, 8)
    (trigger,) = obj["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"] == {
        "serverAddress": PROMETHEUS, "threshold": "3",
        "query": 'sum(baton_engine_waiting_requests{namespace="ns",pod=~"b1-[a-z0-9]+-[a-z0-9]+"})'}
    behavior = obj["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 120
    assert keda_validator().errors(obj) == []


GO_FLOAT = r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?"  # what KEDA's strconv.ParseFloat accepts


@pytest.mark.parametrize("target, hpa_value, keda_value", [
    (0.7, "700m", "0.7"), (4, "4", "4"), (2.5, "2500m", "2.5"), (0.001, "1m", "0.001"),
    (0.0004, "1m", "0.0004"),  # below the CRD's minimum: never the invalid quantity "0"
])
def test_targets_are_quantities_for_the_hpa_and_plain_decimals_for_keda(target, hpa_value, keda_value) -> None:
    auto = {"maxReplicas": 4, "metric": "kvUsage", "target": target}
    hpa = scaling.desired_autoscaler(bd(autoscaling=auto), None)
    assert hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == hpa_value
    keda = scaling.desired_autoscaler(bd(autoscaling={**auto, "engine": "keda"}), PROMETHEUS)
    threshold = keda["spec"]["triggers"][0]["metadata"]["threshold"]
    assert threshold == keda_value and re.fullmatch(GO_FLOAT, threshold)


def test_keda_needs_a_prometheus_and_the_spec_overrides_the_default() -> None:
    auto = {"engine": "keda", "maxReplicas": 3, "target": 2}
    with pytest.raises(SpecError) as caught:
        scaling.desired_autoscaler(bd(autoscaling=auto), None)
    assert caught.value.field == "spec.autoscaling.prometheusAddress"
    own = scaling.desired_autoscaler(bd(autoscaling={**auto, "prometheusAddress": "http://p:9090"}), PROMETHEUS)
    assert own["spec"]["triggers"][0]["metadata"]["serverAddress"] == "http://p:9090"


def test_no_autoscaler_without_autoscaling_or_in_sidecar_mode() -> None:
    assert scaling.desired_autoscaler(bd(replicas=3), PROMETHEUS) is None
    sidecar = bd(autoscaling={"maxReplicas": 3, "target": 1})
    sidecar["spec"]["mode"] = "sidecar"
    assert scaling.desired_autoscaler(sidecar, PROMETHEUS) is None


def test_replicas_are_written_only_without_an_autoscaler() -> None:
    assert res.desired_deployment(bd(replicas=3), CFG)["spec"]["replicas"] == 3
    scaled = res.desired_deployment(bd(replicas=3, autoscaling={"maxReplicas": 5, "target": 4}), CFG)
    assert "replicas" not in scaled["spec"]


def test_turning_autoscaling_on_never_nulls_the_replicas_the_autoscaler_now_owns() -> None:
    """A merge patch nulling ``replicas`` would reset the Deployment to 1 pod before the HPA scales back."""
    fixed = res.desired_deployment(bd(replicas=3), CFG)
    observed = {**fixed, "metadata": {**fixed["metadata"], "resourceVersion": "9"},
                "spec": {**fixed["spec"], "replicas": 3}}
    scaled = res.desired_deployment(bd(replicas=3, autoscaling={"maxReplicas": 5, "target": 4}), CFG)
    nulls_it = res.update_body(scaled, observed)
    assert nulls_it is not None and nulls_it["spec"].get("replicas", "absent") is None  # the hazard
    body = res.update_body(scaled, observed, handed_over=("replicas",))
    assert body is None or "replicas" not in (body.get("spec") or {})
    # The autoscaler moved replicas to 5: still nothing to write.
    observed["spec"]["replicas"] = 5
    body = res.update_body(scaled, observed, handed_over=("replicas",))
    assert body is None or "replicas" not in (body.get("spec") or {})
    # Autoscaling off again: the spec's replicas come back, and once written there is nothing more to write.
    assert res.update_body(fixed, observed, handed_over=("replicas",))["spec"]["replicas"] == 3
    settled = {**fixed, "metadata": {**fixed["metadata"], "resourceVersion": "10"}}
    assert res.update_body(fixed, settled, handed_over=("replicas",)) is None


def test_without_spec_replicas_removing_the_autoscaler_keeps_the_pods_it_scaled_to() -> None:
    """Like a Deployment applied without ``replicas``: 1 on creation, then whoever scaled it last."""
    plain = res.desired_deployment(bd(), CFG)
    assert "replicas" not in plain["spec"]  # the API server's default, 1, on creation
    scaled = res.desired_deployment(bd(autoscaling={"maxReplicas": 9, "target": 4}), CFG)
    observed = {**scaled, "metadata": {**scaled["metadata"], "resourceVersion": "9"},
                "spec": {**scaled["spec"], "replicas": 8}}  # the autoscaler's doing
    body = res.update_body(plain, observed, handed_over=("replicas",))
    assert body is None or "replicas" not in (body.get("spec") or {})


@pytest.mark.parametrize("spec, expected", [
    ({"replicas": 1}, None),
    ({"replicas": 3}, 1),
    ({"replicas": 1, "autoscaling": {"maxReplicas": 4, "target": 2}}, 1),
    ({"replicas": 3, "podDisruptionBudget": {"enabled": False}}, None),
    ({"replicas": 1, "podDisruptionBudget": {"enabled": True}}, 1),
    ({"replicas": 4, "podDisruptionBudget": {"maxUnavailable": "25%"}}, "25%"),
])
def test_disruption_budget_is_on_once_there_can_be_several_pods(spec, expected) -> None:
    pdb = scaling.desired_disruption_budget(bd(**spec))
    if expected is None:
        assert pdb is None
        return
    assert pdb["spec"]["maxUnavailable"] == expected
    assert pdb["spec"]["selector"] == {"matchLabels": res.selector_labels("b1")}
    pod_labels = res.desired_deployment(bd(**spec), CFG)["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(pdb, version, strict=True)


def test_scale_status_names_the_autoscaler_and_clears_it_when_removed() -> None:
    deployment = {"spec": {"replicas": 4}, "status": {"replicas": 4, "readyReplicas": 3}}
    on = scaling.scale_status(bd(autoscaling={"engine": "keda", "minReplicas": 2, "maxReplicas": 6, "target": 1}),
                              deployment)
    assert on == {"desiredReplicas": 4, "replicas": 4, "readyReplicas": 3, "autoscaler": "ScaledObject/b1",
                  "minReplicas": 2, "maxReplicas": 6}
    off = scaling.scale_status(bd(replicas=2), deployment)
    assert off["autoscaler"] is None and off["minReplicas"] is None  # None: removed by the merge patch


@pytest.mark.parametrize("resources, refused", [
    (None, True),
    ({"limits": {"memory": "8Gi"}}, True),
    ({"limits": {"nvidia.com/gpu": 1}}, False),
    ({"requests": {"amd.com/gpu": 1}}, False),
    ({"limits": {"nvidia.com/mig-1g.10gb": 1}}, False),
])
def test_cuda_without_a_gpu_request_is_refused(resources, refused) -> None:
    spec = {"mode": "sidecar", "targetDeployment": "llm", "engine": {"device": "cuda:0"}}
    if resources is not None:
        spec["resources"] = resources
    if refused:
        with pytest.raises(SpecError) as caught:
            res.check_accelerator(spec)
        assert caught.value.field == "spec.engine.device" and "nvidia.com/gpu" in str(caught.value)
    else:
        res.check_accelerator(spec)
    res.check_accelerator({**spec, "engine": {"device": "cpu"}})  # a CPU sidecar needs nothing


# --- leader election settings (the protocol: test_operator_leadership.py) -------------------------


def test_election_settings_come_from_the_environment() -> None:
    assert ElectionSettings.from_env({}) is None
    settings = ElectionSettings.from_env({"BATON_LEADER_ELECTION": "true", "POD_NAME": "op-1",
                                          "POD_NAMESPACE": "baton-system"})
    assert settings.namespace == "baton-system" and settings.identity.startswith("op-1_")
    again = ElectionSettings.from_env({"BATON_LEADER_ELECTION": "true", "POD_NAME": "op-1", "POD_NAMESPACE": "x"})
    assert again.identity != settings.identity  # a restarted container is a new candidate
    with pytest.raises(ValueError, match="renew deadline"):
        ElectionSettings(namespace="x", lease_s=5, renew_deadline_s=6, retry_s=1)

