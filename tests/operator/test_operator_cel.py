"""The CRDs' CEL rules, evaluated offline (cel_rules.CELValidator) rather than only found in the YAML.

Every rule compiles; the examples and the objects meant to be valid break none; each rule refuses the
objects of REFUSED it is listed for, and nothing else does; the transition rules refuse a change and let
an unchanged value through (UPDATES). A rule that no row breaks fails
``test_every_rule_is_broken_by_some_row``: add rows for a new rule to REFUSED or UPDATES.
The chart carries byte-identical copies of these CRDs (test_operator_manifests), so its rules are these.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from baton_kube_emulator import merge_patch
from cel_rules import CELValidator, RuleError, compile_rule, rule_sites, to_cel
from crd_schema import CRDValidator
from operator_testlib import CRD_DIR, EXAMPLES

CRDS = [doc for path in sorted(CRD_DIR.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]
SCHEMAS = {crd["spec"]["names"]["kind"]: CRDValidator(crd) for crd in CRDS}


@functools.cache
def cel(kind: str) -> CELValidator:
    return CELValidator(SCHEMAS[kind].crd)


def _examples() -> list[dict[str, Any]]:
    docs = [d for path in sorted(EXAMPLES.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]
    return [d for d in docs if d.get("kind") in SCHEMAS]


EXAMPLE_OBJECTS = _examples()
BASES = {obj["metadata"]["name"]: obj for obj in EXAMPLE_OBJECTS}  # baton-standalone, baton-canary, default
STANDALONE, SIDECAR = "baton-standalone", "baton-canary"


def bd(name: str = "b1", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "baton.dev/v1alpha1", "kind": "BatonDeployment", "metadata": {"name": name},
            "spec": spec}


# --- (a) every rule compiles ---------------------------------------------------------------------

ALL_RULES = [(crd["spec"]["names"]["kind"], where, node, rule) for crd in CRDS
             for where, node in rule_sites(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
             for rule in node.get("x-kubernetes-validations", [])]


@pytest.mark.parametrize("kind, where, node, rule", ALL_RULES,
                         ids=[f"{k}:{w}:{r['rule'][:40]}" for k, w, _, r in ALL_RULES])
def test_every_rule_compiles(kind, where, node, rule) -> None:
    compiled = compile_rule(where, node, rule)
    assert compiled.message and compiled.message == rule["message"], "every rule carries its own message"


def test_the_rules_are_where_the_crds_say() -> None:
    assert len(cel("BatonDeployment").rules) == sum(k == "BatonDeployment" for k, *_ in ALL_RULES) > 0
    transitions = {r.where for r in cel("BatonDeployment").rules if r.transition}
    assert transitions == {"spec.mode", "spec.targetDeployment"}


@pytest.mark.parametrize("rule, problem", [
    ("self.steps.isSemver()", "unknown function isSemver()"),  # an extension nobody implemented
    ("self.stepz.size() > 0", "undefined field self.stepz"),  # a typo would never fire on a server
    ("self.steps.all(s, s > 0) && t", "undeclared variable t"),
    ("self.steps ==", "does not parse"),
])
def test_a_rule_the_helper_cannot_check_fails_loudly(rule, problem) -> None:
    node = {"type": "object", "properties": {"steps": {"type": "array", "items": {"type": "integer"}}}}
    with pytest.raises(RuleError, match=re.escape(problem)):
        compile_rule("spec.rollout", node, {"rule": rule, "message": "m"})


def test_a_rule_option_the_helper_does_not_mirror_fails_loudly() -> None:
    with pytest.raises(RuleError, match="optionalOldSelf"):
        compile_rule("spec.mode", {"type": "string"}, {"rule": "self == oldSelf", "optionalOldSelf": True})


def test_values_reach_cel_typed_by_their_schema() -> None:
    assert repr(to_cel({"type": "number"}, 1)) == "DoubleType(1.0)"  # a number written as 1
    assert type(to_cel({"type": "string", "format": "date-time"}, "2025-01-02T03:04:05Z")).__name__ == "TimestampType"
    assert to_cel({"type": "object", "properties": {"a": {"type": "integer"}}}, {"a": 1, "pruned": 2}) == {"a": 1}
    root = to_cel({"type": "object", "properties": {"metadata": {"type": "object"}}},
                  {"metadata": {"name": "n", "labels": {"x": "y"}}}, root=True)
    assert root == {"metadata": {"name": "n"}}  # the root shows metadata.name and generateName only


def test_rules_run_where_the_api_server_runs_them() -> None:
    """Defaults first; no rule on an absent or null value; a map-list element keeps its old self by key,
    an atomic list's element has none."""
    def crd(list_type: str) -> dict[str, Any]:
        item = {"type": "object", "properties": {"name": {"type": "string"}, "size": {"type": "integer"}},
                "x-kubernetes-validations": [{"rule": "self.size >= oldSelf.size", "message": "shrunk"}]}
        spec = {"type": "object", "properties": {
            "port": {"type": "integer", "default": 80, "x-kubernetes-validations": [
                {"rule": "self != 80", "message": "default port"}]},
            "note": {"type": "string", "nullable": True, "x-kubernetes-validations": [
                {"rule": "self.size() > 0", "message": "empty note"}]},
            "disks": {"type": "array", "items": item, "x-kubernetes-list-type": list_type,
                      **({"x-kubernetes-list-map-keys": ["name"]} if list_type == "map" else {})}}}
        return {"spec": {"names": {"kind": "T"}, "versions": [{"schema": {"openAPIV3Schema": {
            "type": "object", "properties": {"spec": spec}}}}]}}

    mapped, atomic = CELValidator(crd("map")), CELValidator(crd("atomic"))
    assert mapped.messages({"spec": {}}) == {"default port"}
    assert mapped.messages({"spec": {"port": 81, "note": None}}) == set()
    old = {"spec": {"port": 81, "disks": [{"name": "a", "size": 2}, {"name": "b", "size": 5}]}}
    new = {"spec": {"port": 81, "disks": [{"name": "b", "size": 4}, {"name": "a", "size": 3}]}}
    assert [v.path for v in mapped.violations(new, old)] == ["spec.disks[0]"]  # b shrank, found by its name
    assert atomic.violations(new, old) == []


# --- (b) what is meant to be valid breaks no rule ------------------------------------------------

VALID = [
    *EXAMPLE_OBJECTS,
    bd(mode="standalone"),
    bd("x" * 50, mode="standalone"),  # the longest name
    # tests/operator/test_operator_e2e.py: valid for the API server, refused by the operator (spec.port)
    bd("clash", mode="sidecar", targetDeployment="llm-server", port=8000),
    # tests/rollout/rollout_testlib.py batondeployment(): an external incumbent and a rollout
    bd("r", mode="standalone", router={"incumbentUrl": "http://inc:8000"}, rollout={"steps": [5, 100]}),
    bd("tolerate-all", mode="standalone", tolerations=[{"operator": "Exists"}]),
    bd("tolerations", mode="standalone", tolerations=[
        {"key": "example.com/gpu", "operator": "Equal", "value": "a100", "effect": "NoExecute",
         "tolerationSeconds": 30},
        {"key": "dedicated", "value": "baton"},  # operator defaults to Equal
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "", "value": ""},
    ]),
    bd("resources", mode="standalone", resources={"requests": {"cpu": 0, "memory": "+1Gi"}, "limits": {"cpu": 2}}),
    bd("mounts", mode="standalone", model={"path": "/etc/baton-models/m", "persistentVolumeClaim": "m",
                                           "mountPath": "/etc/baton-models"}),
    bd("scaled", mode="standalone", autoscaling={"maxReplicas": 4, "target": 8},
       podDisruptionBudget={"maxUnavailable": "25%"}),
]


@pytest.mark.parametrize("obj", VALID, ids=[f"{o['kind']}:{o['metadata']['name'][:20]}" for o in VALID])
def test_valid_objects_break_no_rule(obj) -> None:
    assert SCHEMAS[obj["kind"]].errors(obj) == []
    assert cel(obj["kind"]).violations(obj) == []
    assert cel(obj["kind"]).violations(obj, old=obj) == [], "an unchanged object must stay valid on update"


# --- (c) each rule refuses what it is for, and only that -----------------------------------------

@dataclass(frozen=True)
class Refused:
    """``base`` (an example's name) with ``patch`` (a merge patch; None removes) breaks exactly the rules
    whose messages are ``messages``; the object is otherwise schema-valid, so only CEL refuses it."""

    name: str
    base: str
    patch: dict[str, Any]
    messages: set[str]


NAME_LENGTH = "metadata.name must be at most 50 characters (child object names derive from it)"
NEEDS_TARGET = "sidecar mode requires targetDeployment"
TARGETS_SIDECAR_ONLY = "targetDeployment, targetService and targetServicePort apply to sidecar mode only"
PODS_STANDALONE_ONLY = ("replicas, nodeSelector and tolerations apply to standalone mode only "
                        "(sidecar mode follows the target Deployment)")
INCUMBENT_URL = ("in sidecar mode the incumbent is the target Deployment's container; router.incumbentUrl is "
                 "for standalone mode")
MODEL_PATH = "model.path is required with model.persistentVolumeClaim"
MOUNT_PATH = "model.mountPath must differ from the sidecar's own mounts /etc/baton and /var/cache/baton"
NEGATIVE = "resource quantities must not be negative"
KEY_EMPTY = "operator must be Exists when `key` is empty, which means \"match all values and all keys\""
EXISTS_VALUE = "value must be empty when `operator` is 'Exists'"
NO_EXECUTE = "effect must be 'NoExecute' when `tolerationSeconds` is set"
KEY_PREFIX = "the prefix of a toleration key (before /) must be at most 253 characters"
STEPS_SORTED = "rollout.steps must be in ascending order"
SCALING_STANDALONE_ONLY = ("autoscaling and podDisruptionBudget apply to standalone mode only (in sidecar mode, "
                           "scale the target Deployment on Baton's metrics: see docs/operator.md, Scaling)")
MIN_MAX = "autoscaling.minReplicas must not exceed autoscaling.maxReplicas"
KV_TARGET = "autoscaling.target is a fraction of the KV budget (0..1] with metric kvUsage"
PROMETHEUS_KEDA = ("autoscaling.prometheusAddress applies to engine keda only (engine hpa reads metrics through "
                   "the Prometheus adapter)")
MAX_UNAVAILABLE = "podDisruptionBudget.maxUnavailable must be a count >= 0 or a percentage such as 25%"


def tolerations(*items: dict[str, Any]) -> dict[str, Any]:
    return {"spec": {"tolerations": list(items)}}


REFUSED = [
    # <root>
    Refused("name too long", STANDALONE, {"metadata": {"name": "x" * 51}}, {NAME_LENGTH}),
    # spec: which fields go with which mode
    Refused("sidecar without target", SIDECAR, {"spec": {"targetDeployment": None}}, {NEEDS_TARGET}),
    Refused("standalone with a target", STANDALONE, {"spec": {"targetDeployment": "llm"}}, {TARGETS_SIDECAR_ONLY}),
    Refused("standalone with a target port", STANDALONE, {"spec": {"targetServicePort": 80}}, {TARGETS_SIDECAR_ONLY}),
    Refused("sidecar with replicas", SIDECAR, {"spec": {"replicas": 2}}, {PODS_STANDALONE_ONLY}),
    Refused("sidecar with tolerations", SIDECAR, tolerations({"operator": "Exists"}), {PODS_STANDALONE_ONLY}),
    Refused("sidecar with an incumbent url", SIDECAR, {"spec": {"router": {"incumbentUrl": "http://x"}}},
            {INCUMBENT_URL}),
    # spec.model
    Refused("claim without a path", STANDALONE, {"spec": {"model": {"path": None}}}, {MODEL_PATH}),
    Refused("model over the config mount", STANDALONE, {"spec": {"model": {"mountPath": "/etc/baton"}}},
            {MOUNT_PATH}),
    Refused("model over the cache mount", STANDALONE, {"spec": {"model": {"mountPath": "/var/cache/baton/"}}},
            {MOUNT_PATH}),
    # spec.resources: strings are held by the quantity pattern, integers by the rule
    Refused("negative request", STANDALONE, {"spec": {"resources": {"requests": {"cpu": -1}}}}, {NEGATIVE}),
    Refused("negative limit", STANDALONE, {"spec": {"resources": {"limits": {"memory": -1}}}}, {NEGATIVE}),
    # spec.tolerations[]: the API server's ValidateTolerations
    Refused("empty key with Equal", STANDALONE, tolerations({"operator": "Equal", "effect": "NoSchedule"}),
            {KEY_EMPTY}),
    Refused("empty key, no operator", STANDALONE, tolerations({"key": "", "effect": "NoSchedule"}), {KEY_EMPTY}),
    Refused("Exists with a value", STANDALONE, tolerations({"key": "k", "operator": "Exists", "value": "v"}),
            {EXISTS_VALUE}),
    Refused("seconds without NoExecute", STANDALONE,
            tolerations({"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}), {NO_EXECUTE}),
    Refused("seconds without an effect", STANDALONE, tolerations({"key": "k", "tolerationSeconds": 5}),
            {NO_EXECUTE}),
    Refused("key prefix too long", STANDALONE, tolerations({"key": "a" * 254 + "/gpu", "operator": "Exists"}),
            {KEY_PREFIX}),
    Refused("two rules of one toleration", STANDALONE,
            tolerations({"operator": "Exists", "value": "v", "tolerationSeconds": 1}), {EXISTS_VALUE, NO_EXECUTE}),
    # spec.rollout
    Refused("steps out of order", SIDECAR, {"spec": {"rollout": {"steps": [5, 1, 100]}}}, {STEPS_SORTED}),
    # spec.autoscaling, spec.podDisruptionBudget
    Refused("sidecar with autoscaling", SIDECAR, {"spec": {"autoscaling": {"maxReplicas": 3, "target": 4}}},
            {SCALING_STANDALONE_ONLY}),
    Refused("sidecar with a disruption budget", SIDECAR, {"spec": {"podDisruptionBudget": {"enabled": True}}},
            {SCALING_STANDALONE_ONLY}),
    Refused("min above max", STANDALONE,
            {"spec": {"autoscaling": {"minReplicas": 5, "maxReplicas": 3, "target": 4}}}, {MIN_MAX}),
    Refused("kv target above 1", STANDALONE,
            {"spec": {"autoscaling": {"maxReplicas": 3, "metric": "kvUsage", "target": 1.5}}}, {KV_TARGET}),
    Refused("prometheus with hpa", STANDALONE, {"spec": {"autoscaling": {
        "maxReplicas": 3, "target": 4, "prometheusAddress": "http://prometheus:9090"}}}, {PROMETHEUS_KEDA}),
    Refused("max unavailable not a percentage", STANDALONE,
            {"spec": {"podDisruptionBudget": {"maxUnavailable": "one"}}}, {MAX_UNAVAILABLE}),
    Refused("max unavailable negative", STANDALONE, {"spec": {"podDisruptionBudget": {"maxUnavailable": -1}}},
            {MAX_UNAVAILABLE}),
]


def _refused_object(row: Refused) -> dict[str, Any]:
    return merge_patch(BASES[row.base], row.patch)


@pytest.mark.parametrize("row", REFUSED, ids=[r.name for r in REFUSED])
def test_each_rule_refuses_what_it_is_for(row) -> None:
    obj = _refused_object(row)
    assert SCHEMAS[obj["kind"]].errors(obj) == [], "the row must break CEL rules only"
    violations = cel(obj["kind"]).violations(obj)
    assert [v for v in violations if v.error] == [], "a rule failed to evaluate"
    assert {v.message for v in violations} == row.messages


# --- (d) transition rules ----------------------------------------------------------------------

@dataclass(frozen=True)
class Update:
    """An update from the example ``base`` to ``base`` + ``patch``: the messages of the rules it breaks."""

    name: str
    base: str
    patch: dict[str, Any]
    messages: set[str]


IMMUTABLE_MODE = "mode is immutable; create a new BatonDeployment instead"
IMMUTABLE_TARGET = "targetDeployment is immutable"

UPDATES = [
    Update("standalone becomes sidecar", STANDALONE, {"spec": {
        "mode": "sidecar", "targetDeployment": "llm-server", "replicas": None, "nodeSelector": None,
        "tolerations": None}}, {IMMUTABLE_MODE}),
    Update("sidecar becomes standalone", SIDECAR, {"spec": {
        "mode": "standalone", "targetDeployment": None, "targetService": None, "targetServicePort": None}},
        {IMMUTABLE_MODE}),
    Update("another target", SIDECAR, {"spec": {"targetDeployment": "llm-server-2"}}, {IMMUTABLE_TARGET}),
    Update("standalone unchanged", STANDALONE, {}, set()),
    Update("sidecar unchanged", SIDECAR, {}, set()),
    Update("other fields change", SIDECAR, {"spec": {"targetService": "llm-server-2", "rollout": {"paused": True},
                                                     "image": "registry.example/baton:2"}}, set()),
]


@pytest.mark.parametrize("row", UPDATES, ids=[u.name for u in UPDATES])
def test_transition_rules_refuse_changes_only(row) -> None:
    old = BASES[row.base]
    new = merge_patch(old, row.patch)
    assert SCHEMAS[new["kind"]].errors(new) == []
    assert cel(new["kind"]).violations(new) == [], "the new object is valid on its own: only the update is not"
    assert {v.message for v in cel(new["kind"]).violations(new, old=old)} == row.messages


def test_every_rule_is_broken_by_some_row() -> None:
    broken = set()
    for row in REFUSED:
        obj = _refused_object(row)
        broken |= {(obj["kind"], v.where, v.rule) for v in cel(obj["kind"]).violations(obj)}
    for update in UPDATES:
        old = BASES[update.base]
        new = merge_patch(old, update.patch)
        broken |= {(new["kind"], v.where, v.rule) for v in cel(new["kind"]).violations(new, old=old)}
    every = {(kind, rule.where, rule.rule) for kind in SCHEMAS for rule in cel(kind).rules}
    assert every - broken == set(), "rules no row of REFUSED or UPDATES breaks"
