"""Static checks of the CRDs, examples, plain manifests and Dockerfiles (no cluster, no helm)."""

from __future__ import annotations

import copy
import filecmp
import re
import subprocess
import sys

import pytest
import yaml

from cel_rules import rule_sites
from crd_schema import cel_rules, load_crds
from operator_testlib import CRD_DIR, EXAMPLES, ROOT

CRDS = load_crds(CRD_DIR)
BD, BP = CRDS["BatonDeployment"], CRDS["BatonPolicy"]


def docs(path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def example(name: str) -> dict:
    return next(d for d in docs(EXAMPLES / "batondeployment.yaml") if d["metadata"]["name"] == name)


def test_helm_carries_the_same_crds() -> None:
    helm_crds = ROOT / "helm" / "baton" / "crds"
    names = sorted(p.name for p in CRD_DIR.glob("*.yaml"))
    assert names == sorted(p.name for p in helm_crds.glob("*.yaml")), "manifests/crds and helm/baton/crds differ"
    mismatch = [n for n in names if not filecmp.cmp(CRD_DIR / n, helm_crds / n, shallow=False)]
    assert not mismatch, f"helm/baton/crds differs from manifests/crds in {mismatch}: copy manifests/crds over"


def test_crd_names_scope_subresources_and_columns() -> None:
    for kind, short in (("BatonDeployment", "bd"), ("BatonPolicy", "bp")):
        crd = CRDS[kind].crd
        assert crd["spec"]["group"] == "baton.dev" and crd["spec"]["scope"] == "Namespaced"
        assert crd["spec"]["names"]["shortNames"] == [short]
        (version,) = crd["spec"]["versions"]
        assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
        assert version["subresources"] == {"status": {}}
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.baton.dev"
    columns = {c["name"]: c["jsonPath"] for c in BD.crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Mode"] == ".spec.mode" and columns["Phase"] == ".status.phase"
    assert columns["Weight"] == ".status.traffic.weight" and columns["Age"] == ".metadata.creationTimestamp"


def test_deployment_policy_overrides_have_the_policy_schema() -> None:
    overrides = BD.openapi["properties"]["spec"]["properties"]["policy"]["properties"]
    assert overrides == BP.openapi["properties"]["spec"]["properties"]
    limits = BD.openapi["properties"]["spec"]["properties"]["engine"]["properties"]["limits"]["properties"]
    assert limits == overrides["limits"]["properties"]


def test_rollout_schema_is_defined_for_the_rollout_controller() -> None:
    rollout = BD.openapi["properties"]["spec"]["properties"]["rollout"]["properties"]
    assert set(rollout) == {"steps", "pauseSeconds", "analysisIntervalSeconds", "minSamplesPerArm", "gates",
                            "failureThreshold", "paused", "abort", "manualGates", "approvedWeight", "attempt",
                            "autoTune", "shadow"}
    assert rollout["steps"]["items"] == {"type": "integer", "minimum": 0, "maximum": 100}
    assert set(rollout["shadow"]["properties"]) == {"percent", "minPairs", "maxDurationSeconds"}
    assert set(rollout["gates"]["properties"]) == {"p95LatencyMarginPct", "ttftMarginPct", "maxErrorRate",
                                                   "minSlaAttainment"}


def test_padding_descriptions_match_the_engine() -> None:
    # compactionThreshold governs cache memory (live window / allocated buffers), not the padding
    # ratio; auto-tune only moves maxPaddingRatio and keeps accepting compactionThreshold bounds.
    for padding in (BP.openapi["properties"]["spec"]["properties"]["padding"]["properties"],
                    BD.openapi["properties"]["spec"]["properties"]["policy"]["properties"]["padding"]["properties"]):
        text = padding["compactionThreshold"]["description"]
        assert "masked/all" not in text and "buffers" in text and "0.25" in text
    auto_tune = BD.openapi["properties"]["spec"]["properties"]["rollout"]["properties"]["autoTune"]
    assert set(auto_tune["properties"]) == {"enabled", "compactionThreshold", "maxPaddingRatio", "stepSize"}
    assert "maxPaddingRatio" in auto_tune["description"] and "thresholds" not in auto_tune["description"]
    assert auto_tune["properties"]["compactionThreshold"]["description"].startswith("Deprecated and ignored")
    example = next(d for d in docs(EXAMPLES / "batonpolicy.yaml") if d["kind"] == "BatonPolicy")
    assert example["spec"]["padding"]["compactionThreshold"] < 0.5  # near 0.5 the buffers would thrash


def test_cel_rules_are_where_the_schema_alone_cannot_say_it() -> None:
    rules = {(where, rule["rule"]) for where, rule in cel_rules(BD.openapi)}
    messages = {rule["message"] for _, rule in cel_rules(BD.openapi)}
    assert ("spec", "self.mode != 'sidecar' || has(self.targetDeployment)") in rules
    assert ("spec.mode", "self == oldSelf") in rules
    assert ("spec.rollout", "!has(self.steps) || self.steps.isSorted()") in rules
    assert "sidecar mode requires targetDeployment" in messages
    for _, rule in cel_rules(BD.openapi):
        assert rule.get("message"), f"CEL rule without a message: {rule['rule']}"
        # Every has()/self.<field> in a rule names a field of the schema (a typo would never fire).
        for name in re.findall(r"self\.([a-zA-Z]+)", rule["rule"]):
            assert name in yaml.safe_dump(BD.openapi), f"unknown field {name!r} in rule {rule['rule']}"


@pytest.mark.parametrize("path", ["batondeployment.yaml", "batonpolicy.yaml"])
def test_examples_validate_against_the_crds(path) -> None:
    objects = docs(EXAMPLES / path)
    assert objects
    for obj in objects:
        assert CRDS[obj["kind"]].errors(obj) == [], obj["metadata"]["name"]


def test_examples_show_both_modes() -> None:
    modes = {d["spec"]["mode"] for d in docs(EXAMPLES / "batondeployment.yaml")}
    assert modes == {"standalone", "sidecar"}
    assert example("baton-standalone")["spec"]["resources"]["limits"]["nvidia.com/gpu"] == 1


def _with(obj: dict, path: str, value) -> dict:
    obj = copy.deepcopy(obj)
    *parents, leaf = path.split(".")
    node = obj
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return obj


BAD_DEPLOYMENTS = [
    ("spec.mode", "canary", "spec/mode"),
    ("spec.replicas", -1, "spec/replicas"),
    ("spec.port", 80, "spec/port"),  # privileged port: the sidecar runs as non-root
    ("spec.resources.limits", {"nvidia.com/gpu": "one"}, "spec/resources/limits/nvidia.com/gpu"),
    ("spec.engine.device", "tpu", "spec/engine/device"),
    ("spec.engine.dtype", "int4", "spec/engine/dtype"),
    ("spec.engine.quantization", "int4", "spec/engine/quantization"),
    ("spec.policy.preemption.mode", "sometimes", "spec/policy/preemption/mode"),
    ("spec.policy.padding.maxPaddingRatio", 1.5, "spec/policy/padding/maxPaddingRatio"),
    ("spec.policy.preemption.slaClasses", {"x": {"ttftMs": 0}}, "spec/policy/preemption/slaClasses/x/ttftMs"),
    ("spec.policy.prefill.mode", "chunked", "spec/policy/prefill/mode"),
    ("spec.policy.prefill.maxStepMs", 0, "spec/policy/prefill/maxStepMs"),
    ("spec.engine.limits.maxBatchSize", 0, "spec/engine/limits/maxBatchSize"),
    ("spec.router.weight", 101, "spec/router/weight"),
    ("spec.router.incumbentUrl", "ftp://x", "spec/router/incumbentUrl"),
    ("spec.router.incumbentUrl", "http://x/?key=k", "spec/router/incumbentUrl"),  # the client's query goes there
    ("spec.rollout.steps", [1, 5, 250], "spec/rollout/steps/2"),
    ("spec.rollout.steps", [], "spec/rollout/steps"),
    ("spec.rollout.gates.maxErrorRate", 2, "spec/rollout/gates/maxErrorRate"),
    ("spec.rollout.analysisIntervalSeconds", 1, "spec/rollout/analysisIntervalSeconds"),
    ("spec.rollout.shadow.percent", 0, "spec/rollout/shadow/percent"),  # would mirror nothing
    ("spec.rollout.shadow.percent", 120, "spec/rollout/shadow/percent"),
    ("spec.rollout.shadow.minPairs", 0, "spec/rollout/shadow/minPairs"),
    ("spec.rollout.shadow.minPairs", 2.5, "spec/rollout/shadow/minPairs"),
    ("spec.rollout.shadow.maxDurationSeconds", 0, "spec/rollout/shadow/maxDurationSeconds"),
    ("spec.rollout.shadow.mirror", 5, "spec/rollout/shadow"),  # unknown field
    ("spec.router.shadowPercent", 101, "spec/router/shadowPercent"),
    ("spec.telemetry.samplingRatio", 1.1, "spec/telemetry/samplingRatio"),
    ("spec.model.path", "relative/dir", "spec/model/path"),
    ("spec.adminTokenSecretRef", {"key": "token"}, "spec/adminTokenSecretRef"),
    ("spec.replicaCount", 2, "spec"),  # unknown field (a typo of replicas)
]


@pytest.mark.parametrize("field, value, where", BAD_DEPLOYMENTS, ids=[b[0] + "=" + repr(b[1]) for b in BAD_DEPLOYMENTS])
def test_known_bad_deployments_are_rejected(field, value, where) -> None:
    errors = BD.errors(_with(example("baton-standalone"), field, value))
    assert errors, f"{field}={value!r} was accepted"
    assert any(e.startswith(where) for e in errors), errors


def test_a_deployment_without_mode_or_spec_is_rejected() -> None:
    body = example("baton-standalone")
    assert BD.errors({k: v for k, v in body.items() if k != "spec"})
    assert BD.errors(_with(body, "spec", {"replicas": 1}))


@pytest.mark.parametrize("field, value", [("spec.preemption.mode", "always"), ("spec.padding.bucketing", "yes"),
                                          ("spec.preemption.maxPreemptionsPerRequest", -1),
                                          ("spec.padding.compactionThreshold", -0.1), ("spec.limits.maxQueue", 0),
                                          ("spec.prefill.budget", "latency"), ("spec.prefill.mode", "chunked"),
                                          ("spec.prefill.maxStepMs", 0), ("spec.prefill.maxStepMs", "50ms"),
                                          ("spec.prefill.chunkTokens", 64), ("spec.maxStepMs", 50),
                                          ("spec.priorityClasses", {})])
def test_known_bad_policies_are_rejected(field, value) -> None:
    policy = docs(EXAMPLES / "batonpolicy.yaml")[0]
    errors = BP.errors(_with(policy, field, value))
    assert errors, f"{field}={value!r} was accepted"
    where, parent = field.replace(".", "/"), field.rpartition(".")[0].replace(".", "/")
    assert any(e.startswith((f"{where}:", f"{parent}:")) for e in errors), errors  # unknown: at its parent


def test_null_removes_an_sla_class_and_is_accepted() -> None:
    policy = _with(docs(EXAMPLES / "batonpolicy.yaml")[0], "spec.preemption.slaClasses", {"batch": None})
    assert BP.errors(policy) == []


def test_builtin_manifests_pass_kubernetes_validate_strict() -> None:
    files = [ROOT / "manifests" / "rbac.yaml", ROOT / "manifests" / "operator.yaml", EXAMPLES / "incumbent.yaml"]
    proc = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--kubernetes-version", "1.28.0",
                           *map(str, files)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed") == 12


def _rules() -> list[dict]:
    (role,) = [d for d in docs(ROOT / "manifests" / "rbac.yaml") if d["kind"] == "ClusterRole"]
    return role["rules"]


def test_rbac_is_least_privilege() -> None:
    granted = {(group, resource, verb) for rule in _rules() for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert not any("*" in entry for entry in granted)
    assert not any(verb in ("deletecollection", "update", "escalate", "bind", "impersonate")
                   and resource != "batondeployments/finalizers" for _, resource, verb in granted)
    # It deletes only what a BatonDeployment stops asking for: its autoscaler and disruption budget.
    assert {resource for _, resource, verb in granted if verb == "delete"} == {
        "horizontalpodautoscalers", "scaledobjects", "poddisruptionbudgets"}
    assert not any(resource in ("secrets", "pods", "namespaces", "customresourcedefinitions")
                   for _, resource, _ in granted)
    assert ("apps", "deployments", "patch") in granted and ("", "events", "create") in granted


def test_leader_election_rights_are_leases_in_the_operator_namespace_only() -> None:
    roles = [d for d in docs(ROOT / "manifests" / "rbac.yaml") if d["kind"] == "Role"]
    assert [(r["metadata"]["namespace"], r["rules"]) for r in roles] == [
        ("baton-system", [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                           "verbs": ["get", "create", "patch"]}])]
    assert not any("leases" in rule["resources"] for rule in _rules())  # not cluster-wide


def test_operator_runs_two_replicas_with_leader_election() -> None:
    deployment, budget, _ = docs(ROOT / "manifests" / "operator.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert deployment["spec"]["replicas"] == 2 and env["BATON_LEADER_ELECTION"] == "true"
    assert env["BATON_HEALTH_ADDRESS"].endswith(":8081")
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    # Ready as a standby too: a leader-only readiness would stall the rollout (maxUnavailable: 0).
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert budget["kind"] == "PodDisruptionBudget" and budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() \
        <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_operator_runs_non_root_with_a_read_only_root() -> None:
    deployment, _, _ = docs(ROOT / "manifests" / "operator.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["args"][:3] == ["run", "--standalone", "--all-namespaces"]
    assert container["args"][-2:] == ["-m", "baton_operator"]


@pytest.mark.parametrize("name", ["operator.Dockerfile", "sidecar.Dockerfile"])
def test_images_run_as_a_numeric_non_root_user(name) -> None:
    text = (ROOT / "docker" / name).read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"


def test_sidecar_image_is_cuda_capable_and_installs_the_project() -> None:
    text = (ROOT / "docker" / "sidecar.Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+-runtime-", text, re.MULTILINE)
    assert "pip install ." in text
    assert 'CMD ["serve", "--config", "/etc/baton/baton.yaml", "--host", "0.0.0.0", "--port", "8080"]' in text


def test_operator_image_carries_the_sidecar_modules_the_operator_imports() -> None:
    """The operator imports a few pure-Python modules of ``baton_sidecar`` (the shared statistics);
    its image copies exactly those, and they import nothing beyond the standard library."""
    import ast

    text = (ROOT / "docker" / "operator.Dockerfile").read_text()
    copied = set(re.findall(r"\bbaton_sidecar/(\w+)\.py\b", text))
    imported = set()
    for path in (ROOT / "operator" / "baton_operator").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("baton_sidecar"):
                parts = node.module.split(".")[1:]
                imported |= {parts[0]} if parts else {a.name for a in node.names}
    assert imported and imported | {"__init__"} == copied
    for name in imported:
        tree = ast.parse((ROOT / "baton_sidecar" / f"{name}.py").read_text())
        modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert modules <= set(sys.stdlib_module_names) | {"__future__"}, (name, modules)


SCHEMA_KEYWORDS = {
    "type", "format", "description", "enum", "default", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "pattern", "minLength", "maxLength", "minItems", "maxItems", "minProperties",
    "maxProperties", "required", "properties", "items", "additionalProperties", "nullable", "anyOf", "allOf",
    "oneOf", "not", "uniqueItems", "multipleOf", "title", "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-validations", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-embedded-resource"}


def test_schema_nodes_use_only_openapi_keywords() -> None:
    """A comma in a flow mapping's plain scalar (``{description: a, b}``) silently starts a new key."""
    for kind, crd in CRDS.items():
        for where, node in rule_sites(crd.openapi):
            assert set(node) <= SCHEMA_KEYWORDS, (kind, where, set(node) - SCHEMA_KEYWORDS)
