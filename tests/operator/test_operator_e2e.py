"""End to end: the real operator under kopf against the emulated API server, driven by real kubectl.

What the emulator does not prove (admission with the CRD schemas and CEL rules, garbage collection,
kubelet and controllers) is listed in docs/operator.md; the tests play the Deployment controller by
writing Deployment status the way it would.
"""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import EXAMPLES, Cluster, wait_for

pytestmark = [pytest.mark.operator_e2e, pytest.mark.timeout(120)]

WAIT = 30  # seconds; generous for a 2-core machine, reached only on failure


def _condition(bd: dict, kind: str) -> dict | None:
    return next((c for c in (bd.get("status") or {}).get("conditions") or [] if c["type"] == kind), None)


def _config(cluster: Cluster, name: str) -> dict:
    cm = cluster.get("configmaps", f"{name}-baton-config")
    assert cm is not None, f"ConfigMap {name}-baton-config not found"
    return yaml.safe_load(cm["data"]["baton.yaml"])


def _owned_by(obj: dict, bd: dict) -> bool:
    return any(ref["uid"] == bd["metadata"]["uid"] and ref["kind"] == "BatonDeployment" and ref.get("controller")
               for ref in obj["metadata"].get("ownerReferences") or [])


def test_standalone_example_creates_owned_children_and_becomes_ready(cluster: Cluster, operator) -> None:
    cluster.apply(EXAMPLES / "batonpolicy.yaml")
    cluster.apply(EXAMPLES / "batondeployment.yaml")

    bd = wait_for(lambda: _condition(cluster.get("bd", "baton-standalone"), "Ready")
                  and cluster.get("bd", "baton-standalone"), WAIT, "a Ready condition on baton-standalone")
    children = {kind: cluster.get(kind, name) for kind, name in (
        ("deployments", "baton-standalone"), ("services", "baton-standalone"),
        ("configmaps", "baton-standalone-baton-config"))}
    for kind, child in children.items():
        assert child is not None, f"{kind} not created"
        assert _owned_by(child, bd), f"{kind} lacks a controller ownerReference to the BatonDeployment"
    assert _condition(bd, "Ready")["status"] == "False"  # no pod is available yet
    assert bd["status"]["phase"] == "Progressing"

    # The Deployment controller reports the rollout done: the operator notices and turns Ready.
    cluster.play_deployment_controller("baton-standalone")
    bd = wait_for(lambda: (b := cluster.get("bd", "baton-standalone"))
                  and _condition(b, "Ready")["status"] == "True" and b, WAIT, "Ready=True")
    assert bd["status"]["phase"] == "Ready"
    assert bd["status"]["observedGeneration"] == bd["metadata"]["generation"]
    assert bd["status"]["traffic"]["weight"] == 100  # standalone without an incumbent
    assert bd["status"]["policySource"] == f"{cluster.namespace}/default"

    # What the sidecar will read: the namespace policy with the deployment's overrides on top.
    config = _config(cluster, "baton-standalone")
    assert config["policy"]["padding"] == {"compaction_threshold": 0.4, "max_padding_ratio": 0.7, "bucketing": True}
    assert config["policy"]["limits"]["max_batch_size"] == 64
    assert config["router"] == {"incumbent_url": None, "baton_weight": 100}
    container = children["deployments"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:7] == ["serve", "--config", "/etc/baton/baton.yaml", "--host", "0.0.0.0",
                                     "--port", "8080"]

    events = [e for e in cluster.list("events") if e["involvedObject"].get("name") == "baton-standalone"]
    assert {"Created"} <= {e["reason"] for e in events}

    # The sidecar example's target does not exist (incumbent.yaml was not applied): reported, retried.
    canary = wait_for(lambda: (b := cluster.get("bd", "baton-canary")) and _condition(b, "Degraded")
                      and b, WAIT, "a Degraded condition on baton-canary")
    assert _condition(canary, "Degraded")["reason"] == "TargetNotFound"
