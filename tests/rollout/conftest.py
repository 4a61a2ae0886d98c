"""Fixtures for the rollout tests; helpers live in rollout_testlib (which also sets up ``sys.path``)."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rollout_testlib import ROOT, Cluster  # noqa: E402  (also puts operator/ and tests/operator/ on sys.path)


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A fresh emulated API server with the CRDs declared, and a kubeconfig pointing at it."""
    from baton_kube_emulator import EmulatorThread

    namespace = f"rollout-{uuid.uuid4().hex[:6]}"
    with EmulatorThread(sorted((ROOT / "manifests" / "crds").glob("*.yaml"))) as emulator:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(emulator.kubeconfig(namespace))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        yield Cluster(emulator.url, namespace, kubeconfig)
