"""Every BatonDeployment field the operator copies into a pod is held by the CRD to a shape the API server
accepts, so that a wrong one is refused on apply instead of failing the operator's Deployment write.

The copied fields come from the code, not from a list: the FULL objects set every field of the CRD's spec
to a distinctive value, the operator builds them (a standalone Deployment, an injection into an
incumbent's), and a field is copied where its value shows up in the result. For each copied field,
CASES holds a right value (passes the CRD, and the built Deployment passes kubernetes_validate) and
wrongly shaped ones (refused by the CRD's schema or a CEL rule). A new field in the CRD must join a FULL
object; if the operator copies it into pods, it must join CASES too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from baton_operator import injection as inj
from baton_operator import resources as res
from baton_operator.config import OperatorConfig
from baton_kube_emulator import merge_patch
from cel_rules import CELValidator
from crd_schema import load_crds
from operator_testlib import CRD_DIR, EXAMPLES

CFG = OperatorConfig(sidecar_image="registry.example/baton-sidecar:test")
K8S_VERSION = "1.32"  # as test_operator_resources: the oldest schema set claimed
BD = load_crds(CRD_DIR)["BatonDeployment"]
CEL = CELValidator(BD.crd)
SPEC_SCHEMA = BD.openapi["properties"]["spec"]
EXAMPLE = {d["metadata"]["name"]: d for d in yaml.safe_load_all((EXAMPLES / "batondeployment.yaml").read_text())}
STANDALONE, SIDECAR = EXAMPLE["baton-standalone"], EXAMPLE["baton-canary"]
INCUMBENT = {"apiVersion": "apps/v1", "kind": "Deployment",
             "metadata": {"name": "llm", "namespace": "ns", "resourceVersion": "41", "labels": {"app": "llm"}},
             "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "llm"}},
                      "template": {"metadata": {"labels": {"app": "llm"}}, "spec": {"containers": [
                          {"name": "vllm", "image": "vllm", "ports": [{"name": "http", "containerPort": 8000}]}]}}}}


def body(obj: dict[str, Any]) -> dict[str, Any]:
    """An applied object as the operator receives it: with namespace and uid."""
    return merge_patch(obj, {"metadata": {"namespace": "ns", "uid": "uid-1"}})


def standalone_deployment(obj: dict[str, Any]) -> dict[str, Any]:
    return res.desired_deployment(body(obj), CFG)


def injected_deployment(obj: dict[str, Any]) -> dict[str, Any]:
    return jsonpatch.apply_patch(INCUMBENT, inj.injection_patch(INCUMBENT, body(obj), CFG), in_place=False)


def built(obj: dict[str, Any]) -> dict[str, Any]:
    build = standalone_deployment if obj["spec"]["mode"] == "standalone" else injected_deployment
    return build(obj)


def refusals(obj: dict[str, Any]) -> list[str]:
    """What the API server would say: schema errors first; CEL only for a schema-valid object."""
    return BD.errors(obj) or [f"{v.path}: {v.message}" for v in CEL.violations(obj)]


# --- the fields copied into pods, found from the code ------------------------------------------

def bd(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "baton.dev/v1alpha1", "kind": "BatonDeployment", "metadata": {"name": name},
            "spec": spec}


# Every value distinct, and none that a pod built from a bare spec holds (test_sentinels_are_distinct).
POD_FIELDS = dict(
    image="registry.example/baton-full:1.2.3", imagePullPolicy="Never", port=8123,
    model={"path": "/mnt/full-models/m", "persistentVolumeClaim": "full-models", "mountPath": "/mnt/full-models",
           "servedName": "full-served-name"},
    resources={"requests": {"cpu": "1250m", "memory": "3Gi"}, "limits": {"memory": "5Gi", "nvidia.com/gpu": 6}},
    engine={"device": "cpu", "dtype": "float32", "quantization": "int8", "batching": "run_to_completion",
            "maxModelLen": 4099, "limits": {"maxBatchSize": 48, "maxKvTokens": 65536, "maxQueue": 777,
                                            "maxPrefillTokens": 2048}},
    policyRef={"name": "full-policy"},
    policy={"preemption": {"mode": "recompute", "maxPreemptionsPerRequest": 4, "agingSeconds": 12.5,
                           "slaClasses": {"gold": {"priority": -7, "ttftMs": 450, "tpotMs": 90, "e2eMs": 9000}}},
            "padding": {"compactionThreshold": 0.3, "maxPaddingRatio": 0.65, "bucketing": True},
            "limits": {"maxBatchSize": 40, "maxKvTokens": 50000, "maxQueue": 300, "maxPrefillTokens": 1500},
            "prefill": {"budget": "tokens", "mode": "separate", "maxStepMs": 140}},
    router={"weight": 12.25, "shadowPercent": 4.5, "stickyHeader": "x-full-session", "fallbackToBaton": True,
            "incumbentTimeoutSeconds": 33},
    rollout={"steps": [11, 22, 88], "pauseSeconds": 321, "analysisIntervalSeconds": 17, "minSamplesPerArm": 123,
             "gates": {"p95LatencyMarginPct": 14.5, "ttftMarginPct": 13.5, "maxErrorRate": 0.015,
                       "minSlaAttainment": 0.93},
             "shadow": {"percent": 37.5, "minPairs": 222, "maxDurationSeconds": 1800}, "failureThreshold": 9,
             "paused": True, "abort": True, "manualGates": [55], "approvedWeight": 21, "attempt": 8,
             "autoTune": {"enabled": True, "compactionThreshold": {"min": 0.11, "max": 0.22},
                          "maxPaddingRatio": {"min": 0.61, "max": 0.91}, "stepSize": 0.025}},
    telemetry={"otlpEndpoint": "http://full-otel:4318", "samplingRatio": 0.37, "serviceName": "full-service"},
    adminTokenSecretRef={"name": "full-admin", "key": "full.token"},
)
FULL = [
    bd("full-standalone", mode="standalone", replicas=7, nodeSelector={"pool.example.com/kind": "full-pool"},
       tolerations=[{"key": "full.example.com/taint", "operator": "Equal", "value": "full-taint-value",
                     "effect": "NoExecute", "tolerationSeconds": 77}],
       **merge_patch(POD_FIELDS, {"router": {"incumbentUrl": "http://full-incumbent:8000"}})),
    bd("full-sidecar", mode="sidecar", targetDeployment="full-target", targetService="full-service-target",
       targetServicePort="full-port", **POD_FIELDS),
    bd("full-autoscaled", mode="standalone", podDisruptionBudget={"enabled": True, "maxUnavailable": "35%"},
       autoscaling={"engine": "keda", "minReplicas": 4, "maxReplicas": 12, "metric": "runningRequests",
                    "target": 5.5, "scaleDownStabilizationSeconds": 240,
                    "prometheusAddress": "http://full-prometheus:9090"}),
]
BARE = {"standalone": bd("bare", mode="standalone"), "sidecar": bd("bare", mode="sidecar", targetDeployment="t")}


def schema_fields(node: dict[str, Any], field: str = "") -> Iterator[str]:
    """The leaf fields of a schema: "image", "tolerations[].key", "resources.requests.*"."""
    if node.get("properties"):
        for name, sub in node["properties"].items():
            yield from schema_fields(sub, f"{field}.{name}" if field else name)
    elif isinstance(node.get("items"), dict):
        yield from schema_fields(node["items"], f"{field}[]")
    elif isinstance(node.get("additionalProperties"), dict):
        yield from schema_fields(node["additionalProperties"], f"{field}.*")
    else:
        yield field


def leaves(node: dict[str, Any], value: Any, field: str = "") -> Iterator[tuple[str, Any]]:
    """(field, value) for every scalar in a spec, fields named as by schema_fields."""
    if isinstance(value, dict):
        extra = node.get("additionalProperties")
        for key, item in value.items():
            if isinstance(extra, dict):
                yield from leaves(extra, item, f"{field}.*")
            else:
                yield from leaves(node["properties"][key], item, f"{field}.{key}" if field else key)
    elif isinstance(value, list):
        for item in value:
            yield from leaves(node["items"], item, f"{field}[]")
    else:
        yield field, value


def occurs(value: Any, tree: Any) -> bool:
    """Whether ``value`` is a scalar of ``tree``, as itself or as the string the operator writes (args, env).
    Booleans are left out: a pod holds too many of them for a match to mean anything."""
    if isinstance(tree, dict):
        return any(occurs(value, v) for v in tree.values())
    if isinstance(tree, list):
        return any(occurs(value, v) for v in tree)
    if isinstance(value, bool) or isinstance(tree, bool):
        return False
    return (type(tree) is type(value) and tree == value) or (isinstance(tree, str) and tree == str(value))


def copied_fields() -> set[str]:
    return {field for obj in FULL for field, value in leaves(SPEC_SCHEMA, obj["spec"])
            if occurs(value, built(obj)["spec"])}


def test_full_objects_are_valid_and_set_every_field() -> None:
    for obj in FULL:
        assert refusals(obj) == [], obj["metadata"]["name"]
        kubernetes_validate.validate(built(obj), K8S_VERSION, strict=True)
    covered = {field for obj in FULL for field, _ in leaves(SPEC_SCHEMA, obj["spec"])}
    assert set(schema_fields(SPEC_SCHEMA)) - covered == set(), "fields of the CRD no FULL object sets"


def test_sentinels_are_distinct() -> None:
    for obj in FULL:
        bare = built(BARE[obj["spec"]["mode"]])["spec"]
        values = [v for _, v in leaves(SPEC_SCHEMA, obj["spec"]) if not isinstance(v, bool)]
        assert len({(type(v), v) for v in values}) == len(values), "a value set twice in one FULL object"
        assert [v for v in values if occurs(v, bare)] == [], "pick values a bare pod does not hold"


# --- each copied field: a right value and wrongly shaped ones ---------------------------------------

def toleration(**fields: Any) -> dict[str, Any]:
    """A spec patch with one toleration: the example's, changed by ``fields`` (None removes one)."""
    return {"tolerations": [merge_patch({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                        fields)]}


@dataclass(frozen=True)
class Case:
    """Spec merge patches on the standalone example: ``good`` passes, each of ``bad`` is refused."""

    good: dict[str, Any]
    bad: list[dict[str, Any]]
    standalone_only: bool = False  # the CRD refuses it in sidecar mode anyway


WRONG = {"wrong": True}
CASES = {
    "replicas": Case({"replicas": 3}, [{"replicas": -1}, {"replicas": "3"}, {"replicas": 1.5}], True),
    "image": Case({"image": "registry.example/baton:1.0"},
                  [{"image": ""}, {"image": "registry.example/baton :1.0"}, {"image": WRONG}]),
    "imagePullPolicy": Case({"imagePullPolicy": "Always"},
                            [{"imagePullPolicy": "Sometimes"}, {"imagePullPolicy": WRONG}]),
    "port": Case({"port": 9000}, [{"port": 80}, {"port": 70000}, {"port": "9000"}]),
    "model.path": Case({"model": {"path": "/models/m"}},
                       [{"model": {"path": "models/m"}}, {"model": {"path": WRONG}}]),
    "model.persistentVolumeClaim": Case(
        {"model": {"path": "/models/m", "persistentVolumeClaim": "models-2.example"}},
        [{"model": {"persistentVolumeClaim": v}} for v in ("Models", "models_2", "-models", "", "m" * 254, WRONG)]),
    "model.mountPath": Case(
        {"model": {"path": "/mnt/models/m", "persistentVolumeClaim": "models", "mountPath": "/mnt/models"}},
        [{"model": {"mountPath": v}} for v in ("mnt/models", res.CONFIG_DIR, f"{res.CACHE_DIR}/", WRONG)]),
    "model.servedName": Case({"model": {"servedName": "qwen"}},
                             [{"model": {"servedName": "q" * 254}}, {"model": {"servedName": WRONG}}]),
    "resources.requests.*": Case(
        {"resources": {"requests": {"cpu": "500m", "memory": 1073741824, "example.com/fpga": "2"}}},
        [{"resources": {"requests": {"cpu": v}}} for v in ("-1", -1, "one", "1 Gi", 0.5, WRONG)]),
    "resources.limits.*": Case(
        {"resources": {"limits": {"cpu": "1.5", "memory": "8e9", "nvidia.com/gpu": 2}}},
        [{"resources": {"limits": {"memory": v}}} for v in ("-8Gi", -1, "8GB", WRONG)]
        + [{"resources": {"claims": [{"name": "gpu"}]}}]),  # no pod-level resourceClaims to refer to
    "nodeSelector.*": Case(
        {"nodeSelector": {"pool": "gpu-a100", "example.com/empty": ""}},
        [{"nodeSelector": {"pool": v}} for v in ("gpu a100", "-gpu", "g" * 64, 5, WRONG)], True),
    "tolerations[].key": Case(
        toleration(key="example.com/gpu_1.x"),
        [toleration(key=v) for v in (WRONG, "Example.com/gpu", "example.com/", "a" * 254 + "/gpu", "k" * 64)]
        + [toleration(key="", operator="Equal"), toleration(keys="typo")], True),
    "tolerations[].operator": Case(
        toleration(operator="Equal", value="present"),
        [toleration(operator=v) for v in ("Lt", "exists", WRONG)] + [toleration(key=None, operator="Equal")], True),
    "tolerations[].value": Case(
        toleration(operator="Equal", value="true"),
        [toleration(operator="Equal", value=v) for v in (WRONG, "has space", "v" * 64, "-v")]
        + [toleration(value="true")], True),  # the example's operator is Exists
    "tolerations[].effect": Case(toleration(effect="PreferNoSchedule"),
                                 [toleration(effect=v) for v in ("NoScheduling", WRONG)], True),
    "tolerations[].tolerationSeconds": Case(
        toleration(effect="NoExecute", tolerationSeconds=300),
        [toleration(effect="NoExecute", tolerationSeconds=v) for v in ("300", 1.5, WRONG)]
        + [toleration(tolerationSeconds=300), toleration(effect=None, tolerationSeconds=300)], True),
    "engine.device": Case({"engine": {"device": "cuda:1"}}, [{"engine": {"device": v}} for v in ("tpu", WRONG)]),
    "engine.dtype": Case({"engine": {"dtype": "float16"}}, [{"engine": {"dtype": v}} for v in ("int4", 16)]),
    "engine.quantization": Case({"engine": {"device": "cpu", "dtype": "float32", "quantization": "int8"}},
                                [{"engine": {"quantization": v}} for v in ("int4", WRONG)]),
    "engine.batching": Case({"engine": {"batching": "rebatch"}},
                            [{"engine": {"batching": v}} for v in ("continuous", WRONG)]),
    "engine.maxModelLen": Case({"engine": {"maxModelLen": 2048}},
                               [{"engine": {"maxModelLen": v}} for v in (0, "2048", 2048.5)]),
    "telemetry.otlpEndpoint": Case({"telemetry": {"otlpEndpoint": "https://otel.example:4318"}},
                                   [{"telemetry": {"otlpEndpoint": v}} for v in ("otel:4318", 4318)]),
    "telemetry.samplingRatio": Case({"telemetry": {"samplingRatio": 0.5}},
                                    [{"telemetry": {"samplingRatio": v}} for v in (1.5, -0.1, "0.5")]),
    "telemetry.serviceName": Case({"telemetry": {"serviceName": "baton-a"}},
                                  [{"telemetry": {"serviceName": v}} for v in ("s" * 254, WRONG)]),
    "adminTokenSecretRef.name": Case(
        {"adminTokenSecretRef": {"name": "baton-admin.v2"}},
        [{"adminTokenSecretRef": {"name": v}} for v in ("Baton_Admin", "", "a" * 254, WRONG)]),
    "adminTokenSecretRef.key": Case(
        {"adminTokenSecretRef": {"name": "baton-admin", "key": ".token_2"}},
        [{"adminTokenSecretRef": {"name": "baton-admin", "key": v}} for v in ("..token", ".", "", "a/b", "k" * 254)]),
}
BAD = [(field, patch) for field, case in CASES.items() for patch in case.bad]


def test_the_cases_are_the_fields_the_operator_copies_into_pods() -> None:
    assert copied_fields() == set(CASES)


def _path(field: str) -> list[str]:
    return [part for part in field.replace("[]", ".[]").split(".") if part]


def test_copied_fields_have_closed_typed_schemas() -> None:
    """No field that reaches a pod passes through x-kubernetes-preserve-unknown-fields or lacks a type."""
    for field in CASES:
        node, seen = SPEC_SCHEMA, [SPEC_SCHEMA]
        for part in _path(field):
            node = node["items"] if part == "[]" else (node["additionalProperties"] if part == "*"
                                                       else node["properties"][part])
            seen.append(node)
        assert not any(n.get("x-kubernetes-preserve-unknown-fields") for n in seen), field
        assert node.get("type") in ("string", "integer", "number") or node.get("x-kubernetes-int-or-string"), field


@pytest.mark.parametrize("field", list(CASES))
def test_a_right_value_passes_the_crd_and_builds_a_valid_pod(field) -> None:
    case = CASES[field]
    bases = [STANDALONE] if case.standalone_only else [STANDALONE, SIDECAR]
    for base in bases:
        obj = merge_patch(base, {"spec": case.good})
        assert refusals(obj) == []
        deployment = built(obj)
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
        values = [v for _, v in leaves(SPEC_SCHEMA, case.good) if not isinstance(v, bool)]
        assert all(occurs(v, deployment["spec"]) for v in values), "the value reaches the pod"


@pytest.mark.parametrize("field, patch", BAD, ids=[f"{f}={json.dumps(p)[:60]}" for f, p in BAD])
def test_a_wrongly_shaped_value_is_refused_by_the_crd(field, patch) -> None:
    found = refusals(merge_patch(STANDALONE, {"spec": patch}))
    top = _path(field)[0]
    assert any(e.startswith((f"spec/{top}", f"spec.{top}")) for e in found), found


def test_the_reported_toleration_is_refused_before_it_reaches_a_pod() -> None:
    """The mutation check's finding: without the Toleration schema this reached the Deployment write."""
    obj = merge_patch(STANDALONE, {"spec": toleration(key=WRONG)})
    assert any(e.startswith("spec/tolerations/0/key") for e in refusals(obj))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(standalone_deployment(obj), K8S_VERSION, strict=True)


# --- the embedded core/v1 Toleration ----------------------------------------------------------

def test_toleration_schema_is_kubernetes_own() -> None:
    """Same fields, types and descriptions as io.k8s.api.core.v1.Toleration of Kubernetes v1.32 (the
    definition kubernetes_validate ships); our schema adds the API server's checks on top."""
    shipped = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / "v1.32.0-local-strict"
    k8s = json.loads((shipped / "toleration-v1.json").read_text())
    ours = SPEC_SCHEMA["properties"]["tolerations"]["items"]
    assert ours["description"] == k8s["description"]
    assert set(ours["properties"]) == set(k8s["properties"])
    for name, theirs in k8s["properties"].items():
        mine = ours["properties"][name]
        assert mine["description"] == theirs["description"], name
        assert [mine["type"], "null"] == theirs["type"] and mine.get("format") == theirs.get("format"), name


def test_model_mount_rule_names_the_sidecars_own_mounts() -> None:
    container = res.baton_container(body(BARE["standalone"]), CFG)
    assert {m["mountPath"] for m in container["volumeMounts"]} == {res.CONFIG_DIR, res.CACHE_DIR}
    (rule,) = SPEC_SCHEMA["properties"]["model"]["properties"]["mountPath"]["x-kubernetes-validations"]
    assert res.CONFIG_DIR in rule["rule"] and res.CACHE_DIR in rule["rule"]
