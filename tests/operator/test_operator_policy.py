"""The effective-policy merge: operator defaults < namespace BatonPolicy < BatonDeployment overrides."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from typing import Any, Mapping

import pytest

# The sidecar's own parser: the operator<->sidecar contract. A hard import: never skipped.
from baton_sidecar import config as sidecar_config

from baton_operator.config import OperatorConfig
from crd_schema import load_crds
from operator_testlib import CRD_DIR, ROOT
from baton_operator.policy import (DEFAULT_POLICY, deep_merge, effective_policy, policy_from_spec, policy_hash,
                                   select_policy)

NAMESPACE_POLICY = {
    "preemption": {"mode": "recompute", "maxPreemptionsPerRequest": 2, "agingSeconds": 10,
                   "slaClasses": {"premium": {"priority": -5, "ttftMs": 300}, "batch": None}},
    "padding": {"bucketing": True, "maxPaddingRatio": 0.8},
    "prefill": {"mode": "separate", "maxStepMs": 120},
}


def test_policy_from_spec_translates_camel_case_to_the_config_shape() -> None:
    assert policy_from_spec(NAMESPACE_POLICY) == {
        "preemption": {"mode": "recompute", "max_preemptions_per_request": 2},
        "aging_s": 10,
        "sla_classes": {"premium": {"priority": -5, "ttft_ms": 300}, "batch": None},
        "padding": {"bucketing": True, "max_padding_ratio": 0.8},
        "prefill": {"mode": "separate"},
        "max_step_ms": 120,  # prefill.maxStepMs: the sidecar keeps it at the top level
    }
    assert policy_from_spec(None) == {} and policy_from_spec({}) == {}
    assert policy_from_spec({"prefill": {"maxStepMs": None}}) == {}


def test_layers_apply_in_order_and_only_what_each_sets() -> None:
    deployment_spec = {"policy": {"padding": {"maxPaddingRatio": 0.6}, "preemption": {"mode": "off"},
                                  "prefill": {"budget": "tokens"}},
                       "engine": {"limits": {"maxBatchSize": 8}}}
    policy = effective_policy(DEFAULT_POLICY, NAMESPACE_POLICY, deployment_spec)
    assert policy["preemption"] == {"mode": "off", "max_preemptions_per_request": 2}  # deployment > namespace
    assert policy["padding"] == {"compaction_threshold": 0.25, "max_padding_ratio": 0.6, "bucketing": True}
    assert policy["aging_s"] == 10
    assert policy["prefill"] == {"budget": "tokens", "mode": "separate"} and policy["max_step_ms"] == 120
    assert policy["limits"] == {**DEFAULT_POLICY["limits"], "max_batch_size": 8}
    # SLA classes merge by name; null removes an inherited class.
    assert set(policy["sla_classes"]) == {"interactive", "premium"}
    assert policy["sla_classes"]["interactive"] == DEFAULT_POLICY["sla_classes"]["interactive"]


def test_engine_limits_override_policy_limits() -> None:
    spec = {"policy": {"limits": {"maxQueue": 10, "maxBatchSize": 4}}, "engine": {"limits": {"maxBatchSize": 16}}}
    limits = effective_policy(DEFAULT_POLICY, {"limits": {"maxQueue": 99}}, spec)["limits"]
    assert limits["max_queue"] == 10 and limits["max_batch_size"] == 16


def test_merge_leaves_its_inputs_alone() -> None:
    defaults, namespace = copy.deepcopy(DEFAULT_POLICY), copy.deepcopy(NAMESPACE_POLICY)
    effective_policy(defaults, namespace, {"policy": NAMESPACE_POLICY})
    assert defaults == DEFAULT_POLICY and namespace == NAMESPACE_POLICY
    base = {"a": {"b": 1}}
    merged = deep_merge(base, {"a": {"c": 2}})
    merged["a"]["b"] = 5
    assert base == {"a": {"b": 1}}


def test_no_layers_give_the_defaults() -> None:
    assert effective_policy(DEFAULT_POLICY, None, {}) == DEFAULT_POLICY


def test_hash_is_stable_across_key_order_number_spelling_and_processes() -> None:
    a = {"padding": {"bucketing": True, "max_padding_ratio": 1}, "aging_s": 30.0}
    b = {"aging_s": 30, "padding": {"max_padding_ratio": 1.0, "bucketing": True}}
    assert policy_hash(a) == policy_hash(b)
    assert len(policy_hash(a)) == 16
    assert policy_hash(a) != policy_hash({**a, "aging_s": 31})
    code = ("import sys; sys.path.insert(0, 'operator'); from baton_operator.policy import policy_hash; "
            "print(policy_hash({'aging_s': 30, 'padding': {'max_padding_ratio': 1.0, 'bucketing': True}}))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=ROOT)
    assert other.stdout.strip() == policy_hash(a)


@pytest.mark.parametrize("policies, requested, chosen, problem", [
    ({}, None, None, False),
    ({"only": {"a": 1}}, None, "only", False),
    ({"default": {}, "other": {}}, None, "default", False),
    ({"b": {}, "a": {}}, None, "a", True),  # ambiguous: first by name, reported
    ({"a": {}, "b": {}}, "b", "b", False),
    ({"a": {}}, "missing", None, True),  # dangling reference: defaults, reported
])
def test_select_policy(policies, requested, chosen, problem) -> None:
    choice = select_policy(policies, requested)
    assert choice.name == chosen
    assert (choice.problem is not None) == problem
    assert choice.spec == (policies.get(chosen) if chosen else None)


def test_defaults_match_the_sidecars_own() -> None:
    """The operator's built-in layer equals baton_sidecar.config.PolicyConfig() and parses there."""
    assert sidecar_config.PolicyConfig.from_dict(DEFAULT_POLICY).to_dict() == sidecar_config.PolicyConfig().to_dict()
    # Fields whose default is None are left out of DEFAULT_POLICY (as the sidecar's docs do).
    assert sidecar_config.PolicyConfig().to_dict() == {"max_step_ms": None, **DEFAULT_POLICY, "sla_classes": {
        name: {"priority": 0, "ttft_ms": None, "tpot_ms": None, "e2e_ms": None, **cls}
        for name, cls in DEFAULT_POLICY["sla_classes"].items()}}


def test_every_merge_result_parses_in_the_sidecar() -> None:
    spec = {"policy": NAMESPACE_POLICY, "engine": {"limits": {"maxKvTokens": 4096, "maxPrefillTokens": 512}}}
    parsed = sidecar_config.PolicyConfig.from_dict(effective_policy(DEFAULT_POLICY, NAMESPACE_POLICY, spec))
    assert parsed.preemption.mode == "recompute" and parsed.limits.max_kv_tokens == 4096
    assert set(parsed.sla_classes) == {"interactive", "premium"}
    assert parsed.prefill == sidecar_config.PrefillPolicy(budget="time", mode="separate")
    assert parsed.step_target_ms == 120


# Every BatonPolicy field, each set to a valid value other than the sidecar's default.
FULL_SPEC = {
    "preemption": {"mode": "recompute", "maxPreemptionsPerRequest": 1, "agingSeconds": 5,
                   "slaClasses": {"interactive": {"priority": 1, "ttftMs": 500, "tpotMs": 50, "e2eMs": 9000},
                                  "batch": None}},
    "padding": {"compactionThreshold": 0.1, "maxPaddingRatio": 0.5, "bucketing": True},
    "limits": {"maxBatchSize": 4, "maxKvTokens": 1024, "maxQueue": 8, "maxPrefillTokens": 64},
    "prefill": {"budget": "tokens", "mode": "separate", "maxStepMs": 80},
}


def _schema_fields(schema: dict, prefix: str = "") -> set[str]:
    """Leaf field paths of an OpenAPI schema; a map's keys are spelled ``*``."""
    fields = set()
    for name, sub in schema.get("properties", {}).items():
        if "properties" in sub:
            fields |= _schema_fields(sub, f"{prefix}{name}.")
        elif isinstance(sub.get("additionalProperties"), dict):
            fields |= _schema_fields(sub["additionalProperties"], f"{prefix}{name}.*.")
        else:
            fields.add(prefix + name)
    return fields


def _leaves(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Leaf values of nested mappings by dotted path."""
    out = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_every_crd_field_reaches_its_own_sidecar_field() -> None:
    """The BatonPolicy schema, the translation and the sidecar's PolicyConfig cover the same fields."""
    crd = load_crds(CRD_DIR)["BatonPolicy"]
    given = {re.sub(r"^preemption\.slaClasses\.[^.]+\.", "preemption.slaClasses.*.", path)
             for path, value in _leaves(FULL_SPEC).items() if value is not None}
    assert _schema_fields(crd.openapi["properties"]["spec"]) == given
    assert crd.errors({"apiVersion": crd.api_version, "kind": crd.kind, "metadata": {"name": "p"},
                       "spec": FULL_SPEC}) == []
    parsed = _leaves(sidecar_config.PolicyConfig.from_dict(
        deep_merge(DEFAULT_POLICY, policy_from_spec(FULL_SPEC))).to_dict())
    unchanged = sorted(path for path, value in _leaves(sidecar_config.PolicyConfig().to_dict()).items()
                       if parsed.get(path, ...) == value)
    assert unchanged == [], f"no BatonPolicy field sets {unchanged}"


def test_operator_config_reads_a_default_policy_file(tmp_path) -> None:
    path = tmp_path / "defaults.yaml"
    path.write_text("padding: {bucketing: true}\nlimits: {max_queue: 7}\n"
                    "prefill: {mode: separate}\nmax_step_ms: 90\n")
    cfg = OperatorConfig.from_env({"BATON_DEFAULT_POLICY_FILE": str(path), "BATON_SIDECAR_IMAGE": "img:1"})
    assert cfg.sidecar_image == "img:1"
    assert cfg.default_policy["padding"]["bucketing"] is True
    assert cfg.default_policy["limits"]["max_queue"] == 7
    assert cfg.default_policy["limits"]["max_batch_size"] == DEFAULT_POLICY["limits"]["max_batch_size"]
    assert cfg.default_policy["prefill"] == {"budget": "time", "mode": "separate"}
    assert sidecar_config.PolicyConfig.from_dict(cfg.default_policy).step_target_ms == 90
    path.write_text("- not a mapping\n")
    with pytest.raises(ValueError, match="BATON_DEFAULT_POLICY_FILE"):
        OperatorConfig.from_env({"BATON_DEFAULT_POLICY_FILE": str(path)})
    with pytest.raises(ValueError, match="BATON_SIDECAR_PULL_POLICY"):
        OperatorConfig.from_env({"BATON_SIDECAR_PULL_POLICY": "Sometimes"})
