"""End to end on loopback: a real third-party incumbent, a real sidecar process, a bounded load, and the
operator under kopf against the API emulator stepping the weight.

- The incumbent is ``transformers serve --continuous-batching`` serving the same embedded model.
- The Baton sidecar (``--config FILE``) routes between its own engine and that incumbent. The test plays
  kubelet: it mirrors the ConfigMap's ``baton.yaml`` into the sidecar's ``--config`` file (an atomic
  replace, as kubelet's symlink swap), and the sidecar's file watcher applies it; nothing uses
  ``PUT /baton/admin/config``.
- The operator finds the sidecar through the ``baton.dev/report-urls`` annotation (no pods run in the
  emulator), enabled by ``BATON_ROLLOUT_ALLOW_REPORT_URLS``.
- Both model processes run one torch thread (``--threads 1``, ``OMP_NUM_THREADS=1``): two processes each
  spinning several threads on a two-core machine slow every step several times over.

Scenario 1: Baton re-batches against the incumbent's continuous batching and is promoted 25 -> 50 -> 100,
with the operator restarted at 50%. Scenario 2: Baton is capped at one sequence per batch while the
incumbent batches, and the first step's analyses fail until it rolls back to 0.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from rollout_testlib import (ROOT, ConfigMirror, apply_object, batondeployment, rollout_status, running_operator,
                             wait_for, wait_for_events, wait_for_phase, write_atomically)

sys.path.insert(0, str(ROOT / "tests" / "server"))
from hf_incumbent import TransformersServe  # noqa: E402  (the server tests' process launchers)
from server_helpers import SidecarProcess  # noqa: E402

pytestmark = [pytest.mark.rollout_e2e, pytest.mark.timeout(420)]

MODEL = "rollout-e2e"
WAIT = 150  # seconds for one rollout milestone under load; reached only on failure
ENV = {"OMP_NUM_THREADS": "1"}
GATES = {"maxErrorRate": 0.05}
FINISHED = re.compile(r'"finish_reason":\s*"(length|stop)"')  # in a stream from either arm


class LoadGenerator:
    """Streamed completions (max_tokens 6) from ``concurrency`` workers on loopback, each request with
    its own ``user`` (so the router's hash spreads them), until stopped, ``max_requests`` or
    ``max_seconds``."""

    def __init__(self, url: str, concurrency: int = 8, max_requests: int = 2000, max_seconds: float = 300) -> None:
        self.url, self.concurrency = url, concurrency
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.statuses: collections.Counter = collections.Counter()
        self.arms: collections.Counter = collections.Counter()
        self.served: list[tuple[float, str]] = []  # (when sent, arm) of each answered request
        self.failures: list[str] = []
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="load", daemon=True)

    def __enter__(self) -> "LoadGenerator":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(90)

    async def _main(self) -> None:
        import aiohttp

        deadline = time.monotonic() + self.max_seconds
        timeout = aiohttp.ClientTimeout(total=90)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async def worker() -> None:
                while not self._stop.is_set() and time.monotonic() < deadline and self.sent < self.max_requests:
                    self.sent += 1
                    n = self.sent
                    body = {"model": MODEL, "prompt": f"Write a short note about topic number {n}.",
                            "max_tokens": 6, "temperature": 0, "stream": True, "user": f"user-{n}"}
                    sent = time.monotonic()
                    try:
                        async with session.post(self.url + "/v1/completions", json=body) as resp:
                            text = await resp.text()
                            self.statuses[resp.status] += 1
                            arm = resp.headers.get("x-baton-arm", "?")
                            self.arms[arm] += 1
                            self.served.append((sent, arm))
                            if resp.status != 200 or not FINISHED.search(text):
                                self.failures.append(f"{resp.status} {arm}: {text[-300:]}")
                    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                        self.statuses[type(exc).__name__] += 1
                        self.failures.append(repr(exc))

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))


def start_sidecar(*args: str) -> SidecarProcess:
    return SidecarProcess("--served-model-name", MODEL, "--threads", "1", *args, env=ENV, timeout=240,
                          wait_ready=False)


@pytest.fixture(scope="module")
def incumbent():
    proc = TransformersServe(MODEL)  # ready (and warmed up) when this returns
    yield proc
    proc.stop()


def wait_ready(proc: SidecarProcess) -> None:
    wait_for(lambda: proc.get("/baton/ready").status_code == 200, 240, f"{proc.url} to be ready", interval=0.5)


def report(proc: SidecarProcess) -> dict:
    return requests.get(proc.url + "/baton/ab/report", timeout=60).json()


def record(scenario: str, bd: dict) -> None:
    """With ``BATON_RECORD_ROLLOUTS=DIR``, keep the finished rollout's status for the docs' pictures
    (``make docs-plots`` draws ``DIR/rollout-<scenario>.json``)."""
    folder = os.environ.get("BATON_RECORD_ROLLOUTS")
    if folder:
        path = Path(folder) / f"rollout-{scenario}.json"
        path.write_text(json.dumps({"scenario": scenario, "rollout": bd["status"]["rollout"]}, indent=1) + "\n")


def run_baton(tmp_path: Path, incumbent: TransformersServe, *args: str) -> tuple[SidecarProcess, Path]:
    config = tmp_path / "baton.yaml"  # what kubelet would mount; replaced by the operator's ConfigMap
    config.write_text(yaml.safe_dump({"router": {"incumbent_url": incumbent.url, "baton_weight": 0}}))
    baton = start_sidecar("--config", str(config), *args)
    try:
        wait_ready(baton)
    except BaseException:
        baton.stop()
        raise
    return baton, config


def test_promotes_to_100_and_resumes_after_an_operator_restart(cluster, incumbent, tmp_path) -> None:
    baton, config = run_baton(tmp_path, incumbent)
    rollout = {"steps": [25, 50, 100], "analysisIntervalSeconds": 5, "minSamplesPerArm": 8, "failureThreshold": 3,
               "gates": {"p95LatencyMarginPct": 50, "ttftMarginPct": 50, **GATES}}
    bd = batondeployment("canary", incumbent.url, baton.url, rollout)
    try:
        with ConfigMirror(cluster, "canary", lambda text: write_atomically(config, text)) as mirror, \
                LoadGenerator(baton.url) as load:
            with running_operator(cluster):
                apply_object(cluster, bd, tmp_path)
                wait_for(lambda: cluster.get("deployments", "canary"), 30, "the standalone Deployment")
                cluster.play_deployment_controller("canary")
                wait_for(lambda: mirror.weights[-1:] == [50], WAIT, "the second step (50%) in the ConfigMap")
                wait_for_events(cluster, "canary", {"RolloutStarted", "RolloutAdvanced"}, WAIT)
            stopped_at = rollout_status(cluster, "canary")
            assert (stopped_at["step"], stopped_at["weight"]) == (1, 50)

            with running_operator(cluster):  # a new operator process: it resumes at 50%, not from 25%
                wait_for_phase(cluster, "canary", "Promoted", WAIT)
                reasons = wait_for_events(cluster, "canary", {"RolloutPromoted"}, WAIT)
            wait_for(lambda: report(baton)["router"]["baton_weight"] == 100, 30, "the sidecar to apply 100%")
            applied = time.monotonic()
            wait_for(lambda: any(t > applied for t, _ in load.served), 60, "requests sent at 100%")
        final = cluster.get("bd", "canary")
    finally:
        baton.stop()
    record("promote", final)

    assert mirror.weights == [25, 50, 100]
    state = final["status"]["rollout"]
    assert [(h["action"], h["weight"]) for h in state["history"]] == [("start", 25), ("advance", 50),
                                                                      ("promote", 100)]
    assert state["phase"] == "Promoted" and state["step"] == 2 and state["failedAnalyses"] == 0
    assert final["status"]["traffic"]["weight"] == 100 and final["status"]["phase"] == "Ready"
    analysis = state["analysis"]
    assert analysis["result"] == "pass"
    # The last step was judged on its own requests, from the sidecar's raw samples since its cursor.
    assert analysis["latencyBasis"] == "pooled samples" and analysis["counted"] == 1
    for arm in ("baton", "incumbent"):
        assert analysis["arms"][arm]["requests"] >= 8
        p95 = analysis["arms"][arm]["p95LatencySeconds"]
        assert p95["ci95"][0] <= p95["value"] <= p95["ci95"][1]
    assert reasons.count("RolloutStarted") == 1  # the restarted operator did not start it over
    assert {r["weight"] for r in state["analyses"]} == {25, 50}  # each round on the step it judged
    assert not load.failures, load.failures[:5]  # nothing failed on the way, through both arms
    assert {"baton", "incumbent"} <= set(load.arms)
    assert {arm for t, arm in load.served if t > applied} == {"baton"}  # at 100% nothing reaches the incumbent


def test_rolls_back_when_baton_is_worse(cluster, incumbent, tmp_path) -> None:
    # One sequence per batch, in the flags and (so the mirrored config keeps it) in the spec.
    baton, config = run_baton(tmp_path, incumbent, "--max-batch-size", "1")
    rollout = {"steps": [50, 100], "analysisIntervalSeconds": 5, "minSamplesPerArm": 8, "failureThreshold": 2,
               "gates": {"p95LatencyMarginPct": 10, "ttftMarginPct": 10, **GATES}}
    bd = batondeployment("worse", incumbent.url, baton.url, rollout, engine={"limits": {"maxBatchSize": 1}})
    try:
        with ConfigMirror(cluster, "worse", lambda text: write_atomically(config, text)) as mirror, \
                LoadGenerator(baton.url), running_operator(cluster):
            apply_object(cluster, bd, tmp_path)
            wait_for(lambda: cluster.get("deployments", "worse"), 30, "the standalone Deployment")
            cluster.play_deployment_controller("worse")
            wait_for_phase(cluster, "worse", "RolledBack", WAIT)
            wait_for(lambda: report(baton)["router"]["baton_weight"] == 0, 30, "the sidecar to apply 0%")
            wait_for(lambda: (cluster.get("bd", "worse")["status"].get("phase") == "Degraded"), 30, "phase Degraded")
            wait_for_events(cluster, "worse", {"AnalysisFailed", "RolledBack"}, WAIT, kind="Warning")
        final = cluster.get("bd", "worse")
        assert yaml.safe_load(config.read_text())["policy"]["limits"]["max_batch_size"] == 1
    finally:
        baton.stop()
    record("rollback", final)

    assert mirror.weights == [50, 0]
    state = final["status"]["rollout"]
    assert [(h["action"], h["weight"]) for h in state["history"]] == [("start", 50), ("rollback", 0)]
    assert state["phase"] == "RolledBack" and state["failedAnalyses"] == 2 and state["weight"] == 0
    assert set(state["analysis"]["failedChecks"]) & {"p95Latency", "ttft"}, state["analysis"]
    baton_p95 = state["analysis"]["arms"]["baton"]["p95LatencySeconds"]["value"]
    incumbent_p95 = state["analysis"]["arms"]["incumbent"]["p95LatencySeconds"]["value"]
    assert baton_p95 > incumbent_p95
    assert [(r["weight"], r["result"]) for r in state["analyses"]][-2:] == [(50, "fail"), (50, "fail")]
    degraded = next(c for c in final["status"]["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "RolledBack")
    assert final["status"]["traffic"]["weight"] == 0
