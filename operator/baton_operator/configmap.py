"""The sidecars' ConfigMap, ``<name>-baton-config``: the ``baton.yaml`` they read (``policy:`` and
``router:``, exactly the shape of docs/config.md), Baton's traffic shares in it (``baton_weight`` and
``shadow_percent``), and the merge patch the rollout controller writes them with.

All pure. The reconciler builds the whole ConfigMap (``desired_config_map``); while ``spec.rollout`` is
set it keeps the shares it finds (``desired_weight``, ``desired_shadow``), which only the rollout
controller changes (``config_map_traffic_patch``, keeping the last-applied record in step so the
reconciler sees nothing to undo). Sidecars pick a new file up without a restart.

``shadow_percent`` is written only while above 0; 0 is the key left out (the sidecar's default), so the
file of a deployment that never shadows is byte for byte what it was, and sidecars that predate shadow
mode (which refuse unknown keys) read it as before.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import yaml

from baton_operator.resources import (ANN_LAST_APPLIED, ANN_POLICY_HASH, CONFIG_KEY, canonical_json, child_metadata,
                                      config_map_name, last_applied, stamped)


def desired_weight(spec: Mapping[str, Any], incumbent_url: str | None, current: float | None) -> float:
    """Percent of traffic for Baton.

    No incumbent: 100. With ``spec.rollout`` the rollout controller owns the weight (issue 7): keep
    what the ConfigMap holds, starting from the first step (0 with a shadow stage, which comes first).
    Otherwise ``spec.router.weight`` (default 0: the incumbent keeps all traffic until someone raises it).
    """
    if incumbent_url is None:
        return 100
    rollout = spec.get("rollout")
    if rollout:
        if current is not None:
            return current
        steps = rollout.get("steps") or [0]
        return 0 if rollout.get("shadow") is not None else steps[0]
    return (spec.get("router") or {}).get("weight", 0)


def desired_shadow(spec: Mapping[str, Any], incumbent_url: str | None, current: float) -> float:
    """Percent of the incumbent's requests mirrored to Baton: with ``spec.rollout`` the rollout controller's
    (keep what the ConfigMap holds), else ``spec.router.shadowPercent`` (default 0); none without an
    incumbent."""
    if incumbent_url is None:
        return 0
    if spec.get("rollout"):
        return current
    return (spec.get("router") or {}).get("shadowPercent", 0)


def router_config(spec: Mapping[str, Any], incumbent_url: str | None, weight: float,
                  shadow_percent: float = 0) -> dict[str, Any]:
    router = spec.get("router") or {}
    out: dict[str, Any] = {"incumbent_url": incumbent_url, "baton_weight": weight}
    if shadow_percent:
        out["shadow_percent"] = shadow_percent
    for camel, snake in (("stickyHeader", "sticky_header"), ("fallbackToBaton", "fallback_to_baton"),
                         ("incumbentTimeoutSeconds", "incumbent_timeout_s")):
        if router.get(camel) is not None:
            out[snake] = router[camel]
    return out


def sidecar_config(policy: Mapping[str, Any], router: Mapping[str, Any]) -> dict[str, Any]:
    """The document in ``baton.yaml``: exactly the shape of ``docs/config.md``."""
    return {"policy": copy.deepcopy(dict(policy)), "router": dict(router)}


def render_config(config: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(config), sort_keys=True, default_flow_style=False)


def parse_config(config_map: Mapping[str, Any] | None) -> dict[str, Any]:
    """The sidecar config held by an observed ConfigMap ({} when absent or unreadable)."""
    if not config_map:
        return {}
    try:
        loaded = yaml.safe_load((config_map.get("data") or {}).get(CONFIG_KEY) or "") or {}
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def config_weight(config_map: Mapping[str, Any] | None) -> float | None:
    """Baton's share of traffic in an observed ConfigMap (``router.baton_weight``); None if unset."""
    return (parse_config(config_map).get("router") or {}).get("baton_weight")


def config_shadow(config_map: Mapping[str, Any] | None) -> float:
    """The share of the incumbent's requests mirrored to Baton in an observed ConfigMap (absent: 0)."""
    return (parse_config(config_map).get("router") or {}).get("shadow_percent") or 0


def desired_config_map(bd: Mapping[str, Any], config: Mapping[str, Any], policy_hash: str) -> dict[str, Any]:
    return stamped({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(bd, config_map_name(bd["metadata"]["name"]), {ANN_POLICY_HASH: policy_hash}),
        "data": {CONFIG_KEY: render_config(config)},
    })


def config_map_traffic_patch(config_map: Mapping[str, Any], weight: float, shadow_percent: float = 0
                             ) -> dict[str, Any]:
    """Merge patch setting ``router.baton_weight`` and ``router.shadow_percent`` (left out at 0) in the
    ConfigMap's ``baton.yaml``, leaving the rest as it is, conditional on the observed resourceVersion
    (the rollout controller's write). The last-applied record follows, so the reconciler, which keeps the
    shares it finds while ``spec.rollout`` is set, sees nothing to undo."""
    config = parse_config(config_map)
    router = {k: v for k, v in (config.get("router") or {}).items() if k != "shadow_percent"}
    router["baton_weight"] = weight
    if shadow_percent:
        router["shadow_percent"] = shadow_percent
    config["router"] = router
    data = {CONFIG_KEY: render_config(config)}
    record = {**last_applied(config_map), "data": data}
    meta = config_map.get("metadata") or {}
    patch_meta: dict[str, Any] = {"annotations": {ANN_LAST_APPLIED: canonical_json(record)}}
    if meta.get("resourceVersion"):
        patch_meta["resourceVersion"] = meta["resourceVersion"]
    return {"metadata": patch_meta, "data": data}
