"""Autoscaling end to end: the real operator under kopf against the emulated API server (with KEDA's CRD
declared from ../shared/crds), driven by kubectl. The tests play the HPA and the Deployment controller by
writing what they would write.

One BatonDeployment goes through hpa -> keda -> no autoscaling: the operator creates the right object,
never writes the replicas the autoscaler set, deletes the autoscaler it no longer wants, and then
restores the spec's replicas.
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


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """The emulated API server with Baton's CRDs and KEDA's ScaledObject CRD."""
    from baton_kube_emulator import EmulatorThread

    if not KEDA_CRD.exists():
        pytest.skip(f"{KEDA_CRD} is absent (reference CRDs live beside the repository; see its README)")
    namespace = f"scale-{uuid.uuid4().hex[:6]}"
    with EmulatorThread([*sorted(CRD_DIR.glob("*.yaml")), KEDA_CRD]) as emulator:
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
    assert trigger["metadata"]["serverAddress"] == PROMETHEUS and trigger["metadata"]["threshold"] == "800m"
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


def test_keda_without_a_prometheus_is_an_invalid_spec(cluster: Cluster, operator, tmp_path: Path) -> None:
    _apply(cluster, tmp_path, {"mode": "standalone",
                               "autoscaling": {"engine": "keda", "maxReplicas": 3, "target": 2}})

    def degraded() -> dict | None:
        bd = cluster.get("bd", "scaled") or {}
        cond = next((c for c in (bd.get("status") or {}).get("conditions") or [] if c["type"] == "Degraded"), {})
        return cond if cond.get("reason") == "InvalidSpec" else None

    cond = wait_for(degraded, WAIT, "an InvalidSpec condition")
    assert "spec.autoscaling.prometheusAddress" in cond["message"]
    assert cluster.get("bd", "scaled")["status"]["phase"] == "Failed"
    assert cluster.get("deployments", "scaled") is None  # refused before anything was written
