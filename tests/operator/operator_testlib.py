"""Shared helpers for the operator's tests: repository paths, the emulated cluster handle, waiting.

Named uniquely (not ``conftest``/``helpers``) because ``tests/`` has no packages: every test directory
shares one module namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_DIR = ROOT / "operator"
if str(OPERATOR_DIR) not in sys.path:
    sys.path.insert(0, str(OPERATOR_DIR))

CRD_DIR = ROOT / "manifests" / "crds"
EXAMPLES = ROOT / "manifests" / "examples"
KUBECTL = os.environ.get("KUBECTL", "/usr/bin/kubectl")


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
