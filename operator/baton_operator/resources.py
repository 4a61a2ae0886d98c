"""Desired Kubernetes objects: the Baton container and volumes, a standalone BatonDeployment's
Deployment and Service, and the merge patch that brings an owned child in line (``update_body``). The
names, labels, annotations and paths every object and module shares are here.

All pure: every function takes plain dicts (a BatonDeployment body, an observed object) and returns
plain dicts. Nothing here talks to the API. The sidecars' ConfigMap (their ``baton.yaml``) is
``configmap``; sidecar mode's patches to the user's own Deployment and Service are ``injection``.

Owned children carry a last-applied record (``baton.dev/last-applied``: their ``spec``/``data`` as the
operator last set them), so a later update can remove keys the operator dropped; a merge patch alone
cannot tell those from server defaults.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Mapping

from baton_operator.config import OperatorConfig, default_pull_policy

GROUP = "baton.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "BatonDeployment"

CONTAINER_NAME = "baton"
PORT_NAME = "baton-http"  # container port name; the repointed Service targets it by name
DEFAULT_PORT = 8080
CONFIG_KEY = "baton.yaml"
CONFIG_DIR = "/etc/baton"
ADMIN_TOKEN_PATH = "admin-token"  # spec.adminTokenSecretRef's key, beside baton.yaml (config_volume)
CACHE_DIR = "/var/cache/baton"  # converted-model cache and TMPDIR; the root filesystem is read-only
RUN_AS = 10001  # the images' USER; set explicitly, so an injected container runs as it in any pod
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


# --- owned children: names, labels, ownership, the last-applied record ----------------------

def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def stamped(obj: dict[str, Any]) -> dict[str, Any]:
    """Record the owned sections (spec/data) in an annotation, so a later update can remove what the
    operator set before and no longer wants (a merge patch alone cannot tell those from server defaults)."""
    sections = {k: obj[k] for k in ("spec", "data") if k in obj}
    obj["metadata"].setdefault("annotations", {})[ANN_LAST_APPLIED] = canonical_json(sections)
    return obj


def last_applied(obj: Mapping[str, Any] | None) -> dict[str, Any]:
    """The sections an observed child was last set to by the operator ({} without a readable record)."""
    annotations = ((obj or {}).get("metadata") or {}).get("annotations") or {}
    try:
        last = json.loads(annotations.get(ANN_LAST_APPLIED) or "{}")
    except ValueError:
        return {}
    return last if isinstance(last, dict) else {}


def with_removals(desired: Any, last: Any) -> Any:
    """``desired`` as a merge patch over an object last set to ``last``: keys dropped since become null."""
    if not isinstance(desired, Mapping) or not isinstance(last, Mapping):
        return copy.deepcopy(desired)
    out = {key: with_removals(value, last.get(key)) for key, value in desired.items()}
    out.update({key: None for key in last if key not in desired})
    return out


def update_body(desired: Mapping[str, Any], observed: Mapping[str, Any],
                handed_over: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """A merge patch taking ``observed`` to ``desired`` (top-level sections), or None if nothing differs.

    Sections are patched when they drifted or when ``desired`` changed since the last-applied record
    (then keys the operator set before and dropped since are nulled). Labels, annotations and owner
    references are merged in, not replaced, so others' keys survive; ``metadata.resourceVersion`` makes
    the patch conditional on what was observed. ``handed_over``: ``spec`` keys another controller owns
    now (an autoscaler's ``replicas``); dropping them from ``desired`` never nulls them.
    """
    patch: dict[str, Any] = {}
    observed_meta = observed.get("metadata") or {}
    last = last_applied(observed)
    if handed_over and isinstance(last.get("spec"), dict):  # forget them unless desired still sets them
        kept = desired.get("spec") or {}
        last["spec"] = {k: v for k, v in last["spec"].items() if k not in handed_over or k in kept}
    for section in ("spec", "data"):
        if section not in desired:
            continue
        changed = section in last and canonical_json(last[section]) != canonical_json(desired[section])
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


def child_metadata(bd: Mapping[str, Any], name: str, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``metadata`` of an object the BatonDeployment owns: its labels and a controlling owner reference."""
    meta = bd["metadata"]
    out: dict[str, Any] = {"name": name, "namespace": meta["namespace"], "labels": labels(meta["name"])}
    if annotations is not None:
        out["annotations"] = dict(annotations)
    out["ownerReferences"] = [owner_reference(bd)]
    return out


def owner_reference(bd: Mapping[str, Any]) -> dict[str, Any]:
    meta = bd["metadata"]
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def is_owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


# --- the Baton container ----------------------------------------------------------------------

def baton_port(spec: Mapping[str, Any]) -> int:
    return int(spec.get("port", DEFAULT_PORT))


def engine_args(spec: Mapping[str, Any], default_quantization: str | None = None) -> list[str]:
    """Start-up-only engine settings (baton_sidecar.config.EngineConfig) as CLI flags, only those set;
    ``default_quantization`` (the chart's ``sidecar.quantization``) when the spec names none."""
    engine = spec.get("engine") or {}
    model = spec.get("model") or {}
    args: list[str] = []
    for flag, value in (("--model", model.get("path")), ("--served-model-name", model.get("servedName")),
                        ("--device", engine.get("device")), ("--dtype", engine.get("dtype")),
                        ("--batching", engine.get("batching")), ("--max-model-len", engine.get("maxModelLen")),
                        ("--quantization", engine.get("quantization") or default_quantization)):
        if value is not None:
            args += [flag, str(value)]
    return args


def container_env(bd_name: str, namespace: str, spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "TMPDIR", "value": CACHE_DIR},
    ]
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


def requests_accelerator(resources: Mapping[str, Any] | None) -> bool:
    """Whether requests/limits name an accelerator device (``nvidia.com/gpu``, ``amd.com/gpu``, a MIG
    slice such as ``nvidia.com/mig-1g.10gb``)."""
    names = [key for section in ("requests", "limits") for key in ((resources or {}).get(section) or {})]
    return any(key.endswith("/gpu") or "/mig-" in key for key in names)


def check_accelerator(spec: Mapping[str, Any]) -> None:
    """Refuse ``engine.device: cuda`` without a GPU request: the container would see no device (in
    sidecar mode the incumbent's GPU is the incumbent's; it is never shared implicitly)."""
    device = str((spec.get("engine") or {}).get("device") or "")
    if device.startswith("cuda") and not requests_accelerator(spec.get("resources")):
        raise SpecError("spec.engine.device",
                        f"{device!r} needs a GPU for the Baton container: set spec.resources.limits, e.g. "
                        f"nvidia.com/gpu: 1 (a second GPU, a MIG slice or a time-sliced share), or use "
                        f"device cpu (see docs/operator.md, \"Accelerators in sidecar mode\")")


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
    args = ["serve", "--config", f"{CONFIG_DIR}/{CONFIG_KEY}", "--host", "0.0.0.0", "--port", str(port)]
    if spec.get("adminTokenSecretRef"):
        args += ["--admin-token-file", f"{CONFIG_DIR}/{ADMIN_TOKEN_PATH}"]  # see config_volume
    http = {"port": PORT_NAME, "scheme": "HTTP"}
    image = spec.get("image") or cfg.sidecar_image
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": spec.get("imagePullPolicy") or cfg.image_pull_policy or default_pull_policy(image),
        "command": ["baton-sidecar"],
        "args": [*args, *engine_args(spec, cfg.default_quantization)],
        "ports": [{"name": PORT_NAME, "containerPort": port, "protocol": "TCP"}],
        "env": container_env(meta["name"], meta["namespace"], spec),
        "volumeMounts": mounts,
        # Loading and converting a model can take minutes: the startup probe holds the others off.
        "startupProbe": {"httpGet": {"path": HEALTH_PATH, **http}, "periodSeconds": 10, "failureThreshold": 60},
        "livenessProbe": {"httpGet": {"path": HEALTH_PATH, **http}, "periodSeconds": 10, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": READY_PATH, **http}, "periodSeconds": 5, "failureThreshold": 2},
        # Container-level, so that it holds in a user's pod (sidecar mode) whatever the pod sets.
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    # The spec's resources replace the operator's defaults whole: a partial merge could pair the default
    # memory request with a smaller limit of the spec's, which the API server refuses.
    resources = spec.get("resources") or cfg.sidecar_resources
    if resources:
        container["resources"] = copy.deepcopy(dict(resources))
    return container


def config_volume(bd: Mapping[str, Any]) -> dict[str, Any]:
    """The ConfigMap's ``baton.yaml``, and with ``spec.adminTokenSecretRef`` the admin token beside it (one
    projected volume, refreshed like the ConfigMap's own). A file, never an environment variable: the
    token stays out of the process environment, which child processes and crash reports inherit."""
    config_map = {"name": config_map_name(bd["metadata"]["name"])}
    ref = (bd.get("spec") or {}).get("adminTokenSecretRef")
    if not ref:
        return {"name": CONFIG_VOLUME, "configMap": config_map}
    secret = {"name": ref["name"], "items": [{"key": ref.get("key", "token"), "path": ADMIN_TOKEN_PATH}]}
    return {"name": CONFIG_VOLUME, "projected": {"sources": [{"configMap": config_map}, {"secret": secret}]}}


def baton_volumes(bd: Mapping[str, Any]) -> list[dict[str, Any]]:
    spec = bd.get("spec") or {}
    volumes: list[dict[str, Any]] = [config_volume(bd), {"name": CACHE_VOLUME, "emptyDir": {}}]
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
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
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
        "metadata": child_metadata(bd, name),
        "spec": {
            # Unset (the API server's default, 1, on create) while an autoscaler owns them or the spec
            # names none; the reconcile never nulls them either (update_body's handed_over).
            **({"replicas": spec["replicas"]} if "replicas" in spec and not spec.get("autoscaling") else {}),
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
        "metadata": child_metadata(bd, name),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [{"name": "http", "port": baton_port(spec), "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    })
