"""checkov, the IaC scanner platform teams run, over everything Baton puts into a cluster: the plain
manifests (examples included), the chart rendered with its defaults and with every option on, and the
objects the operator makes at run time, built by its pure builders for a table of BatonDeployments.

A finding fails the test unless ``SKIPS`` gives its reason for where it occurs, or the resource carries
a ``checkov.io/skipN: CHECK=reason`` annotation; a skip that nothing needs fails it too, so the list only
shrinks. docs/security.md explains each one.

checkov runs from a venv of its own (scripts/fetch-checkov.sh, pinned); without it the test fails.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from baton_operator import configmap as cm
from baton_operator import injection as inj
from baton_operator import resources as res
from baton_operator import scaling
from baton_operator.config import OperatorConfig
from operator_testlib import EXAMPLES, ROOT
from test_operator_helm import ALL_ON, NAMESPACED, SCALED, render

NAMESPACE = "team-a"  # where the table's BatonDeployments live (a watched namespace of the all-on chart)
DIGEST = "sha256:" + "0123456789abcdef" * 4  # any well-formed digest: checkov reads the reference only
EVERYTHING_ON = [
    *ALL_ON, *NAMESPACED, *SCALED,  # monitors, default policy, telemetry; Roles; adapter, pool, BatonDeployments
    "--set", "grafana.dashboards.enabled=true",
    "--set", f"image.digest={DIGEST}", "--set", f"sidecar.image.digest={DIGEST}",
    "--set", "networkPolicy.sidecars.enabled=true", "--set", "networkPolicy.apiServer.cidrs={10.0.0.1/32}",
]


@dataclass(frozen=True)
class Skip:
    """A check allowed to fail in ``where`` (globs over ``<scanned set>/<file>``), and why."""

    reason: str
    where: tuple[str, ...]


SKIPS = {
    "CKV_K8S_43": Skip(  # Image should use digest
        "No image of this source tree has a published digest to pin: the plain manifests, the examples "
        "(and so the example incumbent the sidecar cases join) and the chart's default values name tags, "
        "pulled Always. Installs pin them: image.digest and sidecar.image.digest in the chart (the "
        "everything-on render, and the Baton containers the operator makes from it, have no such "
        "finding), kustomize's images[].digest for the manifests.",
        ("manifests/operator.yaml", "manifests/examples/*", "chart-defaults/*", "operator-made/sidecar*.yaml")),
    "CKV_K8S_21": Skip(  # The default namespace should not be used
        "The examples name no namespace on purpose: they are applied into the user's own "
        "(kubectl apply -n), which is where the operator looks for a BatonDeployment's target.",
        ("manifests/examples/*",)),
    "CKV_K8S_11": Skip(  # CPU limits should be set
        "No default CPU limit on the Baton container: it is an inference server, and a CFS quota stalls "
        "a decode step that overruns it for the rest of the period (up to 100 ms per token); its CPU "
        "request reserves its share. A BatonDeployment that wants one sets spec.resources.limits.cpu.",
        ("operator-made/*",)),
}


# --- what is scanned --------------------------------------------------------------------------------

def bd(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": res.API_VERSION, "kind": res.KIND,
            "metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-{name}", "generation": 1},
            "spec": spec}


def example(name: str) -> dict[str, Any]:
    docs = yaml.safe_load_all((EXAMPLES / "batondeployment.yaml").read_text())
    found = copy.deepcopy(next(d for d in docs if d and d["metadata"]["name"] == name))
    return bd(name, **found["spec"])


GPU = {"requests": {"cpu": "4", "memory": "24Gi", "nvidia.com/gpu": 1},
       "limits": {"memory": "24Gi", "nvidia.com/gpu": 1}}
CASES = {
    "standalone": bd("standalone", mode="standalone"),  # the embedded model, the operator's defaults
    "standalone-gpu": example("baton-standalone"),  # a model on a volume, a GPU, telemetry
    "sidecar": example("baton-canary"),  # injected into manifests/examples/incumbent.yaml
    "sidecar-gpu": bd("sidecar-gpu", mode="sidecar", targetDeployment="llm-server", resources=GPU,
                      engine={"device": "cuda", "dtype": "bfloat16"}),
    "hpa": bd("hpa", mode="standalone", autoscaling={"engine": "hpa", "minReplicas": 2, "maxReplicas": 8,
                                                     "metric": "queueDepth", "target": 4}),
    "keda": bd("keda", mode="standalone", resources=GPU, engine={"device": "cuda"},
               autoscaling={"engine": "keda", "maxReplicas": 4, "metric": "kvUsage", "target": 0.75,
                            "prometheusAddress": "http://prometheus.monitoring:9090"}),
    "pdb": bd("pdb", mode="standalone", replicas=3, podDisruptionBudget={"enabled": True, "maxUnavailable": 1}),
    "admin-token": bd("admin-token", mode="standalone", adminTokenSecretRef={"name": "baton-admin"}),
}


def operator_config(chart: list[dict[str, Any]]) -> OperatorConfig:
    """The operator as a rendered chart configures it (the sidecar image, its pull policy and resources)."""
    deployment = next(o for o in chart if o["kind"] == "Deployment")
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
           if "value" in e and e["name"] != "BATON_DEFAULT_POLICY_FILE"}  # a path inside the pod
    return OperatorConfig.from_env(env)


def incumbent() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The example incumbent's Deployment, Service and NetworkPolicy, as applied in ``NAMESPACE``."""
    docs = {d["kind"]: d for d in yaml.safe_load_all((EXAMPLES / "incumbent.yaml").read_text()) if d}
    for obj in docs.values():
        obj["metadata"].update(namespace=NAMESPACE, resourceVersion="1")
    return docs["Deployment"], docs["Service"], docs["NetworkPolicy"]


def operator_made(body: dict[str, Any], cfg: OperatorConfig) -> list[dict[str, Any]]:
    """What the operator writes for ``body``: owned children, or the patched user objects in sidecar mode."""
    spec = body["spec"]
    res.check_accelerator(spec)  # the operator would refuse the BatonDeployment otherwise
    if spec["mode"] == "sidecar":
        deployment, service, policy = incumbent()
        target = inj.resolve_service_target(service, deployment, body)
        incumbent_url = f"http://127.0.0.1:{target.incumbent_port}"
        made = [jsonpatch.apply_patch(deployment, inj.injection_patch(deployment, body, cfg)),
                jsonpatch.apply_patch(service, inj.repoint_patch(service, target, by=body["metadata"]["name"])),
                policy]  # the user's own, which the sidecar joins
    else:
        incumbent_url = None
        made = [res.desired_deployment(body, cfg), res.desired_service(body),
                scaling.desired_autoscaler(body, cfg.prometheus_address), scaling.desired_disruption_budget(body)]
    weight = cm.desired_weight(spec, incumbent_url, None)
    config = cm.sidecar_config(cfg.default_policy, cm.router_config(spec, incumbent_url, weight))
    return [o for o in made if o is not None] + [cm.desired_config_map(body, config, "policy-hash")]


def write(directory: Path, name: str, objects: list[dict[str, Any]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(yaml.safe_dump_all(objects, sort_keys=False))


def scanned_sets(helm, root: Path) -> dict[str, Path]:
    """One directory per checkov run. Separate runs, because checkov links a NetworkPolicy to every pod
    its labels select in the run, whatever the namespace: one set's policy must not cover another's."""
    sets = {name: root / name for name in ("manifests", "chart-defaults", "chart-everything-on", "operator-made")}
    shutil.copytree(ROOT / "manifests", sets["manifests"])
    write(sets["chart-defaults"], "rendered.yaml", render(helm))
    chart = render(helm, *EVERYTHING_ON)
    write(sets["chart-everything-on"], "rendered.yaml", chart)
    cfg = operator_config(chart)
    for case, body in CASES.items():
        write(sets["operator-made"], f"{case}.yaml", operator_made(body, cfg))
    # The chart's policy for the standalone pods of the table's namespace, one of the watched ones.
    (policy,) = [o for o in chart if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == NAMESPACE]
    write(sets["operator-made"], "chart-sidecar-networkpolicy.yaml", [policy])
    return sets


# --- running checkov ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def checkov() -> Path:
    """The pinned checkov, installed on first use by scripts/fetch-checkov.sh into a venv of its own."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "fetch-checkov.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"scripts/fetch-checkov.sh failed (exit {proc.returncode}); checkov is required for the "
                    f"security scan.\n{proc.stdout}\n{proc.stderr[-4000:]}", pytrace=False)
    return Path(proc.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Finding:
    check: str
    name: str
    where: str  # <scanned set>/<file>
    resource: str
    suppressed: str | None = None  # the annotation's reason, for a skipped check

    def __str__(self) -> str:
        return f"{self.check} {self.name!r} in {self.where}: {self.resource}"


def run_checkov(checkov: Path, sets: dict[str, Path], home: Path) -> dict[str, list[Finding]]:
    """Every result of every set, by outcome (``passed``, ``failed``, ``skipped``), the runs in parallel."""
    # A clean environment: HELM_NAMESPACE, say, would make checkov pass every default-namespace check.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LOG_LEVEL": "WARNING"}
    procs = {name: subprocess.Popen([str(checkov), "--directory", str(path), "--framework", "kubernetes",
                                     "--skip-download", "--compact", "--output", "json"],
                                    cwd=path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, path in sets.items()}
    results: dict[str, list[Finding]] = {"passed": [], "failed": [], "skipped": []}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        try:
            reports = json.loads(out)
        except ValueError:
            pytest.fail(f"checkov on {name} wrote no JSON report (exit {proc.returncode}):\n{out[-2000:]}\n"
                        f"{err[-4000:]}", pytrace=False)
        for report in reports if isinstance(reports, list) else [reports]:
            assert report.get("check_type", "kubernetes") == "kubernetes", report.get("check_type")
            for outcome, found in results.items():
                for r in (report.get("results") or {}).get(f"{outcome}_checks") or []:
                    suppressed = (r.get("check_result") or {}).get("suppress_comment")
                    found.append(Finding(r["check_id"], r["check_name"], f"{name}{r['file_path']}",
                                         r["resource"], suppressed))
    return results


def skip_for(finding: Finding) -> Skip | None:
    skip = SKIPS.get(finding.check)
    if skip is not None and any(fnmatch.fnmatch(finding.where, pattern) for pattern in skip.where):
        return skip
    return None


# --- the test -----------------------------------------------------------------------------------

def test_checkov_finds_nothing_unreasoned(helm, checkov, tmp_path) -> None:
    sets = scanned_sets(helm, tmp_path / "scan")
    results = run_checkov(checkov, sets, tmp_path / "home")
    failed, skipped = results["failed"], results["skipped"]
    reasoned = [f for f in failed if skip_for(f)]
    unreasoned = [f for f in failed if not skip_for(f)]
    print(f"checkov: {len(results['passed'])} passed, {len(reasoned)} failed with a reason in SKIPS, "
          f"{len(skipped)} skipped by an annotation, {len(unreasoned)} unreasoned")
    for finding in sorted(reasoned, key=str):
        print(f"  reasoned: {finding}")
    for finding in sorted(skipped, key=str):
        print(f"  annotated: {finding} -- {finding.suppressed}")
    # checkov read every file that holds a workload, or a finding-free run would prove nothing.
    checked = {f.where for found in results.values() for f in found}
    workloads = {f"{name}/{path.relative_to(root)}" for name, root in sets.items()
                 for path in root.rglob("*.yaml") if "kind: Deployment" in path.read_text()}
    assert workloads and workloads <= checked, f"not scanned: {sorted(workloads - checked)}"
    assert not unreasoned, "checkov findings without a reason (fix them, or add one to SKIPS):\n" + "\n".join(
        f"  {f}" for f in sorted(unreasoned, key=str))
    bare = [f for f in skipped if not f.suppressed or f.suppressed == "No comment provided"]
    assert not bare, "checkov.io/skip annotations without a reason:\n" + "\n".join(f"  {f}" for f in bare)
    unused = {(check, pattern) for check, skip in SKIPS.items() for pattern in skip.where} - {
        (f.check, pattern) for f in reasoned for pattern in SKIPS[f.check].where
        if fnmatch.fnmatch(f.where, pattern)}
    assert not unused, f"SKIPS entries nothing needs any more (remove them): {sorted(unused)}"


def test_every_case_builds_and_the_table_covers_each_kind(helm) -> None:
    """The table reaches every kind of object the operator writes, in both modes."""
    cfg = operator_config(render(helm, *EVERYTHING_ON))
    assert "@sha256:" in cfg.sidecar_image  # from sidecar.image.digest
    kinds = {o["kind"] for body in CASES.values() for o in operator_made(body, cfg)}
    assert kinds >= {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "ScaledObject",
                     "PodDisruptionBudget"}
    modes = {body["spec"]["mode"] for body in CASES.values()}
    assert modes == {"standalone", "sidecar"}
    assert any(res.requests_accelerator(body["spec"].get("resources")) for body in CASES.values())
