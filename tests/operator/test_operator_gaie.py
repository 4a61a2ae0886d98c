"""manifests/examples/gaie-inferencepool.yaml: an InferencePool of standalone Baton pods, its endpoint
picker (EPP) and an HTTPRoute. The pool is checked against the GAIE CRD (schema and CEL rules), the
core objects with kubernetes_validate, and the wiring against what the operator and the sidecar do:
the pods the operator labels, the port it opens, the metrics path and series the sidecar serves."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from baton_operator import resources as res
from baton_operator.config import OperatorConfig
from baton_sidecar.server.metrics import Metrics
from baton_sidecar.server.protocol_metrics import SERIES
from crd_schema import CRDValidator
from operator_testlib import EXAMPLES, ROOT

EXAMPLE = EXAMPLES / "gaie-inferencepool.yaml"
POOL_CRD = ROOT.parent / "shared" / "crds" / "inference.networking.k8s.io_inferencepools.yaml"
K8S_VERSIONS = ("1.28.0", "1.32.0")
POOL_GROUP = "inference.networking.k8s.io"
# Refused by recent pickers ("configure metrics via engineConfigs in EndpointPickerConfig instead").
DEPRECATED_METRIC_FLAGS = ("total-queued-requests-metric", "total-running-requests-metric",
                           "kv-cache-usage-percentage-metric", "lora-info-metric", "cache-info-metric")

DOCS = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]


def one(kind: str) -> dict[str, Any]:
    (obj,) = [d for d in DOCS if d["kind"] == kind]
    return obj


POOL, EPP, ROUTE = one("InferencePool"), one("Deployment"), one("HTTPRoute")
(EPP_CONTAINER,) = EPP["spec"]["template"]["spec"]["containers"]


def picker_config() -> dict[str, Any]:
    """The EndpointPickerConfig the EPP reads: its --config-file, found through its volume mount."""
    path = Path(next(a.split("=", 1)[1] for a in EPP_CONTAINER["args"] if a.startswith("--config-file=")))
    (mount,) = [m for m in EPP_CONTAINER["volumeMounts"] if path.parent == Path(m["mountPath"])]
    (volume,) = [v for v in EPP["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    config_map = one("ConfigMap")
    assert config_map["metadata"]["name"] == volume["configMap"]["name"]
    return yaml.safe_load(config_map["data"][path.name])


def plugin(config: dict[str, Any], kind: str) -> dict[str, Any]:
    (found,) = [p for p in config["plugins"] if p["type"] == kind]
    return found.get("parameters") or {}


def standalone_pod_template() -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod template, spec) the operator renders for the example's standalone BatonDeployment."""
    docs = yaml.safe_load_all((EXAMPLES / "batondeployment.yaml").read_text())
    bd = copy.deepcopy(next(d for d in docs if d and d["metadata"]["name"] == "baton-standalone"))
    bd["metadata"].update(namespace="default", uid="uid-1")
    return res.desired_deployment(bd, OperatorConfig())["spec"]["template"], bd["spec"]


# --- the InferencePool against the GAIE CRD -----------------------------------------------------

@pytest.fixture(scope="module")
def pool_crd() -> dict[str, Any]:
    if not POOL_CRD.exists():
        pytest.skip(f"{POOL_CRD} is absent (a plain clone): the InferencePool CRD is reference data kept "
                    f"next to the repository")
    return yaml.safe_load(POOL_CRD.read_text())


def test_pool_validates_against_the_crd_schema(pool_crd) -> None:
    validator = CRDValidator(pool_crd)  # OpenAPI 3.0 structural schema -> jsonschema Draft 4
    assert validator.errors(POOL) == []
    bad = copy.deepcopy(POOL)
    bad["spec"]["targetPorts"] = [{"number": 70000}]
    assert validator.errors(bad), "an out-of-range port must fail, or the schema checks nothing"


def with_defaults(schema: dict[str, Any], value: Any) -> Any:
    """``value`` with the schema's defaults filled in, as the API server does before CEL runs."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        out = {k: with_defaults(props.get(k, {}), v) for k, v in value.items()}
        for name, sub in props.items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
        return out
    if isinstance(value, list):
        return [with_defaults(schema.get("items") or {}, v) for v in value]
    return value


def rules_with_values(schema: dict[str, Any], value: Any, where: str = "") -> Iterator[tuple[str, dict, Any]]:
    """(path, rule, the value it sees as ``self``) for each x-kubernetes-validations rule on present nodes."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield where or "<root>", rule, value
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                yield from rules_with_values(sub, value[name], f"{where}.{name}".lstrip("."))
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from rules_with_values(schema["items"], item, f"{where}[{i}]")


def cel_failures(pool_crd: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    celpy = pytest.importorskip("celpy", reason="cel-python is not installed: CEL rules not evaluated")
    schema = pool_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    env, failed = celpy.Environment(), []
    for where, rule, value in rules_with_values(schema, with_defaults(schema, obj)):
        result = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})
        if not (isinstance(result, celpy.celtypes.BoolType) and result):  # False, or an evaluation error
            failed.append(f"{where}: {rule['message']}")
    return failed


def test_pool_passes_the_crds_cel_rules(pool_crd) -> None:
    assert cel_failures(pool_crd, POOL) == []
    # The rules do run: each fails on an object that breaks it.
    duplicate = copy.deepcopy(POOL)
    duplicate["spec"]["targetPorts"] *= 2
    assert cel_failures(pool_crd, duplicate) == ["spec.targetPorts: port number must be unique"]
    portless = copy.deepcopy(POOL)
    del portless["spec"]["endpointPickerRef"]["port"]
    (failure,) = cel_failures(pool_crd, portless)
    assert failure.startswith("spec.endpointPickerRef: port is required")


# --- the core objects ---------------------------------------------------------------------------

def test_core_objects_pass_kubernetes_validate_strict() -> None:
    core = [d for d in DOCS if d["apiVersion"] in ("v1", "apps/v1", "rbac.authorization.k8s.io/v1")]
    assert sorted(d["kind"] for d in core) == ["ConfigMap", "Deployment", "Role", "RoleBinding", "Service",
                                               "ServiceAccount"]
    for version in K8S_VERSIONS:
        for obj in core:
            kubernetes_validate.validate(obj, version, strict=True)


def test_every_document_is_one_of_the_expected_kinds() -> None:
    assert {(d["apiVersion"], d["kind"]) for d in DOCS} == {
        (f"{POOL_GROUP}/v1", "InferencePool"), ("gateway.networking.k8s.io/v1", "HTTPRoute"),
        ("v1", "ConfigMap"), ("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ServiceAccount"),
        ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding"),
        ("networking.k8s.io/v1", "NetworkPolicy")}


# --- the pool selects what the operator runs -----------------------------------------------------

def test_pool_selects_the_operators_standalone_pods_on_batons_port() -> None:
    template, spec = standalone_pod_template()
    selector = POOL["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    # Sidecar-mode pods (the user's own, injected) carry this label too: it must not select.
    assert res.LABEL_SIDECAR not in selector
    (container,) = template["spec"]["containers"]
    (port,) = [p for p in container["ports"] if p["name"] == res.PORT_NAME]
    assert [p["number"] for p in POOL["spec"]["targetPorts"]] == [port["containerPort"]] == [res.baton_port(spec)]


# --- the picker: wiring, RBAC, metric names --------------------------------------------------------

def test_pool_points_at_the_pickers_service_and_the_picker_at_the_pool() -> None:
    ref, service = POOL["spec"]["endpointPickerRef"], one("Service")
    assert ref["name"] == service["metadata"]["name"] and ref.get("kind", "Service") == "Service"
    (grpc,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert grpc["targetPort"] in {p["name"] for p in EPP_CONTAINER["ports"]}
    assert service["spec"]["selector"].items() <= EPP["spec"]["template"]["metadata"]["labels"].items()
    assert f"--pool-name={POOL['metadata']['name']}" in EPP_CONTAINER["args"]
    assert EPP_CONTAINER["image"].startswith("registry.k8s.io/gateway-api-inference-extension/epp:v")


def test_picker_rbac_reads_its_pool_and_pods() -> None:
    role, binding = one("Role"), one("RoleBinding")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    for group, resource in (("", "pods"), (POOL_GROUP, "inferencepools"),
                            ("inference.networking.x-k8s.io", "inferenceobjectives")):
        assert {(group, resource, v) for v in ("get", "list", "watch")} <= granted
    assert not {v for _, _, v in granted} - {"get", "list", "watch"}, "the picker only reads"
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == EPP["spec"]["template"]["spec"]["serviceAccountName"] \
        == one("ServiceAccount")["metadata"]["name"]


def test_picker_network_policy_admits_the_gateway_and_reaches_the_pool() -> None:
    policy = one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= EPP["spec"]["template"]["metadata"]["labels"].items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ref = POOL["spec"]["endpointPickerRef"]
    (grpc,) = [p for p in one("Service")["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert {"port": grpc["targetPort"], "protocol": "TCP"} in policy["spec"]["ingress"][0]["ports"]
    (to_pool,) = [rule for rule in policy["spec"]["egress"] if rule.get("to")]
    assert to_pool["ports"] == [{"port": res.PORT_NAME, "protocol": "TCP"}]  # Baton's port, any spec.port
    (peer,) = to_pool["to"]
    assert peer["podSelector"]["matchLabels"] == POOL["spec"]["selector"]["matchLabels"]
    assert any({"port": 443, "protocol": "TCP"} in rule["ports"] for rule in policy["spec"]["egress"])  # the API


def test_picker_names_only_series_the_sidecar_serves_on_a_path_it_serves() -> None:
    flags = {a.split("=", 1)[0].lstrip("-") for a in EPP_CONTAINER["args"]}
    assert not flags & set(DEPRECATED_METRIC_FLAGS), "recent pickers refuse to start with these"
    config = picker_config()
    assert config["kind"] == "EndpointPickerConfig"
    assert plugin(config, "metrics-data-source")["path"] == res.METRICS_PATH  # what the sidecar serves
    extractor = plugin(config, "core-metrics-extractor")
    (engine,) = [e for e in extractor["engineConfigs"] if e["name"] == extractor["defaultEngine"]]
    named = {spec for key, spec in engine.items() if key.endswith("Spec") and spec}
    assert {"queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec"} <= {k for k, v in engine.items() if v}
    # A render of the sidecar's real registry: every series the picker is told to read is there.
    stats = SimpleNamespace(running=1, waiting=2, swapped=0, batch_size=1, padding_ratio=0.0,
                            kv_tokens_used=10, kv_tokens_capacity=100, steps=1, preemptions_total=0,
                            kv_slots_total=0, kv_padding_slots_total=0, refusals_by_reason={},
                            finished_by_reason={})
    text = Metrics(lambda: SimpleNamespace(stats=lambda: stats)).render().decode()
    served = {f.name for f in text_string_to_metric_families(text)}
    assert named <= served and named <= set(SERIES), named - served
    # Only load scorers: Baton keeps no prefix cache for a prefix scorer to aim at.
    profile = {p["pluginRef"] for p in config["schedulingProfiles"][0]["plugins"]}
    assert profile == {"queue-scorer", "kv-cache-utilization-scorer"}


def test_route_sends_the_openai_api_to_the_pool_only() -> None:
    (rule,) = ROUTE["spec"]["rules"]
    assert rule["backendRefs"] == [{"group": POOL_GROUP, "kind": "InferencePool",
                                    "name": POOL["metadata"]["name"]}]
    assert [m["path"] for m in rule["matches"]] == [{"type": "PathPrefix", "value": "/v1"}]
    assert not res.SIDECAR_PREFIX.startswith("/v1")  # so /baton/* never reaches the gateway
    assert all(p["kind"] == "Gateway" for p in ROUTE["spec"]["parentRefs"])
