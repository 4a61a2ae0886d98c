"""Two operator replicas with leader election, as the chart runs them: each a real ``kopf run`` process
against the emulated API, reading a scripted sidecar. Exactly one reconciles; killing it (SIGKILL, no
clean-up) mid-rollout hands the Lease to the other, which resumes the rollout at the step it had
reached and finishes it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from rollout_testlib import (ROOT, ConfigMirror, StubSidecar, apply_object, batondeployment, rollout_status,
                             wait_for, wait_for_events, wait_for_phase)

pytestmark = [pytest.mark.operator_e2e, pytest.mark.timeout(240)]

WAIT = 60  # seconds; generous for a busy 2-core machine, reached only on failure
LEASE_S, RENEW_DEADLINE_S, RETRY_S = 4, 3, 0.5  # short, so failover fits a test (the chart: 15, 10, 2)
ROLLOUT = {"steps": [10, 50, 100], "analysisIntervalSeconds": 5, "minSamplesPerArm": 10, "failureThreshold": 2,
           "gates": {"p95LatencyMarginPct": 10, "ttftMarginPct": 10, "maxErrorRate": 0.05},
           "manualGates": [100]}  # holds at 50% until approved: the fixed point where the leader dies


class OperatorProcess:
    """``python -m kopf run -m baton_operator`` in its own process, leader election on."""

    def __init__(self, cluster: Any, pod_name: str, log_path: Path) -> None:
        self.health_url = f"http://127.0.0.1:{free_port()}/healthz"
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PYTHONPATH": str(ROOT / "operator"),
               "POD_NAME": pod_name, "BATON_LEADER_ELECTION": "true",
               "BATON_HEALTH_ADDRESS": self.health_url.split("/")[2],
               "BATON_LEADER_ELECTION_NAMESPACE": cluster.namespace,
               "BATON_LEADER_ELECTION_LEASE_SECONDS": str(LEASE_S),
               "BATON_LEADER_ELECTION_RENEW_DEADLINE_SECONDS": str(RENEW_DEADLINE_S),
               "BATON_LEADER_ELECTION_RETRY_SECONDS": str(RETRY_S),
               "BATON_ROLLOUT_POLL_SECONDS": "0.5", "BATON_ROLLOUT_TICK_SECONDS": "0.5",
               "BATON_ROLLOUT_ALLOW_REPORT_URLS": "true"}
        for key in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            env.pop(key, None)
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kopf", "run", "--standalone", f"--namespace={cluster.namespace}", "--verbose",
             "-m", "baton_operator"], env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def live(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def lease_holder(cluster: Any) -> dict[str, Any]:
    lease = cluster.get("leases.v1.coordination.k8s.io", "baton-operator") or {}
    return lease.get("spec") or {}


def test_standby_takes_over_a_killed_leader_and_resumes_the_rollout(cluster, tmp_path: Path) -> None:
    stub = StubSidecar()
    first = second = None
    try:
        with ConfigMirror(cluster, "canary", stub.apply_config) as mirror:
            first = OperatorProcess(cluster, "op-a", tmp_path / "op-a.log")
            wait_for(lambda: (lease_holder(cluster).get("holderIdentity") or "").startswith("op-a_"), WAIT,
                     "op-a to take the Lease")
            second = OperatorProcess(cluster, "op-b", tmp_path / "op-b.log")
            wait_for(lambda: "waiting to lead" in second.log(), WAIT, "op-b to stand by")
            wait_for(lambda: live(second.health_url), WAIT, "the standby's liveness endpoint")  # not restarted

            apply_object(cluster, batondeployment("canary", "http://127.0.0.1:9", stub.url, ROLLOUT), tmp_path)
            wait_for(lambda: cluster.get("deployments", "canary"), WAIT, "the Deployment")
            cluster.play_deployment_controller("canary")
            wait_for_phase(cluster, "canary", "AwaitingApproval", WAIT)
            state = rollout_status(cluster, "canary")
            assert (state["step"], state["weight"]) == (1, 50)
            # Only the leader reconciled: the standby never ran a handler.
            assert "reconcile_deployment" in first.log()
            assert "reconcile_deployment" not in second.log() and "rollout_daemon" not in second.log()

            assert first.stop(signal.SIGKILL) == -signal.SIGKILL
            killed_at = time.monotonic()
            taken = wait_for(lambda: (spec := lease_holder(cluster))
                             and (spec.get("holderIdentity") or "").startswith("op-b_") and spec, WAIT,
                             "op-b to take the Lease")
            assert time.monotonic() - killed_at >= LEASE_S - 1  # it waited for the dead leader's Lease
            assert taken["leaseTransitions"] == 1

            # The new leader analyses the same step again (not a restart from 10%), then promotes.
            reports = stub.reports
            wait_for(lambda: stub.reports > reports + 2, WAIT, "op-b to analyse the rollout")
            state = rollout_status(cluster, "canary")
            assert (state["step"], state["weight"], state["phase"]) == (1, 50, "AwaitingApproval")
            cluster.kubectl("patch", "bd", "canary", "--type=merge",
                            "-p", '{"spec": {"rollout": {"approvedWeight": 100}}}')
            wait_for_phase(cluster, "canary", "Promoted", WAIT)
            reasons = wait_for_events(cluster, "canary", {"RolloutPromoted"}, WAIT)
            wait_for(lambda: mirror.weights[-1:] == [100], WAIT, "the ConfigMap at 100%")
        assert mirror.weights == [10, 50, 100]
        assert [h["weight"] for h in rollout_status(cluster, "canary")["history"]] == [10, 50, 100]
        assert reasons.count("RolloutStarted") == 1

        # A clean stop hands the Lease back at once.
        assert second.stop() == 0, second.log()[-3000:]
        assert not lease_holder(cluster).get("holderIdentity")
    finally:
        for process in (first, second):
            if process is not None and process.proc.poll() is None:
                process.stop(signal.SIGKILL)
        stub.close()
