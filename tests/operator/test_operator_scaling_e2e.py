"""Autoscaling end to end: the real operator under kopf against the emulated API server (with KEDA's CRD
declared from ../shared/crds), driven by kubectl. The tests play the HPA and the Deployment controller by
writing what they would write.

One BatonDeployment goes through hpa -> keda -> no autoscaling: the operator creates the right object,
never writes the replicas the autoscaler set, deletes the autoscaler it no longer wants, and then
restores the spec's replicas. On a cluster without KEDA, asking for it still reconciles the rest and
keeps the autoscaler already there.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from operator_testlib import CRD_DIR, ROOT, Cluster, wait_for

pytestmark = [pytest.mark.operator_e2e, pytest.mark.timeout(180)]

WAIT = 30  # seconds; generous for a 2-core machine, reached only on failure
KEDA_CRD = ROOT.parent / "shared" / "crds" / "keda.sh_scaledobjects.yaml"
PROMETHEUS = "http://prometheus.monitoring:9090"
# Fully qualified: the emulator keeps each API version's objects apart, and kubectl would pick one.
HPA, PDB = "horizontalpodautoscalers.v2.autoscaling", "poddisruptionbudgets.v1.policy"


@pytest.fixture(params=["with KEDA"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """The emulated API server with Baton's CRDs, and KEDA's ScaledObject CRD unless the test asks for a
    cluster without it (``@pytest.mark.parametrize("cluster", ["without KEDA"], indirect=True)``)."""
    from baton_kube_emulator import EmulatorThread

    crds = sorted(CRD_DIR.glob("*.yaml"))
    if request.param == "with KEDA":
        if not KEDA_CRD.exists():
            pytest.skip(f"{KEDA_CRD} is absent (reference CRDs live beside the repository; see its README)")
        crds.append(KEDA_CRD)
    namespace = f"scale-{uuid.uuid4().hex[:6]}"
    with EmulatorThread(crds) as emulator:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(emulator.kubeconfig(namespace))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        yield Cluster(emulator.url, namespace, kubeconfig)


def _apply(cluster: Cluster, tmp_path: Path, spec: dict) -> None:
    path = tmp_path / "bd.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "baton.dev/v1alpha1", "kind": "BatonDeployment",
                                    "metadata": {"name": "scaled"}, "spec": spec}))
    cluster.apply(path)


def _scale(cluster: Cluster) -> dict:
    return ((cluster.get("bd", "scaled") or {}).get("status") or {}).get("scale") or {}


def test_hpa_then_keda_then_fixed_replicas(cluster: Cluster, operator, tmp_path: Path, monkeypatch) -> None:
    base = {"mode": "standalone", "replicas": 2}
    hpa_spec = {"engine": "hpa", "minReplicas": 2, "maxReplicas": 6, "metric": "queueDepth", "target": 4}
    _apply(cluster, tmp_path, {**base, "autoscaling": hpa_spec})

    hpa = wait_for(lambda: cluster.get(HPA, "scaled"), WAIT, "the HPA")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "baton_engine_waiting_requests"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    deployment = wait_for(lambda: cluster.get("deployments", "scaled"), WAIT, "the Deployment")
    assert "replicas" not in deployment["spec"], "the operator wrote replicas although the HPA owns them"
    pdb = wait_for(lambda: cluster.get(PDB, "scaled"), WAIT, "the PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1

    # The HPA scales to 5 (it writes replicas through the scale subresource); the controller follows.
    cluster.kubectl("patch", "deployment", "scaled", "--type=merge", "-p", json.dumps({"spec": {"replicas": 5}}))
    cluster.play_deployment_controller("scaled")
    scale = wait_for(lambda: (s := _scale(cluster)).get("replicas") == 5 and s, WAIT, "status.scale at 5 replicas")
    assert scale["desiredReplicas"] == 5 and scale["autoscaler"] == "HorizontalPodAutoscaler/scaled"

    # A change to the BatonDeployment is reconciled without touching the autoscaler's replicas.
    _apply(cluster, tmp_path, {**base, "autoscaling": {**hpa_spec, "target": 3}})
    wait_for(lambda: cluster.get(HPA, "scaled")["spec"]["metrics"][0]["pods"]
             ["target"]["averageValue"] == "3", WAIT, "the HPA's new target")
    assert cluster.get("deployments", "scaled")["spec"]["replicas"] == 5

    # KEDA instead: a ScaledObject replaces the HPA; replicas are still the autoscaler's.
    keda_spec = {**hpa_spec, "engine": "keda", "metric": "kvUsage", "target": 0.8, "prometheusAddress": PROMETHEUS}
    _apply(cluster, tmp_path, {**base, "autoscaling": keda_spec})
    scaled_object = wait_for(lambda: cluster.get("scaledobjects.keda.sh", "scaled"), WAIT, "the ScaledObject")
    trigger = scaled_object["spec"]["triggers"][0]
    assert trigger["metadata"]["serverAddress"] == PROMETHEUS and trigger["metadata"]["threshold"] == "0.8"
    assert "baton_engine_kv_usage_ratio" in trigger["metadata"]["query"]
    wait_for(lambda: cluster.get(HPA, "scaled") is None, WAIT, "the HPA deleted")
    assert cluster.get("deployments", "scaled")["spec"]["replicas"] == 5
    wait_for(lambda: _scale(cluster).get("autoscaler") == "ScaledObject/scaled", WAIT, "status.scale's autoscaler")

    # No autoscaling: the ScaledObject goes, and the spec's replicas come back.
    _apply(cluster, tmp_path, base)
    wait_for(lambda: cluster.get("scaledobjects.keda.sh", "scaled") is None, WAIT, "the ScaledObject deleted")
    wait_for(lambda: cluster.get("deployments", "scaled")["spec"]["replicas"] == 2, WAIT, "replicas restored to 2")
    cluster.play_deployment_controller("scaled")
    scale = wait_for(lambda: (s := _scale(cluster)).get("desiredReplicas") == 2 and s, WAIT, "status.scale at 2")
    assert "autoscaler" not in scale and "maxReplicas" not in scale
    assert cluster.get(PDB, "scaled") is not None  # still 2 pods: still protected
    reasons = [e["reason"] for e in cluster.list("events") if e["involvedObject"].get("name") == "scaled"]
    assert reasons.count("Deleted") >= 2  # the HPA, then the ScaledObject


def _degraded(cluster: Cluster) -> dict:
    bd = cluster.get("bd", "scaled") or {}
    return next((c for c in (bd.get("status") or {}).get("conditions") or [] if c["type"] == "Degraded"), {})


@pytest.mark.parametrize("cluster", ["without KEDA"], indirect=True)
def test_without_keda_the_deployment_is_still_reconciled_and_the_old_autoscaler_kept(
        cluster: Cluster, operator, tmp_path: Path) -> None:
    """No spec.replicas: the pods are the autoscaler's while there is one, and stay where it left them."""
    keda = {"engine": "keda", "maxReplicas": 6, "target": 0.5, "metric": "kvUsage", "prometheusAddress": PROMETHEUS}
    hpa = {"engine": "hpa", "maxReplicas": 6, "target": 4}

    # A new BatonDeployment asking for KEDA: its pods and Service are made all the same.
    _apply(cluster, tmp_path, {"mode": "standalone", "autoscaling": keda})
    wait_for(lambda: _degraded(cluster).get("reason") == "AutoscalerUnavailable", WAIT, "AutoscalerUnavailable")
    assert "ScaledObject (keda.sh/v1alpha1) is not served" in _degraded(cluster)["message"]
    assert cluster.get("deployments", "scaled") is not None and cluster.get("services", "scaled") is not None

    # The HPA instead; it scales to 4.
    _apply(cluster, tmp_path, {"mode": "standalone", "autoscaling": hpa})
    wait_for(lambda: cluster.get(HPA, "scaled"), WAIT, "the HPA")
    wait_for(lambda: _degraded(cluster).get("status") == "False", WAIT, "Degraded=False")
    cluster.kubectl("patch", "deployment", "scaled", "--type=merge", "-p", json.dumps({"spec": {"replicas": 4}}))

    # KEDA again, with a change to the pods: the change lands; the HPA is kept, not traded for nothing.
    _apply(cluster, tmp_path, {"mode": "standalone", "nodeSelector": {"pool": "llm"}, "autoscaling": keda})
    wait_for(lambda: cluster.get("deployments", "scaled")["spec"]["template"]["spec"].get("nodeSelector")
             == {"pool": "llm"}, WAIT, "the new nodeSelector on the Deployment")
    wait_for(lambda: _degraded(cluster).get("reason") == "AutoscalerUnavailable", WAIT, "AutoscalerUnavailable")
    assert cluster.get(HPA, "scaled") is not None
    assert cluster.get("deployments", "scaled")["spec"]["replicas"] == 4

    # No autoscaling and no spec.replicas: the HPA goes, the pods stay at 4 rather than dropping to 1.
    _apply(cluster, tmp_path, {"mode": "standalone", "nodeSelector": {"pool": "llm"}})
    wait_for(lambda: cluster.get(HPA, "scaled") is None, WAIT, "the HPA deleted")
    wait_for(lambda: _degraded(cluster).get("status") == "False", WAIT, "Degraded=False")
    assert cluster.get("deployments", "scaled")["spec"]["replicas"] == 4


def test_keda_without_a_prometheus_is_an_invalid_spec(cluster: Cluster, operator, tmp_path: Path) -> None:
    _apply(cluster, tmp_path, {"mode": "standalone",
                               "autoscaling": {"engine": "keda", "maxReplicas": 3, "target": 2}})

    cond = wait_for(lambda: (c := _degraded(cluster)).get("reason") == "InvalidSpec" and c, WAIT,
                    "an InvalidSpec condition")
    assert "spec.autoscaling.prometheusAddress" in cond["message"]
    assert cluster.get("bd", "scaled")["status"]["phase"] == "Failed"
    assert cluster.get("deployments", "scaled") is None  # refused before anything was written
