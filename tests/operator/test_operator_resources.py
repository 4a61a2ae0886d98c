"""Pure builders: desired objects (resources), the sidecars' ConfigMap (configmap), sidecar injection and removal
and Service repoint/restore patches (injection)."""

from __future__ import annotations

import copy
import json

import jsonpatch
import kubernetes_validate
import pytest
import yaml

# The sidecar's own parser: the operator<->sidecar contract. A hard import: never skipped.
from baton_sidecar import config as sidecar_config

from baton_operator import configmap as cm
from baton_operator import injection as inj
from baton_operator import resources as res
from baton_operator.config import OperatorConfig
from baton_operator.resources import SpecError

CFG = OperatorConfig(sidecar_image="registry.example/baton-sidecar:test")
K8S_VERSION = "1.32"  # validated against the oldest schema set we claim (CRDs use CEL lists: >= 1.28)


def bd(mode: str = "standalone", **spec) -> dict:
    spec = {"mode": mode, **spec}
    if mode == "sidecar":
        spec.setdefault("targetDeployment", "llm")
    return {"apiVersion": res.API_VERSION, "kind": res.KIND,
            "metadata": {"name": "b1", "namespace": "ns", "uid": "uid-1", "generation": 3}, "spec": spec}


def incumbent(**pod) -> dict:
    pod_spec = {"containers": [{"name": "vllm", "image": "vllm", "ports": [{"name": "http", "containerPort": 8000}]}],
                **pod}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "llm", "namespace": "ns", "resourceVersion": "41", "labels": {"app": "llm"}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "llm"}},
                     "template": {"metadata": {"labels": {"app": "llm"}}, "spec": pod_spec}}}


def service(ports=None, **meta) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "llm", "namespace": "ns", "resourceVersion": "7", **meta},
            "spec": {"selector": {"app": "llm"},
                     "ports": ports or [{"name": "http", "port": 80, "targetPort": "http"}]}}


def apply(obj: dict, ops: list) -> dict:
    return jsonpatch.apply_patch(obj, ops, in_place=False)


# The sidecar's own routes are under /baton: in sidecar mode every other path is the incumbent's.
PROBES = {"startupProbe": "/baton/health", "livenessProbe": "/baton/health", "readinessProbe": "/baton/ready"}


def probe_paths(container: dict) -> dict:
    return {k: container[k]["httpGet"]["path"] for k in PROBES}


# --- desired objects ---------------------------------------------------------------------------

def test_standalone_children_are_valid_owned_and_labelled() -> None:
    body = bd(replicas=2, resources={"limits": {"nvidia.com/gpu": 1, "memory": "8Gi"}},
              model={"path": "/models/m", "persistentVolumeClaim": "models"}, nodeSelector={"gpu": "yes"})
    config = cm.sidecar_config({"aging_s": 1}, cm.router_config({}, None, 100))
    objects = [res.desired_deployment(body, CFG), res.desired_service(body), cm.desired_config_map(body, config, "h")]
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert obj["metadata"]["ownerReferences"] == [{
            "apiVersion": "baton.dev/v1alpha1", "kind": "BatonDeployment", "name": "b1", "uid": "uid-1",
            "controller": True, "blockOwnerDeletion": True}]
        assert obj["metadata"]["labels"]["baton.dev/deployment"] == "b1"
    deployment = objects[0]
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    assert pod["nodeSelector"] == {"gpu": "yes"}
    container = pod["containers"][0]
    assert container["image"] == "registry.example/baton-sidecar:test"
    assert container["args"] == ["serve", "--config", "/etc/baton/baton.yaml", "--host", "0.0.0.0", "--port",
                                 "8080", "--model", "/models/m"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert probe_paths(container) == PROBES
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/baton/metrics"
    assert {v["name"] for v in pod["volumes"]} == {"baton-config", "baton-cache", "baton-model"}
    # Mounted as a directory: kubelet refreshes it on ConfigMap changes (a subPath mount would not).
    assert all("subPath" not in m for m in container["volumeMounts"])
    assert objects[1]["spec"]["ports"][0]["targetPort"] == "baton-http"


def test_container_env_wires_admin_token_and_telemetry() -> None:
    body = bd(adminTokenSecretRef={"name": "admin"},
              telemetry={"otlpEndpoint": "http://otel:4318", "samplingRatio": 0.25})
    container = res.baton_container(body, CFG)
    env = {e["name"]: e for e in container["env"]}
    # The admin token is a file beside baton.yaml (one projected volume), never an environment variable.
    assert "BATON_ADMIN_TOKEN" not in env
    flag = container["args"].index("--admin-token-file")
    assert container["args"][flag + 1] == "/etc/baton/admin-token"
    (config,) = [v for v in res.baton_volumes(body) if v["name"] == res.CONFIG_VOLUME]
    assert config["projected"]["sources"] == [
        {"configMap": {"name": "b1-baton-config"}},
        {"secret": {"name": "admin", "items": [{"key": "token", "path": "admin-token"}]}}]
    assert res.baton_volumes(bd())[0] == {"name": res.CONFIG_VOLUME, "configMap": {"name": "b1-baton-config"}}
    from baton_sidecar.cli import build_parser  # the sidecar's own command line takes the flag
    assert build_parser().parse_args(container["args"]).admin_token_file == "/etc/baton/admin-token"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel:4318"
    assert env["OTEL_TRACES_SAMPLER_ARG"]["value"] == "0.25"
    assert env["OTEL_SERVICE_NAME"]["value"] == "baton-b1"
    plain = {e["name"] for e in res.baton_container(bd(), CFG)["env"]}
    assert not any(name.startswith(("OTEL_", "BATON_")) for name in plain)


def test_container_defaults_pull_policy_and_security_context() -> None:
    container = res.baton_container(bd(), CFG)
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}
    assert container["imagePullPolicy"] == "Always"  # a tag may move
    pinned = OperatorConfig(sidecar_image="registry.example/baton-sidecar@sha256:" + "0" * 64)
    assert res.baton_container(bd(), pinned)["imagePullPolicy"] == "IfNotPresent"
    assert res.baton_container(bd(imagePullPolicy="Never"), pinned)["imagePullPolicy"] == "Never"
    # Set on the container, so they hold in a user's pod too (sidecar mode).
    assert container["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    none = OperatorConfig.from_env({"BATON_SIDECAR_RESOURCES": "{}"})
    assert "resources" not in res.baton_container(bd(), none)
    with pytest.raises(ValueError, match="BATON_SIDECAR_RESOURCES"):
        OperatorConfig.from_env({"BATON_SIDECAR_RESOURCES": "cpu: 1"})
    with pytest.raises(ValueError, match="BATON_SIDECAR_RESOURCES"):
        OperatorConfig.from_env({"BATON_SIDECAR_RESOURCES": '{"claims": []}'})


def test_engine_flags_only_when_set() -> None:
    assert res.engine_args({}) == []
    assert res.engine_args({"engine": {"device": "cuda:1", "maxModelLen": 4096}, "model": {"servedName": "m"}}) == [
        "--served-model-name", "m", "--device", "cuda:1", "--max-model-len", "4096"]


def test_quantization_flag_from_the_spec_else_the_operator_default() -> None:
    assert res.engine_args({"engine": {"quantization": "int8"}}) == ["--quantization", "int8"]
    assert res.engine_args({}, default_quantization="int8") == ["--quantization", "int8"]
    assert res.engine_args({"engine": {"quantization": "none"}}, default_quantization="int8") == [
        "--quantization", "none"]
    cfg = OperatorConfig.from_env({"BATON_DEFAULT_QUANTIZATION": "int8"})
    assert cfg.default_quantization == "int8"
    assert "--quantization" in res.baton_container(bd(), cfg)["args"]
    with pytest.raises(ValueError, match="BATON_DEFAULT_QUANTIZATION"):
        OperatorConfig.from_env({"BATON_DEFAULT_QUANTIZATION": "int4"})


def test_rendered_config_is_what_the_sidecar_parses() -> None:
    router = cm.router_config({"router": {"stickyHeader": "x-s", "fallbackToBaton": True,
                                          "incumbentTimeoutSeconds": 60}}, "http://127.0.0.1:8000", 5, 25)
    from baton_operator.policy import DEFAULT_POLICY
    doc = yaml.safe_load(cm.render_config(cm.sidecar_config(DEFAULT_POLICY, router)))
    assert set(doc) == {"policy", "router"}
    parsed = sidecar_config.RouterConfig.from_dict(doc["router"])
    assert parsed.incumbent_url == "http://127.0.0.1:8000" and parsed.baton_weight == 5
    assert parsed.sticky_header == "x-s" and parsed.fallback_to_baton is True
    assert parsed.shadow_percent == 25
    sidecar_config.PolicyConfig.from_dict(doc["policy"])


@pytest.mark.parametrize("spec, incumbent_url, current, expected", [
    ({}, None, None, 100),  # nothing to split with
    ({}, None, 30, 100),
    ({}, "http://i", None, 0),  # an incumbent and no instructions: it keeps the traffic
    ({"router": {"weight": 20}}, "http://i", 55, 20),  # manual weight is enforced
    ({"rollout": {"steps": [1, 5]}}, "http://i", None, 1),  # rollout starts at its first step
    ({"rollout": {"steps": [1, 5]}}, "http://i", 5, 5),  # ... and then owns the weight
    ({"rollout": {"steps": [1, 5], "shadow": {}}}, "http://i", None, 0),  # the shadow stage comes first
])
def test_desired_weight(spec, incumbent_url, current, expected) -> None:
    assert cm.desired_weight(spec, incumbent_url, current) == expected


def test_update_body_patches_only_what_differs_and_keeps_others_keys() -> None:
    body = bd()
    desired = res.desired_service(body)
    observed = copy.deepcopy(desired)
    observed["metadata"].update(resourceVersion="9", labels={**desired["metadata"]["labels"], "team": "x"})
    observed["spec"]["clusterIP"] = "10.0.0.1"  # server-filled
    observed["spec"]["ports"][0]["nodePort"] = None
    assert res.update_body(desired, observed) is None
    observed["spec"]["ports"][0]["port"] = 9999
    patch = res.update_body(desired, observed)
    assert patch["spec"] == desired["spec"] and patch["metadata"] == {"resourceVersion": "9"}
    observed["metadata"]["ownerReferences"] = [{"uid": "someone-else"}]
    refs = res.update_body(desired, observed)["metadata"]["ownerReferences"]
    assert [r["uid"] for r in refs] == ["someone-else", "uid-1"]


# --- sidecar injection -------------------------------------------------------------------------

@pytest.mark.parametrize("pod_extra", [{}, {"volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}]}])
def test_injection_then_removal_restores_the_deployment_exactly(pod_extra) -> None:
    original = incumbent(**pod_extra)
    body = bd("sidecar", resources={"requests": {"cpu": "1"}})
    inj.check_target(original, body)
    ops = inj.injection_patch(original, body, CFG)
    assert ops[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "41"}
    injected = apply(original, ops)
    pod = injected["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["vllm", "baton"]
    assert probe_paths(pod["containers"][1]) == PROBES
    assert [v["name"] for v in pod["volumes"]][-2:] == ["baton-config", "baton-cache"]
    assert injected["metadata"]["annotations"]["baton.dev/injected-by"] == "b1"
    assert injected["metadata"]["labels"]["baton.dev/deployment"] == "b1"
    assert injected["spec"]["template"]["metadata"]["labels"]["baton.dev/sidecar"] == "true"
    kubernetes_validate.validate(injected, K8S_VERSION, strict=True)

    inj.check_target(injected, body)  # our own injection is not a conflict
    assert inj.injection_patch(injected, body, CFG) == []  # idempotent
    assert apply(injected, inj.removal_patch(injected)) == original


def test_injection_updates_a_changed_container_in_place() -> None:
    injected = apply(incumbent(), inj.injection_patch(incumbent(), bd("sidecar"), CFG))
    ops = inj.injection_patch(injected, bd("sidecar", image="other:2"), CFG)
    assert {"op": "test", "path": "/spec/template/spec/containers/1/name", "value": "baton"} in ops
    updated = apply(injected, ops)
    assert updated["spec"]["template"]["spec"]["containers"][1]["image"] == "other:2"
    assert len(updated["spec"]["template"]["spec"]["containers"]) == 2


def test_patches_fail_on_concurrent_change() -> None:
    ops = inj.injection_patch(incumbent(), bd("sidecar"), CFG)
    moved = incumbent()
    moved["metadata"]["resourceVersion"] = "42"
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        apply(moved, ops)


@pytest.mark.parametrize("target, body, field", [
    (incumbent(), bd("sidecar", port=8000), "spec.port"),
    (incumbent(containers=[{"name": "baton", "image": "theirs"}]), bd("sidecar"), "spec.targetDeployment"),
    (incumbent(volumes=[{"name": "baton-cache", "emptyDir": {}}]), bd("sidecar"), "spec.targetDeployment"),
])
def test_targets_baton_cannot_join_are_refused(target, body, field) -> None:
    with pytest.raises(SpecError) as err:
        inj.check_target(target, body)
    assert err.value.field == field


def test_a_target_injected_by_another_baton_deployment_is_refused() -> None:
    injected = apply(incumbent(), inj.injection_patch(incumbent(), bd("sidecar"), CFG))
    other = bd("sidecar")
    other["metadata"]["name"] = "b2"
    with pytest.raises(SpecError, match="BatonDeployment 'b1'"):
        inj.check_target(injected, other)


# --- the Service -------------------------------------------------------------------------------

def test_service_target_resolves_named_and_numbered_ports() -> None:
    target = inj.resolve_service_target(service(), incumbent(), bd("sidecar"))
    assert (target.index, target.port, target.original_target_port, target.incumbent_port) == (0, 80, "http", 8000)
    numbered = service([{"name": "web", "port": 80, "targetPort": 8000}])
    assert inj.resolve_service_target(numbered, incumbent(), bd("sidecar")).incumbent_port == 8000
    no_target = service([{"port": 8000}])
    assert inj.resolve_service_target(no_target, incumbent(), bd("sidecar")).original_target_port == 8000
    two = service([{"name": "grpc", "port": 9000, "targetPort": 9000}, {"name": "metrics", "port": 80,
                                                                         "targetPort": "http"}])
    assert inj.resolve_service_target(two, incumbent(), bd("sidecar", targetServicePort="metrics")).index == 1


@pytest.mark.parametrize("svc, body, field", [
    (service(), bd("sidecar", targetServicePort="nope"), "spec.targetServicePort"),
    (service([{"name": "a", "port": 1, "targetPort": 1}, {"name": "b", "port": 2, "targetPort": 2}]),
     bd("sidecar"), "spec.targetServicePort"),
    (service([{"name": "http", "port": 80, "targetPort": "missing"}]), bd("sidecar"), "spec.targetService"),
    ({**service(), "spec": {**service()["spec"], "selector": {"app": "other"}}}, bd("sidecar"), "spec.targetService"),
])
def test_services_baton_cannot_take_over_are_refused(svc, body, field) -> None:
    with pytest.raises(SpecError) as err:
        inj.resolve_service_target(svc, incumbent(), body)
    assert err.value.field == field


@pytest.mark.parametrize("original", [service(), service(annotations={"team": "x"}),
                                      service([{"name": "http", "port": 80}])])
def test_repoint_then_restore_gives_back_the_service_exactly(original) -> None:
    target = inj.resolve_service_target(original, incumbent(), bd("sidecar"))
    repointed = apply(original, inj.repoint_patch(original, target, by="b1"))
    assert repointed["spec"]["ports"][0]["targetPort"] == "baton-http"
    record = json.loads(repointed["metadata"]["annotations"][res.ANN_ORIGINAL_TARGET_PORT])
    assert record["by"] == "b1" and record["port"] == 80
    again = inj.resolve_service_target(repointed, incumbent(), bd("sidecar"))
    assert again.repointed and again.incumbent_port == target.incumbent_port  # read back from the record
    assert inj.repoint_patch(repointed, again, by="b1") == []
    assert inj.restore_patch(repointed, by="someone-else") == []
    restored = apply(repointed, inj.restore_patch(repointed, by="b1"))
    if "targetPort" not in original["spec"]["ports"][0]:
        restored["spec"]["ports"][0].pop("targetPort")  # restored explicitly as the port number itself
        assert apply(repointed, inj.restore_patch(repointed, by="b1"))["spec"]["ports"][0]["targetPort"] == 80
    assert restored == original


def test_fields_dropped_from_the_spec_leave_the_injected_container_and_volumes() -> None:
    original = incumbent(volumes=[{"name": "shm", "emptyDir": {}}])
    rich = bd("sidecar", resources={"limits": {"nvidia.com/gpu": 1}},
              model={"path": "/models/m", "persistentVolumeClaim": "models"})
    injected = apply(original, inj.injection_patch(original, rich, CFG))
    assert {v["name"] for v in injected["spec"]["template"]["spec"]["volumes"]} == {
        "shm", "baton-config", "baton-cache", "baton-model"}
    plain = bd("sidecar")
    updated = apply(injected, inj.injection_patch(injected, plain, CFG))
    pod = updated["spec"]["template"]["spec"]
    assert pod["containers"][1]["resources"] == CFG.sidecar_resources  # the operator's defaults again
    assert [v["name"] for v in pod["volumes"]] == ["shm", "baton-config", "baton-cache"]
    assert pod["containers"][0] == original["spec"]["template"]["spec"]["containers"][0]
    assert inj.injection_patch(updated, plain, CFG) == []
    assert apply(updated, inj.removal_patch(updated)) == original


def test_fields_dropped_from_the_spec_leave_owned_children() -> None:
    before = res.desired_deployment(bd(nodeSelector={"gpu": "yes"}, resources={"limits": {"cpu": "2"}}), CFG)
    observed = copy.deepcopy(before)
    observed["spec"]["template"]["spec"]["dnsPolicy"] = "ClusterFirst"  # a server default: left alone
    after = res.desired_deployment(bd(), CFG)
    patch = res.update_body(after, observed)
    pod = patch["spec"]["template"]["spec"]
    assert pod["nodeSelector"] is None and "dnsPolicy" not in pod
    # Lists are replaced whole by a merge patch: the container comes back with the operator's defaults.
    assert pod["containers"][0]["resources"] == CFG.sidecar_resources
    assert json.loads(patch["metadata"]["annotations"][res.ANN_LAST_APPLIED])["spec"] == after["spec"]
    observed_after = copy.deepcopy(after)
    observed_after["spec"]["template"]["spec"]["dnsPolicy"] = "ClusterFirst"
    assert res.update_body(after, observed_after) is None
