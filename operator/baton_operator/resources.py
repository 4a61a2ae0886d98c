"""Desired Kubernetes objects and the JSON patches that inject or remove the Baton sidecar.

All pure: every function takes plain dicts (a BatonDeployment body, an observed Deployment or Service)
and returns plain dicts or JSON-patch operation lists. Nothing here talks to the API.

Sidecar mode touches objects the user owns, so its patches are RFC 6902 JSON patches that guard each
positional change with a ``test`` op (and the whole patch with the observed ``resourceVersion``): a
concurrent edit makes the API answer 409/422 instead of the patch clobbering someone else's change.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Mapping

import yaml

from baton_operator.config import OperatorConfig
from baton_operator.policy import policy_hash as content_hash

GROUP = "baton.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "BatonDeployment"

CONTAINER_NAME = "baton"
PORT_NAME = "baton-http"  # container port name; the repointed Service targets it by name
DEFAULT_PORT = 8080
CONFIG_KEY = "baton.yaml"
CONFIG_DIR = "/etc/baton"
CACHE_DIR = "/var/cache/baton"  # converted-model cache and TMPDIR; the root filesystem is read-only
MODEL_DIR = "/models"
CONFIG_VOLUME = "baton-config"
CACHE_VOLUME = "baton-cache"
MODEL_VOLUME = "baton-model"
BATON_VOLUMES = (CONFIG_VOLUME, CACHE_VOLUME, MODEL_VOLUME)

LABEL_INSTANCE = "baton.dev/deployment"  # on every object the operator creates or injects into
LABEL_SIDECAR = "baton.dev/sidecar"  # on injected pod templates, for PodMonitors
ANN_INJECTED_BY = "baton.dev/injected-by"
ANN_ORIGINAL_TARGET_PORT = "baton.dev/original-target-port"
ANN_POLICY_HASH = "baton.dev/policy-hash"
ANN_LAST_APPLIED = "baton.dev/last-applied"  # on owned children: what the operator last set, for removals
ANN_SIDECAR_HASH = "baton.dev/sidecar-hash"  # on an injected Deployment: the container and volumes set
MANAGED_BY = "baton-operator"

# The sidecar's own HTTP routes, all under one prefix: every other path goes through to the model
# server it fronts. The root /health, /ready and /metrics are the sidecar's only while it has no
# incumbent (a standalone BatonDeployment may name one), so probes and scrapes always use these.
SIDECAR_PREFIX = "/baton"
HEALTH_PATH = f"{SIDECAR_PREFIX}/health"  # liveness and startup
READY_PATH = f"{SIDECAR_PREFIX}/ready"
METRICS_PATH = f"{SIDECAR_PREFIX}/metrics"  # Prometheus text format
AB_REPORT_PATH = f"{SIDECAR_PREFIX}/ab/report"  # ?since=<cursor>&samples=true


class SpecError(ValueError):
    """The BatonDeployment cannot be realised as written; retrying will not help until it changes."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _escape(key: str) -> str:
    """A map key as one JSON-pointer segment (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def is_subset(desired: Any, actual: Any) -> bool:
    """Whether ``actual`` already holds ``desired``; extra keys in ``actual`` (server defaults) are fine."""
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(
            key in actual and is_subset(value, actual[key]) for key, value in desired.items())
    if isinstance(desired, list):
        return (isinstance(actual, list) and len(desired) == len(actual)
                and all(is_subset(d, a) for d, a in zip(desired, actual)))
    if isinstance(desired, (int, float)) and isinstance(actual, (int, float)) \
            and not isinstance(desired, bool) and not isinstance(actual, bool):
        return float(desired) == float(actual)
    return bool(desired == actual)


# --- names, labels, ownership -------------------------------------------------------------

def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def stamped(obj: dict[str, Any]) -> dict[str, Any]:
    """Record the owned sections (spec/data) in an annotation, so a later update can remove what the
    operator set before and no longer wants (a merge patch alone cannot tell those from server defaults)."""
    sections = {k: obj[k] for k in ("spec", "data") if k in obj}
    obj["metadata"].setdefault("annotations", {})[ANN_LAST_APPLIED] = _canonical_json(sections)
    return obj


def with_removals(desired: Any, last: Any) -> Any:
    """``desired`` as a merge patch over an object last set to ``last``: keys dropped since become null."""
    if not isinstance(desired, Mapping) or not isinstance(last, Mapping):
        return copy.deepcopy(desired)
    out = {key: with_removals(value, last.get(key)) for key, value in desired.items()}
    out.update({key: None for key in last if key not in desired})
    return out


def config_map_name(bd_name: str) -> str:
    return f"{bd_name}-baton-config"


def labels(bd_name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "baton",
        "app.kubernetes.io/instance": bd_name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_INSTANCE: bd_name,
    }


def selector_labels(bd_name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "baton", "app.kubernetes.io/instance": bd_name}


def owner_reference(bd: Mapping[str, Any]) -> dict[str, Any]:
    meta = bd["metadata"]
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def is_owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


# --- the sidecar's config file --------------------------------------------------------------

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


def desired_config_map(bd: Mapping[str, Any], config: Mapping[str, Any], policy_hash: str) -> dict[str, Any]:
    meta = bd["metadata"]
    return stamped({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_map_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": labels(meta["name"]),
            "annotations": {ANN_POLICY_HASH: policy_hash},
            "ownerReferences": [owner_reference(bd)],
        },
        "data": {CONFIG_KEY: render_config(config)},
    })


# --- the Baton container ----------------------------------------------------------------------

def baton_port(spec: Mapping[str, Any]) -> int:
    return int(spec.get("port", DEFAULT_PORT))


def engine_args(spec: Mapping[str, Any]) -> list[str]:
    """Start-up-only engine settings (baton_sidecar.config.EngineConfig) as CLI flags, only those set."""
    engine = spec.get("engine") or {}
    model = spec.get("model") or {}
    args: list[str] = []
    for flag, value in (("--model", model.get("path")), ("--served-model-name", model.get("servedName")),
                        ("--device", engine.get("device")), ("--dtype", engine.get("dtype")),
                        ("--batching", engine.get("batching")), ("--max-model-len", engine.get("maxModelLen"))):
        if value is not None:
            args += [flag, str(value)]
    return args


def container_env(bd_name: str, namespace: str, spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "TMPDIR", "value": CACHE_DIR},
    ]
    if ref := spec.get("adminTokenSecretRef"):
        env.append({"name": "BATON_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": ref["name"], "key": ref.get("key", "token")}}})
    telemetry = spec.get("telemetry") or {}
    if telemetry.get("otlpEndpoint"):
        env.append({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": telemetry["otlpEndpoint"]})
    if telemetry.get("samplingRatio") is not None:
        env.append({"name": "OTEL_TRACES_SAMPLER", "value": "parentbased_traceidratio"})
        env.append({"name": "OTEL_TRACES_SAMPLER_ARG", "value": str(telemetry["samplingRatio"])})
    if telemetry:
        env.append({"name": "OTEL_SERVICE_NAME", "value": telemetry.get("serviceName") or f"baton-{bd_name}"})
        env.append({"name": "OTEL_RESOURCE_ATTRIBUTES",
                    "value": f"k8s.namespace.name={namespace},baton.deployment={bd_name}"})
    return env


def baton_container(bd: Mapping[str, Any], cfg: OperatorConfig) -> dict[str, Any]:
    meta, spec = bd["metadata"], bd.get("spec") or {}
    port = baton_port(spec)
    mounts = [
        # The whole directory, never subPath: kubelet refreshes directory mounts when the ConfigMap
        # changes, which is how a new policy reaches a running sidecar without a restart.
        {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": CACHE_VOLUME, "mountPath": CACHE_DIR},
    ]
    if (spec.get("model") or {}).get("persistentVolumeClaim"):
        mounts.append({"name": MODEL_VOLUME, "mountPath": spec["model"].get("mountPath", MODEL_DIR),
                       "readOnly": True})
    http = {"port": PORT_NAME, "scheme": "HTTP"}
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.get("image") or cfg.sidecar_image,
        "imagePullPolicy": spec.get("imagePullPolicy") or cfg.image_pull_policy,
        "command": ["baton-sidecar"],
        "args": ["serve", "--config", f"{CONFIG_DIR}/{CONFIG_KEY}", "--host", "0.0.0.0", "--port", str(port),
                 *engine_args(spec)],
        "ports": [{"name": PORT_NAME, "containerPort": port, "protocol": "TCP"}],
        "env": container_env(meta["name"], meta["namespace"], spec),
        "volumeMounts": mounts,
        # Loading and converting a model can take minutes: the startup probe holds the others off.
        "startupProbe": {"httpGet": {"path": HEALTH_PATH, **http}, "periodSeconds": 10, "failureThreshold": 60},
        "livenessProbe": {"httpGet": {"path": HEALTH_PATH, **http}, "periodSeconds": 10, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": READY_PATH, **http}, "periodSeconds": 5, "failureThreshold": 2},
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if spec.get("resources"):
        container["resources"] = copy.deepcopy(spec["resources"])
    return container


def baton_volumes(bd: Mapping[str, Any]) -> list[dict[str, Any]]:
    spec = bd.get("spec") or {}
    volumes: list[dict[str, Any]] = [
        {"name": CONFIG_VOLUME, "configMap": {"name": config_map_name(bd["metadata"]["name"])}},
        {"name": CACHE_VOLUME, "emptyDir": {}},
    ]
    if claim := (spec.get("model") or {}).get("persistentVolumeClaim"):
        volumes.append({"name": MODEL_VOLUME, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
    return volumes


# --- standalone mode --------------------------------------------------------------------------

def desired_deployment(bd: Mapping[str, Any], cfg: OperatorConfig) -> dict[str, Any]:
    meta, spec = bd["metadata"], bd.get("spec") or {}
    name = meta["name"]
    pod_labels = {**labels(name), LABEL_SIDECAR: "true"}
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # the sidecar never talks to the Kubernetes API
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": 45,  # the sidecar drains for up to 30 s
        "containers": [baton_container(bd, cfg)],
        "volumes": baton_volumes(bd),
    }
    for key in ("nodeSelector", "tolerations"):
        if spec.get(key):
            pod_spec[key] = copy.deepcopy(spec[key])
    return stamped({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": meta["namespace"], "labels": labels(name),
                     "ownerReferences": [owner_reference(bd)]},
        "spec": {
            "replicas": spec.get("replicas", 1),
            "selector": {"matchLabels": selector_labels(name)},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": {
                    "prometheus.io/scrape": "true", "prometheus.io/port": str(baton_port(spec)),
                    "prometheus.io/path": METRICS_PATH}},
                "spec": pod_spec,
            },
        },
    })


def desired_service(bd: Mapping[str, Any]) -> dict[str, Any]:
    meta, spec = bd["metadata"], bd.get("spec") or {}
    name = meta["name"]
    return stamped({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": meta["namespace"], "labels": labels(name),
                     "ownerReferences": [owner_reference(bd)]},
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [{"name": "http", "port": baton_port(spec), "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    })


def update_body(desired: Mapping[str, Any], observed: Mapping[str, Any]) -> dict[str, Any] | None:
    """A merge patch taking ``observed`` to ``desired`` (top-level sections), or None if nothing differs.

    Sections are patched when they drifted or when ``desired`` changed since the last-applied record
    (then keys the operator set before and dropped since are nulled). Labels, annotations and owner
    references are merged in, not replaced, so others' keys survive; ``metadata.resourceVersion`` makes
    the patch conditional on what was observed.
    """
    patch: dict[str, Any] = {}
    observed_meta = observed.get("metadata") or {}
    try:
        last = json.loads((observed_meta.get("annotations") or {}).get(ANN_LAST_APPLIED) or "{}")
    except ValueError:
        last = {}
    for section in ("spec", "data"):
        if section not in desired:
            continue
        changed = section in last and _canonical_json(last[section]) != _canonical_json(desired[section])
        if changed or not is_subset(desired[section], observed.get(section)):
            patch[section] = with_removals(desired[section], last.get(section))
    meta_patch: dict[str, Any] = {}
    for key in ("labels", "annotations"):
        if not is_subset(desired["metadata"].get(key) or {}, observed_meta.get(key) or {}):
            meta_patch[key] = dict(desired["metadata"][key])
    refs = list(observed_meta.get("ownerReferences") or [])
    for ref in desired["metadata"].get("ownerReferences") or []:
        if not any(r.get("uid") == ref["uid"] for r in refs):
            refs.append(ref)
            meta_patch["ownerReferences"] = refs
    if not patch and not meta_patch:
        return None
    if observed_meta.get("resourceVersion"):
        meta_patch["resourceVersion"] = observed_meta["resourceVersion"]
    if meta_patch:
        patch["metadata"] = meta_patch
    return patch


# --- sidecar mode: the target Deployment ------------------------------------------------------

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
    pod = _pod_spec(deployment)
    ops: list[dict[str, Any]] = []
    base = "/spec/template/spec"

    index = find_container(deployment)
    if index is None:
        ops.append({"op": "add", "path": f"{base}/containers/-", "value": container})
    elif stale or not is_subset(container, pod["containers"][index]):
        ops += [{"op": "test", "path": f"{base}/containers/{index}/name", "value": CONTAINER_NAME},
                {"op": "replace", "path": f"{base}/containers/{index}", "value": container}]

    present = pod.get("volumes") or []
    ours = {v.get("name"): (i, v) for i, v in enumerate(present) if v.get("name") in BATON_VOLUMES}
    in_place = len(ours) == len(volumes) and all(
        v["name"] in ours and is_subset(v, ours[v["name"]][1]) for v in volumes)
    if stale or not in_place:
        if "volumes" not in pod:
            ops.append({"op": "add", "path": f"{base}/volumes", "value": volumes})
        elif len(ours) == len(present):
            ops.append({"op": "replace", "path": f"{base}/volumes", "value": volumes})
        else:
            for i in sorted((i for i, _ in ours.values()), reverse=True):  # highest first: indexes stay valid
                ops += [{"op": "test", "path": f"{base}/volumes/{i}/name", "value": present[i]["name"]},
                        {"op": "remove", "path": f"{base}/volumes/{i}"}]
            ops += [{"op": "add", "path": f"{base}/volumes/-", "value": v} for v in volumes]

    ops += _ensure_map_entry(deployment, "/metadata/labels", LABEL_INSTANCE, name)
    ops += _ensure_map_entry(deployment, "/metadata/annotations", ANN_INJECTED_BY, name)
    if stale:
        ops += _set_map_entry(deployment, ops, "/metadata/annotations", ANN_SIDECAR_HASH, digest)
    ops += _ensure_map_entry(deployment, "/spec/template/metadata/labels", LABEL_SIDECAR, "true")
    return _guarded(deployment, ops)


def removal_patch(deployment: Mapping[str, Any]) -> list[dict[str, Any]]:
    """JSON patch undoing ``injection_patch``: the user's own containers and volumes are untouched."""
    pod = _pod_spec(deployment)
    base = "/spec/template/spec"
    ops: list[dict[str, Any]] = []
    index = find_container(deployment)
    if index is not None:
        ops += [{"op": "test", "path": f"{base}/containers/{index}/name", "value": CONTAINER_NAME},
                {"op": "remove", "path": f"{base}/containers/{index}"}]
    volumes = pod.get("volumes") or []
    ours = [i for i, v in enumerate(volumes) if v.get("name") in BATON_VOLUMES]
    if ours and len(ours) == len(volumes):
        ops.append({"op": "remove", "path": f"{base}/volumes"})
    else:
        for i in sorted(ours, reverse=True):  # highest first, so earlier indexes stay valid
            ops += [{"op": "test", "path": f"{base}/volumes/{i}/name", "value": volumes[i]["name"]},
                    {"op": "remove", "path": f"{base}/volumes/{i}"}]
    ops += _drop_map_entry(deployment, "/metadata/labels", LABEL_INSTANCE)
    ops += _drop_map_entries(deployment, "/metadata/annotations", (ANN_INJECTED_BY, ANN_SIDECAR_HASH))
    ops += _drop_map_entry(deployment, "/spec/template/metadata/labels", LABEL_SIDECAR)
    return _guarded(deployment, ops)


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


def _drop_map_entry(obj: Mapping[str, Any], pointer: str, key: str) -> list[dict[str, Any]]:
    current = _lookup(obj, pointer)
    if current is None or key not in current:
        return []
    if len(current) == 1:  # we created the map; leave no empty one behind
        return [{"op": "remove", "path": pointer}]
    return [{"op": "remove", "path": f"{pointer}/{_escape(key)}"}]


def _guarded(obj: Mapping[str, Any], ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prefix a non-empty patch with a test of the observed resourceVersion (optimistic locking)."""
    version = (obj.get("metadata") or {}).get("resourceVersion")
    if ops and version:
        return [{"op": "test", "path": "/metadata/resourceVersion", "value": version}, *ops]
    return ops


# --- sidecar mode: the target Service ---------------------------------------------------------

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
    ops += _drop_map_entry(service, "/metadata/annotations", ANN_ORIGINAL_TARGET_PORT)
    return _guarded(service, ops)
