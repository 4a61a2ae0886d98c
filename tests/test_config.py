"""Config parsing: every refusal names the field as the user wrote it."""

from __future__ import annotations

import pytest

from baton_sidecar.config import PolicyConfig, RouterConfig


@pytest.mark.parametrize("data,field", [
    ({"limits": 3}, "limits"),
    ({"limits": {"max_batch_size": 0}}, "limits.max_batch_size"),
    ({"limits": {"bogus": 1}}, "limits.bogus"),
    ({"preemption": {"mode": "pause"}}, "preemption.mode"),
    ({"padding": {"max_padding_ratio": 1.5}}, "padding.max_padding_ratio"),
    ({"sla_classes": {"gold": {"priority": "high"}}}, "sla_classes.gold.priority"),
    ({"sla_classes": {"gold": {"ttft_ms": -1}}}, "sla_classes.gold.ttft_ms"),
    ({"aging_s": 0}, "aging_s"),
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
    })
    assert PolicyConfig.from_dict(policy.to_dict()) == policy
    assert policy.limits.max_batch_size == 8 and policy.sla_classes["interactive"].ttft_ms == 500
