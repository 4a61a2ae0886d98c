"""Config parsing: every refusal names the field as the user wrote it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from baton_sidecar.config import PolicyConfig, PrefillPolicy, RouterConfig


@pytest.mark.parametrize("data,field", [
    ({"limits": 3}, "limits"),
    ({"limits": {"max_batch_size": 0}}, "limits.max_batch_size"),
    ({"limits": {"bogus": 1}}, "limits.bogus"),
    ({"preemption": {"mode": "pause"}}, "preemption.mode"),
    ({"padding": {"max_padding_ratio": 1.5}}, "padding.max_padding_ratio"),
    ({"sla_classes": {"gold": {"priority": "high"}}}, "sla_classes.gold.priority"),
    ({"sla_classes": {"gold": {"ttft_ms": -1}}}, "sla_classes.gold.ttft_ms"),
    ({"aging_s": 0}, "aging_s"),
    ({"prefill": "fused"}, "prefill"),
    ({"prefill": {"mode": "chunked"}}, "prefill.mode"),
    ({"prefill": {"budget": "latency"}}, "prefill.budget"),
    ({"prefill": {"max_step_ms": 50}}, "prefill.max_step_ms"),  # a top-level field, not prefill's
    ({"max_step_ms": 0}, "max_step_ms"),
    ({"max_step_ms": -5.0}, "max_step_ms"),
    ({"max_step_ms": True}, "max_step_ms"),
    ({"max_step_ms": "50ms"}, "max_step_ms"),
    ({"surprise": 1}, "surprise"),
])
def test_policy_errors_name_the_field(data, field):
    with pytest.raises(ValueError) as info:
        PolicyConfig.from_dict(data)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


@pytest.mark.parametrize("data,field", [
    ({"baton_weight": 101}, "router.baton_weight"),
    ({"baton_weight": True}, "router.baton_weight"),
    ({"incumbent_url": "ftp://x"}, "router.incumbent_url"),
    ({"fallback_to_baton": "yes"}, "router.fallback_to_baton"),
    ({"incumbent_timeout_s": 0}, "router.incumbent_timeout_s"),
    ({"sticky_header": ""}, "router.sticky_header"),
])
def test_router_errors_name_the_field(data, field):
    with pytest.raises(ValueError) as info:
        RouterConfig.from_dict(data)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


def test_round_trip_of_a_full_policy():
    policy = PolicyConfig.from_dict({
        "preemption": {"mode": "recompute", "max_preemptions_per_request": 2},
        "padding": {"compaction_threshold": 0.3, "max_padding_ratio": 0.6, "bucketing": True},
        "sla_classes": {"interactive": {"priority": 0, "ttft_ms": 500}},
        "aging_s": 12, "limits": {"max_batch_size": 8},
        "prefill": {"budget": "tokens", "mode": "separate"}, "max_step_ms": 80,
    })
    assert PolicyConfig.from_dict(policy.to_dict()) == policy
    assert policy.limits.max_batch_size == 8 and policy.sla_classes["interactive"].ttft_ms == 500
    assert policy.prefill == PrefillPolicy(budget="tokens", mode="separate") and policy.max_step_ms == 80


def test_step_target_is_max_step_ms_else_the_interactive_tpot():
    assert PolicyConfig().prefill == PrefillPolicy(budget="time", mode="fused")
    assert PolicyConfig().max_step_ms is None and PolicyConfig().step_target_ms == 200.0
    assert PolicyConfig.from_dict({"max_step_ms": 75}).step_target_ms == 75.0
    tight = {"interactive": {"priority": 0, "tpot_ms": 40}}
    assert PolicyConfig.from_dict({"sla_classes": tight}).step_target_ms == 40.0
    assert PolicyConfig.from_dict({"sla_classes": tight, "max_step_ms": 90}).step_target_ms == 90.0
    assert PolicyConfig.from_dict({"sla_classes": {"batch": {"priority": 10}}}).step_target_ms is None


def test_the_reference_in_docs_config_md_parses_and_shows_the_defaults():
    text = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    (block,) = re.findall(r"```yaml\n(policy:.*?)```", text, re.DOTALL)
    doc = yaml.safe_load(block)
    RouterConfig.from_dict(doc["router"])
    # Every policy field is shown at its default, except max_step_ms (default null), shown set.
    assert PolicyConfig.from_dict(doc["policy"]) == dataclasses.replace(PolicyConfig(), max_step_ms=150)
    assert set(doc["policy"]) == {f.name for f in dataclasses.fields(PolicyConfig)}
