"""Sidecar mode: the JSON patches that put the Baton container into a user's Deployment and route its
Service through it (``injection_patch``, ``repoint_patch``), and the ones that undo both
(``removal_patch``, ``restore_patch``).

All pure: plain dicts in (the BatonDeployment, the observed Deployment or Service), RFC 6902 operation
lists out. These objects are the user's, so every positional change is guarded by a ``test`` op and the
whole patch by the observed ``resourceVersion`` (``_guarded``): a concurrent edit makes the API answer
409/422 instead of the patch clobbering someone else's change. An empty list means nothing to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from baton_operator.config import OperatorConfig
from baton_operator.policy import policy_hash as content_hash
from baton_operator.resources import (ANN_INJECTED_BY, ANN_ORIGINAL_TARGET_PORT, ANN_SIDECAR_HASH, BATON_VOLUMES,
                                      CONTAINER_NAME, LABEL_INSTANCE, LABEL_SIDECAR, PORT_NAME, SpecError,
                                      baton_container, baton_port, baton_volumes, is_subset)

POD = "/spec/template/spec"  # a Deployment's pod spec, as a JSON pointer


# --- the target Deployment ----------------------------------------------------------------------

def _pod_spec(deployment: Mapping[str, Any]) -> Mapping[str, Any]:
    return ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}


def find_container(deployment: Mapping[str, Any], name: str = CONTAINER_NAME) -> int | None:
    for index, container in enumerate(_pod_spec(deployment).get("containers") or []):
        if container.get("name") == name:
            return index
    return None


def injected_by(deployment: Mapping[str, Any]) -> str | None:
    return ((deployment.get("metadata") or {}).get("annotations") or {}).get(ANN_INJECTED_BY)


def check_target(deployment: Mapping[str, Any], bd: Mapping[str, Any]) -> None:
    """Refuse targets Baton cannot join without breaking them (raises SpecError)."""
    spec = bd.get("spec") or {}
    name = bd["metadata"]["name"]
    owner = injected_by(deployment)
    if owner is not None and owner != name:
        raise SpecError("spec.targetDeployment",
                        f"Deployment {deployment['metadata']['name']!r} already carries the Baton sidecar "
                        f"of BatonDeployment {owner!r}")
    pod = _pod_spec(deployment)
    others = [c for c in pod.get("containers") or [] if c.get("name") != CONTAINER_NAME]
    if owner is None and len(others) != len(pod.get("containers") or []):
        raise SpecError("spec.targetDeployment",
                        f"Deployment {deployment['metadata']['name']!r} already has a container named "
                        f"{CONTAINER_NAME!r} that Baton did not inject")
    port = baton_port(spec)
    for container in others:
        for declared in container.get("ports") or []:
            if declared.get("containerPort") == port:
                raise SpecError("spec.port", f"port {port} is already used by container "
                                             f"{container.get('name')!r}; choose another spec.port")
            if declared.get("name") == PORT_NAME:
                raise SpecError("spec.targetDeployment",
                                f"container {container.get('name')!r} already declares port name {PORT_NAME!r}")
    for volume in pod.get("volumes") or []:
        if owner is None and volume.get("name") in BATON_VOLUMES:
            raise SpecError("spec.targetDeployment", f"the pod already has a volume named {volume['name']!r}")


def injection_patch(deployment: Mapping[str, Any], bd: Mapping[str, Any], cfg: OperatorConfig) -> list[dict]:
    """JSON patch adding (or updating) the Baton container and its volumes; [] when already in place.

    The container is replaced whole and Baton's volumes are re-added whole whenever what the operator
    wants differs from what it recorded (``baton.dev/sidecar-hash``) or from what is there (drift), so
    fields removed from the BatonDeployment disappear too. The user's containers and volumes keep their
    order and content.
    """
    name = bd["metadata"]["name"]
    container = baton_container(bd, cfg)
    volumes = baton_volumes(bd)
    digest = content_hash({"container": container, "volumes": volumes})
    stale = ((deployment.get("metadata") or {}).get("annotations") or {}).get(ANN_SIDECAR_HASH) != digest
    ops = _container_ops(deployment, container, stale) + _volume_ops(_pod_spec(deployment), volumes, stale)
    ops += _ensure_map_entry(deployment, "/metadata/labels", LABEL_INSTANCE, name)
    ops += _ensure_map_entry(deployment, "/metadata/annotations", ANN_INJECTED_BY, name)
    if stale:
        ops += _set_map_entry(deployment, ops, "/metadata/annotations", ANN_SIDECAR_HASH, digest)
    ops += _ensure_map_entry(deployment, "/spec/template/metadata/labels", LABEL_SIDECAR, "true")
    return _guarded(deployment, ops)


def removal_patch(deployment: Mapping[str, Any]) -> list[dict[str, Any]]:
    """JSON patch undoing ``injection_patch``: the user's own containers and volumes are untouched."""
    ops: list[dict[str, Any]] = []
    index = find_container(deployment)
    if index is not None:
        ops += _checked(f"{POD}/containers/{index}", CONTAINER_NAME, "remove")
    volumes = _pod_spec(deployment).get("volumes") or []
    ours = [i for i, v in enumerate(volumes) if v.get("name") in BATON_VOLUMES]
    if ours and len(ours) == len(volumes):
        ops.append({"op": "remove", "path": f"{POD}/volumes"})
    else:
        ops += _remove_volumes(volumes, ours)
    ops += _drop_map_entries(deployment, "/metadata/labels", (LABEL_INSTANCE,))
    ops += _drop_map_entries(deployment, "/metadata/annotations", (ANN_INJECTED_BY, ANN_SIDECAR_HASH))
    ops += _drop_map_entries(deployment, "/spec/template/metadata/labels", (LABEL_SIDECAR,))
    return _guarded(deployment, ops)


def _container_ops(deployment: Mapping[str, Any], container: dict[str, Any], stale: bool) -> list[dict[str, Any]]:
    """Add the Baton container, or replace it whole when stale or drifted."""
    index = find_container(deployment)
    if index is None:
        return [{"op": "add", "path": f"{POD}/containers/-", "value": container}]
    if stale or not is_subset(container, _pod_spec(deployment)["containers"][index]):
        return _checked(f"{POD}/containers/{index}", CONTAINER_NAME, "replace", container)
    return []


def _volume_ops(pod: Mapping[str, Any], volumes: list[dict[str, Any]], stale: bool) -> list[dict[str, Any]]:
    """Baton's volumes, re-added whole when stale or drifted; the user's keep their order."""
    present = pod.get("volumes") or []
    ours = {v.get("name"): (i, v) for i, v in enumerate(present) if v.get("name") in BATON_VOLUMES}
    in_place = len(ours) == len(volumes) and all(
        v["name"] in ours and is_subset(v, ours[v["name"]][1]) for v in volumes)
    if not stale and in_place:
        return []
    if "volumes" not in pod:
        return [{"op": "add", "path": f"{POD}/volumes", "value": volumes}]
    if len(ours) == len(present):
        return [{"op": "replace", "path": f"{POD}/volumes", "value": volumes}]
    return (_remove_volumes(present, [i for i, _ in ours.values()])
            + [{"op": "add", "path": f"{POD}/volumes/-", "value": v} for v in volumes])


def _remove_volumes(volumes: list[Mapping[str, Any]], indexes: list[int]) -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = []
    for i in sorted(indexes, reverse=True):  # highest first, so earlier indexes stay valid
        ops += _checked(f"{POD}/volumes/{i}", volumes[i]["name"], "remove")
    return ops


def _checked(item: str, name: str, op: str, value: Any = None) -> list[dict[str, Any]]:
    """``op`` on the list item at ``item``, guarded by a test that it still has the ``name`` observed."""
    change: dict[str, Any] = {"op": op, "path": item}
    if op != "remove":
        change["value"] = value
    return [{"op": "test", "path": f"{item}/name", "value": name}, change]


# --- the target Service ------------------------------------------------------------------------

@dataclass(frozen=True)
class ServiceTarget:
    """The Service port that Baton takes over, and where the incumbent listens inside the pod."""

    index: int  # in spec.ports
    port: int  # the Service port number
    original_target_port: int | str  # as the user wrote it (number or container port name)
    incumbent_port: int  # resolved container port number
    repointed: bool  # the Service already sends this port to Baton


def resolve_service_target(service: Mapping[str, Any], deployment: Mapping[str, Any],
                           bd: Mapping[str, Any]) -> ServiceTarget:
    spec = bd.get("spec") or {}
    svc_name = service["metadata"]["name"]
    selector = (service.get("spec") or {}).get("selector") or {}
    pod_labels = (((deployment.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}
    if not selector or any(pod_labels.get(k) != v for k, v in selector.items()):
        raise SpecError("spec.targetService",
                        f"Service {svc_name!r} does not select the pods of Deployment "
                        f"{deployment['metadata']['name']!r}")
    ports = (service.get("spec") or {}).get("ports") or []
    wanted = spec.get("targetServicePort")
    if wanted is not None:
        matches = [i for i, p in enumerate(ports) if wanted in (p.get("name"), p.get("port"))]
    elif len(ports) == 1:
        matches = [0]
    else:
        matches = [i for i, p in enumerate(ports) if p.get("name") == "http"]
    if len(matches) != 1:
        raise SpecError("spec.targetServicePort",
                        f"cannot tell which port of Service {svc_name!r} to route through Baton; "
                        f"set spec.targetServicePort to its name or number")
    index = matches[0]
    entry = ports[index]
    annotation = ((service.get("metadata") or {}).get("annotations") or {}).get(ANN_ORIGINAL_TARGET_PORT)
    repointed = annotation is not None and entry.get("targetPort") == PORT_NAME
    if repointed:
        original = json.loads(annotation)["targetPort"]
    else:
        original = entry.get("targetPort", entry.get("port"))
    incumbent = _container_port(deployment, original)
    if incumbent is None:
        raise SpecError("spec.targetService",
                        f"Service {svc_name!r} targets port {original!r}, which no container of "
                        f"Deployment {deployment['metadata']['name']!r} declares")
    if incumbent == baton_port(spec):
        raise SpecError("spec.port", f"the incumbent listens on {incumbent}; choose another spec.port")
    return ServiceTarget(index, int(entry.get("port")), original, incumbent, repointed)


def _container_port(deployment: Mapping[str, Any], target: int | str) -> int | None:
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    for container in _pod_spec(deployment).get("containers") or []:
        if container.get("name") == CONTAINER_NAME:
            continue
        for declared in container.get("ports") or []:
            if declared.get("name") == target:
                return int(declared["containerPort"])
    return None


def repoint_patch(service: Mapping[str, Any], target: ServiceTarget, by: str) -> list[dict[str, Any]]:
    """Send the Service port to Baton's named container port, recording the original in an annotation.

    By name, not number: pods still without the sidecar have no ``baton-http`` port and simply leave
    the endpoints, instead of receiving traffic on a port nothing listens on.
    """
    if target.repointed:
        return []
    path = f"/spec/ports/{target.index}"
    record = json.dumps({"by": by, "port": target.port, "targetPort": target.original_target_port},
                        sort_keys=True)
    has_target = "targetPort" in service["spec"]["ports"][target.index]
    ops = [{"op": "test", "path": f"{path}/port", "value": target.port},
           {"op": "replace" if has_target else "add", "path": f"{path}/targetPort", "value": PORT_NAME}]
    ops += _ensure_map_entry(service, "/metadata/annotations", ANN_ORIGINAL_TARGET_PORT, record)
    return _guarded(service, ops)


def restore_patch(service: Mapping[str, Any], by: str) -> list[dict[str, Any]]:
    """Put back the recorded targetPort; [] if the Service carries no record made by ``by``."""
    annotation = ((service.get("metadata") or {}).get("annotations") or {}).get(ANN_ORIGINAL_TARGET_PORT)
    if annotation is None:
        return []
    record = json.loads(annotation)
    if record.get("by") not in (None, by):
        return []
    ops: list[dict[str, Any]] = []
    for index, entry in enumerate((service.get("spec") or {}).get("ports") or []):
        if entry.get("port") == record["port"] and entry.get("targetPort") == PORT_NAME:
            ops += [{"op": "test", "path": f"/spec/ports/{index}/targetPort", "value": PORT_NAME},
                    {"op": "replace", "path": f"/spec/ports/{index}/targetPort", "value": record["targetPort"]}]
    ops += _drop_map_entries(service, "/metadata/annotations", (ANN_ORIGINAL_TARGET_PORT,))
    return _guarded(service, ops)


# --- map entries and the resourceVersion guard ---------------------------------------------------

def _escape(key: str) -> str:
    """A map key as one JSON-pointer segment (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def _lookup(obj: Mapping[str, Any], pointer: str) -> Any:
    node: Any = obj
    for part in pointer.strip("/").split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _ensure_map_entry(obj: Mapping[str, Any], pointer: str, key: str, value: str) -> list[dict[str, Any]]:
    current = _lookup(obj, pointer)
    if current is None:
        return [{"op": "add", "path": pointer, "value": {key: value}}]
    if current.get(key) != value:
        return [{"op": "add", "path": f"{pointer}/{_escape(key)}", "value": value}]
    return []


def _set_map_entry(obj: Mapping[str, Any], ops: list[dict[str, Any]], pointer: str, key: str,
                   value: str) -> list[dict[str, Any]]:
    """Like ``_ensure_map_entry``, but the map may be created by an earlier op of the same patch."""
    if _lookup(obj, pointer) is None and any(op["op"] == "add" and op["path"] == pointer for op in ops):
        return [{"op": "add", "path": f"{pointer}/{_escape(key)}", "value": value}]
    return _ensure_map_entry(obj, pointer, key, value)


def _drop_map_entries(obj: Mapping[str, Any], pointer: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    current = _lookup(obj, pointer)
    if current is None:
        return []
    present = [k for k in keys if k in current]
    if present and len(present) == len(current):  # we created the map; leave no empty one behind
        return [{"op": "remove", "path": pointer}]
    return [{"op": "remove", "path": f"{pointer}/{_escape(k)}"} for k in present]


def _guarded(obj: Mapping[str, Any], ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prefix a non-empty patch with a test of the observed resourceVersion (optimistic locking)."""
    version = (obj.get("metadata") or {}).get("resourceVersion")
    if ops and version:
        return [{"op": "test", "path": "/metadata/resourceVersion", "value": version}, *ops]
    return ops
