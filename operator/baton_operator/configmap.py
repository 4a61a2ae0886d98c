"""The sidecars' ConfigMap, ``<name>-baton-config``: the ``baton.yaml`` they read (``policy:`` and
``router:``, exactly the shape of docs/config.md), Baton's traffic weight in it, and the merge patch the
rollout controller writes the weight with.

All pure. The reconciler builds the whole ConfigMap (``desired_config_map``); while ``spec.rollout`` is
set it keeps the weight it finds (``desired_weight``), which only the rollout controller changes
(``config_map_weight_patch``, keeping the last-applied record in step so the reconciler sees nothing
to undo). Sidecars pick a new file up without a restart.
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
    what the ConfigMap holds, starting from the first step. Otherwise ``spec.router.weight`` (default 0:
    the incumbent keeps all traffic until someone raises it).
    """
    if incumbent_url is None:
        return 100
    rollout = spec.get("rollout")
    if rollout:
        if current is not None:
            return current
        steps = rollout.get("steps") or [0]
        return steps[0]
    return (spec.get("router") or {}).get("weight", 0)


def router_config(spec: Mapping[str, Any], incumbent_url: str | None, weight: float) -> dict[str, Any]:
    router = spec.get("router") or {}
    out: dict[str, Any] = {"incumbent_url": incumbent_url, "baton_weight": weight}
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


def desired_config_map(bd: Mapping[str, Any], config: Mapping[str, Any], policy_hash: str) -> dict[str, Any]:
    return stamped({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(bd, config_map_name(bd["metadata"]["name"]), {ANN_POLICY_HASH: policy_hash}),
        "data": {CONFIG_KEY: render_config(config)},
    })


def config_map_weight_patch(config_map: Mapping[str, Any], weight: float) -> dict[str, Any]:
    """Merge patch setting ``router.baton_weight`` in the ConfigMap's ``baton.yaml``, leaving the rest as
    it is, conditional on the observed resourceVersion (the rollout controller's write). The last-applied
    record follows, so the reconciler, which keeps the weight it finds while ``spec.rollout`` is set,
    sees nothing to undo."""
    config = parse_config(config_map)
    config["router"] = {**(config.get("router") or {}), "baton_weight": weight}
    data = {CONFIG_KEY: render_config(config)}
    record = {**last_applied(config_map), "data": data}
    meta = config_map.get("metadata") or {}
    patch_meta: dict[str, Any] = {"annotations": {ANN_LAST_APPLIED: canonical_json(record)}}
    if meta.get("resourceVersion"):
        patch_meta["resourceVersion"] = meta["resourceVersion"]
    return {"metadata": patch_meta, "data": data}
