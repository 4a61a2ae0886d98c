"""Effective policy: operator defaults < the namespace's BatonPolicy < the BatonDeployment's overrides.

Everything here is pure. The custom resources spell fields in camelCase; the sidecar's config file
(``docs/config.md``) spells them in snake_case. ``policy_from_spec`` translates one into the other, so
the merge itself works on a single shape: the ``policy:`` section of ``baton.yaml``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

# The sidecar's own defaults (baton_sidecar.config.PolicyConfig); a test keeps the two in step.
DEFAULT_POLICY: dict[str, Any] = {
    "preemption": {"mode": "swap", "max_preemptions_per_request": 4},
    "padding": {"compaction_threshold": 0.25, "max_padding_ratio": 0.9, "bucketing": False},
    "sla_classes": {
        "interactive": {"priority": 0, "ttft_ms": 1000.0, "tpot_ms": 200.0},
        "batch": {"priority": 10},
    },
    "aging_s": 30.0,
    "limits": {"max_batch_size": 32, "max_kv_tokens": 65536, "max_queue": 256, "max_prefill_tokens": 512},
    "prefill": {"budget": "time", "mode": "fused"},
    # max_step_ms is left out like the classes' unset targets (None: the "interactive" class's tpot_ms).
}

# camelCase (custom resource) -> snake_case (baton.yaml), per section.
_PREEMPTION_KEYS = {"mode": "mode", "maxPreemptionsPerRequest": "max_preemptions_per_request"}
_PADDING_KEYS = {"compactionThreshold": "compaction_threshold", "maxPaddingRatio": "max_padding_ratio",
                 "bucketing": "bucketing"}
_SLA_KEYS = {"priority": "priority", "ttftMs": "ttft_ms", "tpotMs": "tpot_ms", "e2eMs": "e2e_ms"}
_LIMIT_KEYS = {"maxBatchSize": "max_batch_size", "maxKvTokens": "max_kv_tokens", "maxQueue": "max_queue",
               "maxPrefillTokens": "max_prefill_tokens"}
_PREFILL_KEYS = {"budget": "budget", "mode": "mode"}


def _rename(data: Mapping[str, Any] | None, keys: Mapping[str, str]) -> dict[str, Any]:
    return {keys[k]: v for k, v in (data or {}).items() if k in keys and v is not None}


def policy_from_spec(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """Translate a policy spec (BatonPolicy ``spec`` or BatonDeployment ``spec.policy``) to config shape.

    Only the fields present in ``spec`` appear in the result, so it can act as an override layer.
    ``preemption.slaClasses``, ``preemption.agingSeconds`` and ``prefill.maxStepMs`` land at the config's
    top level, where the sidecar keeps them; a class given as ``null`` removes that class from the lower
    layers.
    """
    spec = spec or {}
    out: dict[str, Any] = {}
    preemption = spec.get("preemption") or {}
    if section := _rename(preemption, _PREEMPTION_KEYS):
        out["preemption"] = section
    if "slaClasses" in preemption and preemption["slaClasses"] is not None:
        out["sla_classes"] = {
            name: (None if cls is None else _rename(cls, _SLA_KEYS))
            for name, cls in preemption["slaClasses"].items()
        }
    if preemption.get("agingSeconds") is not None:
        out["aging_s"] = preemption["agingSeconds"]
    if section := _rename(spec.get("padding"), _PADDING_KEYS):
        out["padding"] = section
    if section := _rename(spec.get("limits"), _LIMIT_KEYS):
        out["limits"] = section
    prefill = spec.get("prefill") or {}
    if section := _rename(prefill, _PREFILL_KEYS):
        out["prefill"] = section
    if prefill.get("maxStepMs") is not None:
        out["max_step_ms"] = prefill["maxStepMs"]
    return out


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else in ``override`` replaces; ``None`` deletes the key."""
    result = copy.deepcopy(dict(base))
    for key, value in override.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def effective_policy(
    defaults: Mapping[str, Any],
    namespace_policy: Mapping[str, Any] | None,
    deployment_spec: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``policy:`` section for one BatonDeployment's sidecars.

    ``defaults`` is already in config shape; ``namespace_policy`` is a BatonPolicy ``spec`` (or None);
    the BatonDeployment contributes ``spec.policy`` and, above that, ``spec.engine.limits``.
    """
    layers = [
        policy_from_spec(namespace_policy),
        policy_from_spec(deployment_spec.get("policy")),
        policy_from_spec({"limits": (deployment_spec.get("engine") or {}).get("limits")}),
    ]
    merged = copy.deepcopy(dict(defaults))
    for layer in layers:
        merged = deep_merge(merged, layer)
    return merged


def policy_hash(policy: Mapping[str, Any]) -> str:
    """Stable across processes and key order: sha256 of canonical JSON, 16 hex digits.

    Integral floats are folded to ints first, so ``0.5``/``1`` and ``0.5``/``1.0`` hash alike
    (YAML and JSON round trips may turn one into the other).
    """
    canonical = json.dumps(_canonical(policy), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


@dataclass(frozen=True)
class PolicyChoice:
    """Which BatonPolicy of a namespace applies; ``problem`` explains a fallback, if any."""

    name: str | None
    spec: Mapping[str, Any] | None
    problem: str | None = None


def select_policy(policies: Mapping[str, Mapping[str, Any]], requested: str | None) -> PolicyChoice:
    """Pick the BatonPolicy for a BatonDeployment from ``{name: spec}`` of its namespace.

    ``spec.policyRef.name`` picks by name. Without it: the only policy, else the one named ``default``,
    else the first by name, reported as a problem. A missing referenced policy falls back to the
    operator defaults (also reported), so a policy created later takes effect on its own.
    """
    if requested:
        if requested in policies:
            return PolicyChoice(requested, policies[requested])
        return PolicyChoice(None, None, f"BatonPolicy {requested!r} not found; using operator defaults")
    if not policies:
        return PolicyChoice(None, None)
    if len(policies) == 1:
        (name, spec), = policies.items()
        return PolicyChoice(name, spec)
    if "default" in policies:
        return PolicyChoice("default", policies["default"])
    name = sorted(policies)[0]
    return PolicyChoice(name, policies[name],
                        f"{len(policies)} BatonPolicies in the namespace and none named 'default'; "
                        f"using {name!r} (set spec.policyRef.name to choose)")
