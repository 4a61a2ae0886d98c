"""End to end: the real operator under kopf against the emulated API server, driven by real kubectl.

What the emulator does not prove (admission with the CRD schemas and CEL rules, garbage collection,
kubelet and controllers) is listed in docs/operator.md; the tests play the Deployment controller by
writing Deployment status the way it would.
"""

from __future__ import annotations

import json

import pytest
import yaml

from operator_testlib import EXAMPLES, Cluster, wait_for

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
    assert config["policy"]["prefill"] == {"budget": "time", "mode": "fused"}
    assert config["policy"]["max_step_ms"] == 150  # the example's prefill.maxStepMs
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


def test_policy_change_reaches_the_configmap(cluster: Cluster, operator) -> None:
    cluster.apply(EXAMPLES / "batonpolicy.yaml")
    cluster.apply(EXAMPLES / "batondeployment.yaml")
    first = wait_for(lambda: (b := cluster.get("bd", "baton-standalone")) and b.get("status", {}).get("policyHash"),
                     WAIT, "a policy hash on baton-standalone")
    assert _config(cluster, "baton-standalone")["policy"]["preemption"]["mode"] == "swap"

    # Edit the namespace policy: every BatonDeployment's ConfigMap follows, the running pods are not touched.
    template_before = cluster.get("deployments", "baton-standalone")["spec"]["template"]
    cluster.kubectl("patch", "batonpolicy", "default", "--type=merge",
                    "-p", json.dumps({"spec": {"preemption": {"mode": "recompute"}}}))
    config = wait_for(lambda: (c := _config(cluster, "baton-standalone"))["policy"]["preemption"]["mode"]
                      == "recompute" and c, WAIT, "the new preemption mode in the ConfigMap")
    assert config["policy"]["padding"]["max_padding_ratio"] == 0.7  # the deployment's override still wins
    bd = wait_for(lambda: (b := cluster.get("bd", "baton-standalone"))["status"]["policyHash"] != first and b,
                  WAIT, "a new policy hash in the status")
    cm = cluster.get("configmaps", "baton-standalone-baton-config")
    assert cm["metadata"]["annotations"]["baton.dev/policy-hash"] == bd["status"]["policyHash"]
    assert cluster.get("deployments", "baton-standalone")["spec"]["template"] == template_before
    reasons = {e["reason"] for e in cluster.list("events") if e["involvedObject"].get("name") == "baton-standalone"}
    assert "PolicyApplied" in reasons

    # Deleting the policy falls back to the operator defaults (the finalizer lets the operator see it go).
    cluster.kubectl("delete", "batonpolicy", "default", "--wait=false")
    config = wait_for(lambda: (c := _config(cluster, "baton-standalone"))["policy"]["padding"]["bucketing"]
                      is False and c, WAIT, "the default padding policy in the ConfigMap")
    assert config["policy"]["preemption"]["mode"] == "swap"
    wait_for(lambda: cluster.get("batonpolicies", "default") is None, WAIT, "the BatonPolicy to be gone")
    bd = wait_for(lambda: (b := cluster.get("bd", "baton-standalone"))["status"].get("policySource")
                  == "operator-defaults" and b, WAIT, "policySource=operator-defaults")


def test_sidecar_injects_routes_and_restores_on_delete(cluster: Cluster, operator) -> None:
    cluster.apply(EXAMPLES / "incumbent.yaml")
    original_deployment = cluster.get("deployments", "llm-server")
    original_service = cluster.get("services", "llm-server")
    cluster.apply(EXAMPLES / "batondeployment.yaml")

    # 1. The container joins the incumbent's pod template; the Service is left alone until the new pods
    #    are available, so no request is sent to a pod that does not serve Baton's port yet.
    target = wait_for(lambda: (d := cluster.get("deployments", "llm-server")) and len(
        d["spec"]["template"]["spec"]["containers"]) == 2 and d, WAIT, "the injected Baton container")
    names = [c["name"] for c in target["spec"]["template"]["spec"]["containers"]]
    assert names == ["vllm", "baton"]
    assert target["metadata"]["annotations"]["baton.dev/injected-by"] == "baton-canary"
    own = {v["name"] for v in original_deployment["spec"]["template"]["spec"].get("volumes") or []}
    assert {v["name"] for v in target["spec"]["template"]["spec"]["volumes"]} == own | {"baton-config", "baton-cache"}
    assert target["metadata"]["generation"] == original_deployment["metadata"]["generation"] + 1
    assert cluster.get("services", "llm-server")["spec"]["ports"][0]["targetPort"] == "http"
    bd = cluster.get("bd", "baton-canary")
    assert _condition(bd, "Ready")["status"] == "False"

    config = _config(cluster, "baton-canary")
    assert config["router"]["incumbent_url"] == "http://127.0.0.1:8000"  # the vllm container's `http` port
    assert config["router"]["baton_weight"] == 1  # the first rollout step
    assert config["router"]["sticky_header"] == "x-session-id"
    assert config["policy"]["preemption"]["mode"] == "recompute"

    # 2. The rollout finishes: the Service's port now targets Baton, the original recorded.
    cluster.play_deployment_controller("llm-server")
    service = wait_for(lambda: (s := cluster.get("services", "llm-server"))["spec"]["ports"][0]["targetPort"]
                       == "baton-http" and s, WAIT, "the Service repointed to baton-http")
    assert json.loads(service["metadata"]["annotations"]["baton.dev/original-target-port"])["targetPort"] == "http"
    bd = wait_for(lambda: (b := cluster.get("bd", "baton-canary")) and _condition(b, "Ready")["status"] == "True"
                  and b, WAIT, "Ready=True on baton-canary")
    assert bd["status"]["traffic"]["weight"] == 1
    reasons = {e["reason"] for e in cluster.list("events") if e["involvedObject"].get("name") == "baton-canary"}
    assert {"Injected", "ServiceRepointed"} <= reasons

    # 3. Deleting the BatonDeployment restores both user objects exactly; nothing of theirs is deleted.
    cluster.kubectl("delete", "bd", "baton-canary", "--wait=false")
    wait_for(lambda: cluster.get("bd", "baton-canary") is None, WAIT, "baton-canary to be deleted")
    restored = cluster.get("deployments", "llm-server")
    assert restored["spec"] == original_deployment["spec"]
    assert restored["metadata"].get("labels") == original_deployment["metadata"].get("labels")
    assert "baton.dev/injected-by" not in (restored["metadata"].get("annotations") or {})
    service = cluster.get("services", "llm-server")
    assert service["spec"] == original_service["spec"]
    assert "baton.dev/original-target-port" not in (service["metadata"].get("annotations") or {})


def test_spec_the_schema_cannot_check_fails_permanently_with_a_condition(cluster: Cluster, operator,
                                                                         tmp_path) -> None:
    cluster.apply(EXAMPLES / "incumbent.yaml")
    clash = tmp_path / "clash.yaml"
    clash.write_text(yaml.safe_dump({
        "apiVersion": "baton.dev/v1alpha1", "kind": "BatonDeployment", "metadata": {"name": "clash"},
        "spec": {"mode": "sidecar", "targetDeployment": "llm-server", "port": 8000}}))  # vllm's port
    cluster.apply(clash)
    bd = wait_for(lambda: (b := cluster.get("bd", "clash")) and b.get("status", {}).get("phase") == "Failed" and b,
                  WAIT, "phase Failed on the clashing BatonDeployment")
    degraded = _condition(bd, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "InvalidSpec"
    assert "spec.port" in degraded["message"] and "8000" in degraded["message"]
    warnings = [e for e in cluster.list("events") if e["involvedObject"].get("name") == "clash"
                and e["type"] == "Warning"]
    assert any(e["reason"] == "InvalidSpec" for e in warnings)
    assert len(cluster.get("deployments", "llm-server")["spec"]["template"]["spec"]["containers"]) == 1
