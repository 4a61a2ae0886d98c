"""The operator's own settings, read once from the environment at start-up."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from baton_operator.policy import DEFAULT_POLICY, deep_merge

DEFAULT_SIDECAR_IMAGE = "ghcr.io/baton-project/baton-sidecar:0.1.0"
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
# The Baton container's resources when a BatonDeployment sets none: enough for the embedded default model
# on CPU. No CPU limit: CFS quota throttling stalls decode steps (docs/security.md, "Reasoned skips").
DEFAULT_SIDECAR_RESOURCES: Mapping[str, Any] = {"requests": {"cpu": "1", "memory": "2Gi"},
                                                "limits": {"memory": "4Gi"}}


def default_pull_policy(image: str) -> str:
    """A digest never changes: ``IfNotPresent``. A tag may move to another image: ``Always`` (a registry
    round trip per pod start, which also re-checks the pod's pull credentials)."""
    return "IfNotPresent" if "@sha256:" in image else "Always"


@dataclass(frozen=True)
class OperatorConfig:
    sidecar_image: str = DEFAULT_SIDECAR_IMAGE  # used when a BatonDeployment names no image
    image_pull_policy: str = ""  # "": by the image (default_pull_policy)
    # The Baton container's requests and limits when a BatonDeployment sets none ({}: none at all).
    sidecar_resources: Mapping[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_SIDECAR_RESOURCES))
    default_policy: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_POLICY))  # config shape
    rollout_poll_s: float = 10.0  # how often a sidecar rollout that has not finished is re-checked
    rollout_tick_s: float = 5.0  # how often the rollout controller looks at each progressive rollout
    report_timeout_s: float = 10.0  # for one sidecar's /baton/ab/report or /baton/metrics
    allow_report_urls: bool = False  # honour the baton.dev/report-urls annotation (else: pod IPs only)
    default_quantization: str | None = None  # engine.quantization for BatonDeployments that set none
    prometheus_address: str | None = None  # KEDA triggers' Prometheus, unless spec.autoscaling names one

    def __post_init__(self) -> None:
        if not self.sidecar_image:
            raise ValueError("BATON_SIDECAR_IMAGE: must not be empty")
        if self.image_pull_policy not in ("", *PULL_POLICIES):
            raise ValueError(f"BATON_SIDECAR_PULL_POLICY: must be one of {PULL_POLICIES}, or empty")
        if not isinstance(self.sidecar_resources, Mapping) or set(self.sidecar_resources) - {"requests", "limits"}:
            raise ValueError("BATON_SIDECAR_RESOURCES: must be a mapping of requests and limits")
        if not self.rollout_poll_s > 0:
            raise ValueError("BATON_ROLLOUT_POLL_SECONDS: must be > 0")
        if not self.rollout_tick_s > 0:
            raise ValueError("BATON_ROLLOUT_TICK_SECONDS: must be > 0")
        if not self.report_timeout_s > 0:
            raise ValueError("BATON_ROLLOUT_REPORT_TIMEOUT_SECONDS: must be > 0")
        if self.default_quantization not in (None, "none", "int8"):
            raise ValueError("BATON_DEFAULT_QUANTIZATION: must be none or int8")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "OperatorConfig":
        """``BATON_DEFAULT_POLICY_FILE`` names a YAML file in the ``policy:`` shape of ``docs/config.md``;
        it is merged over the sidecar's built-in defaults and forms the lowest layer of every policy."""
        env = os.environ if env is None else env
        default_policy: Mapping[str, Any] = DEFAULT_POLICY
        if path := env.get("BATON_DEFAULT_POLICY_FILE"):
            with open(path, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle) or {}
            if not isinstance(loaded, Mapping):
                raise ValueError(f"BATON_DEFAULT_POLICY_FILE: {path} must hold a mapping")
            default_policy = deep_merge(DEFAULT_POLICY, loaded)
        return cls(
            sidecar_image=env.get("BATON_SIDECAR_IMAGE", DEFAULT_SIDECAR_IMAGE),
            image_pull_policy=env.get("BATON_SIDECAR_PULL_POLICY", ""),
            sidecar_resources=_json_env(env, "BATON_SIDECAR_RESOURCES", DEFAULT_SIDECAR_RESOURCES),
            default_policy=default_policy,
            rollout_poll_s=float(env.get("BATON_ROLLOUT_POLL_SECONDS", "10")),
            rollout_tick_s=float(env.get("BATON_ROLLOUT_TICK_SECONDS", "5")),
            report_timeout_s=float(env.get("BATON_ROLLOUT_REPORT_TIMEOUT_SECONDS", "10")),
            allow_report_urls=env.get("BATON_ROLLOUT_ALLOW_REPORT_URLS", "").lower() in ("1", "true", "yes"),
            default_quantization=env.get("BATON_DEFAULT_QUANTIZATION") or None,
            prometheus_address=env.get("BATON_PROMETHEUS_ADDRESS") or None,
        )


def _json_env(env: Mapping[str, str], name: str, default: Any) -> Any:
    """``env[name]`` parsed as JSON; a copy of ``default`` when unset or empty."""
    if not env.get(name):
        return copy.deepcopy(default)
    try:
        return json.loads(env[name])
    except ValueError as exc:
        raise ValueError(f"{name}: not JSON ({exc})") from exc
