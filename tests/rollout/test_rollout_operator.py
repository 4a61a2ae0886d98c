"""The rollout controller under kopf against the emulated API, reading scripted sidecars (no model):
promotion through every step, a restart mid-rollout, rollback, abort and auto-tune, and the shadow
stage passing (with a restart mid-stage) or rolling back."""

from __future__ import annotations

import pytest
import yaml
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from baton_operator import tracing
from baton_operator.policy import DEFAULT_POLICY
from rollout_testlib import (ConfigMirror, StubSidecar, apply_object, batondeployment,
                             rollout_status, running_operator, wait_for, wait_for_events, wait_for_phase)

pytestmark = [pytest.mark.operator_e2e, pytest.mark.timeout(180)]

WAIT = 60  # seconds; generous for a busy 2-core machine, reached only on failure
ROLLOUT = {"steps": [10, 50, 100], "analysisIntervalSeconds": 5, "minSamplesPerArm": 10, "failureThreshold": 2,
           "gates": {"p95LatencyMarginPct": 10, "ttftMarginPct": 10, "maxErrorRate": 0.05}}


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """Spans of the operator running in this process (until it shuts the provider down on exit)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_provider", provider)
    return exporter


@pytest.fixture
def stub():
    sidecar = StubSidecar()
    yield sidecar
    sidecar.close()


def _deployment_available(cluster, name) -> None:
    """Play the Deployment controller for the standalone children (the stub stands in for the pods)."""
    wait_for(lambda: cluster.get("deployments", name), WAIT, f"Deployment {name}")
    cluster.play_deployment_controller(name)


def _condition(cluster, name, kind):
    bd = cluster.get("bd", name)
    return next((c for c in (bd.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def test_promotes_through_every_step_and_resumes_after_a_restart(cluster, stub, tmp_path) -> None:
    rollout = {**ROLLOUT, "manualGates": [100]}  # holds at 50% until approved: a fixed point to restart at
    with ConfigMirror(cluster, "canary", stub.apply_config) as mirror:
        with running_operator(cluster):
            apply_object(cluster, batondeployment("canary", "http://127.0.0.1:9", stub.url, rollout), tmp_path)
            _deployment_available(cluster, "canary")
            wait_for_phase(cluster, "canary", "AwaitingApproval", WAIT)
            wait_for_events(cluster, "canary", {"RolloutStarted", "RolloutAdvanced", "RolloutAwaitingApproval"},
                            WAIT)
        state = rollout_status(cluster, "canary")
        assert (state["step"], state["weight"]) == (1, 50)
        assert [h["weight"] for h in state["history"]] == [10, 50]
        analysis = state["analysis"]
        assert analysis["result"] == "pass" and analysis["failedChecks"] == []
        for arm in ("baton", "incumbent"):
            p95 = analysis["arms"][arm]["p95LatencySeconds"]
            assert p95["ci95"][0] <= p95["value"] <= p95["ci95"][1]
            assert analysis["arms"][arm]["requests"] >= 10
        assert "approvedWeight" in state["message"]
        assert analysis["latencyBasis"] == "pooled samples" and analysis["counted"] == 1
        cursor = state["baseline"]["pods"][stub.url]["cursor"]  # where the 50% step starts in the stub

        # The operator was stopped mid-rollout; a new one resumes at the recorded step, not from 10%, and
        # asks the sidecar for the same step's outcomes (since the recorded cursor).
        reports_before = stub.reports
        with running_operator(cluster):
            wait_for(lambda: stub.reports > reports_before + 2, WAIT, "the restarted operator to analyse again")
            state = rollout_status(cluster, "canary")
            assert (state["step"], state["weight"], state["phase"]) == (1, 50, "AwaitingApproval")
            assert {"samples": "true", "since": str(cursor)} in stub.queries[reports_before:]
            cluster.kubectl("patch", "bd", "canary", "--type=merge",
                            "-p", '{"spec": {"rollout": {"approvedWeight": 100}}}')
            wait_for_phase(cluster, "canary", "Promoted", WAIT)
            wait_for(lambda: _condition(cluster, "canary", "Progressing").get("reason") == "Promoted", WAIT,
                     "Progressing=False/Promoted")
            reasons = wait_for_events(cluster, "canary", {"RolloutPromoted"}, WAIT)
        wait_for(lambda: mirror.weights[-1:] == [100], WAIT, "the ConfigMap at 100%")
    assert mirror.weights == [10, 50, 100]
    bd = cluster.get("bd", "canary")
    assert [h["weight"] for h in bd["status"]["rollout"]["history"]] == [10, 50, 100]
    # Every analysis round is kept, on the step it judged: the rollout's picture.
    rounds = bd["status"]["rollout"]["analyses"]
    assert rounds and [r["time"] for r in rounds] == sorted(r["time"] for r in rounds)
    assert {r["weight"] for r in rounds} == {10, 50} and {r["result"] for r in rounds} == {"pass"}
    for arm in ("baton", "incumbent"):
        assert all(r["arms"][arm]["ci95"][0] <= r["arms"][arm]["p95"] <= r["arms"][arm]["ci95"][1] for r in rounds)
    assert bd["status"]["traffic"]["weight"] == 100
    assert bd["status"]["rollout"]["lastDecision"]["action"] == "promote"
    assert reasons.count("RolloutStarted") == 1  # the restart did not start it over


def test_rolls_back_when_baton_is_slower(cluster, tmp_path, spans) -> None:
    stub = StubSidecar(baton_mean=2.0)  # twice the incumbent's latency
    try:
        with ConfigMirror(cluster, "slow", stub.apply_config) as mirror, running_operator(cluster):
            apply_object(cluster, batondeployment("slow", "http://127.0.0.1:9", stub.url, ROLLOUT), tmp_path)
            _deployment_available(cluster, "slow")
            wait_for_phase(cluster, "slow", "RolledBack", WAIT)
            wait_for(lambda: _condition(cluster, "slow", "Degraded").get("status") == "True", WAIT, "Degraded=True")
            wait_for(lambda: mirror.weights[-1:] == [0], WAIT, "the ConfigMap at 0%")
            wait_for_events(cluster, "slow", {"AnalysisFailed", "RolledBack"}, WAIT, kind="Warning")
        assert mirror.weights == [10, 0]
        bd = cluster.get("bd", "slow")
        state = bd["status"]["rollout"]
        assert state["failedAnalyses"] == 2 and state["weight"] == 0
        assert [(r["weight"], r["result"]) for r in state["analyses"]] == [(10, "fail"), (10, "fail")]
        assert all(r["arms"]["baton"]["p95"] > r["arms"]["incumbent"]["p95"] for r in state["analyses"])
        assert {"p95Latency", "ttft"} <= set(state["analysis"]["failedChecks"])
        assert bd["status"]["phase"] == "Degraded" and bd["status"]["traffic"]["weight"] == 0
        assert _condition(cluster, "slow", "Degraded")["reason"] == "RolledBack"
        decisions = [dict(s.attributes) for s in spans.get_finished_spans() if s.name == "baton.rollout"]
        rollback = next(a for a in decisions if a["baton.action"] == "rollback")
        assert rollback["baton.name"] == "slow" and rollback["baton.weight"] == 0
        assert rollback["baton.phase"] == "RolledBack" and rollback["baton.result"] == "fail"
        assert "p95Latency" in rollback["baton.failed_checks"] and rollback["baton.outcome"] == "ok"
        assert [a["baton.action"] for a in decisions if a["baton.action"] != "wait"][0] == "start"
    finally:
        stub.close()


def test_abort_and_auto_tune(cluster, stub, tmp_path) -> None:
    # The KV slot counters say 0.85 over each round, within a step of the admission cap (0.9): auto-tune
    # lowers the cap. (The instantaneous gauge's 0.2 would have raised it.)
    stub.padding_ratio, stub.kv_padding_ratio = 0.2, 0.85
    rollout = {**ROLLOUT, "manualGates": [50], "autoTune": {
        "enabled": True, "stepSize": 0.1, "maxPaddingRatio": {"min": 0.6, "max": 0.95},
        "compactionThreshold": {"min": 0.3, "max": 0.6}}}  # still accepted by the CRD, and ignored
    with ConfigMirror(cluster, "tuned", stub.apply_config) as mirror, running_operator(cluster):
        apply_object(cluster, batondeployment("tuned", "http://127.0.0.1:9", stub.url, rollout), tmp_path)
        wait_for(lambda: (rollout_status(cluster, "tuned").get("autoTune") or {}).get("changes"), WAIT,
                 "an auto-tune change")
        change = rollout_status(cluster, "tuned")["autoTune"]["changes"][0]
        assert change["knob"] == "maxPaddingRatio" and change["from"] == 0.9 and change["to"] == 0.8
        assert change["paddingRatio"] == 0.85
        config = wait_for(lambda: (c := _config(cluster, "tuned")) and
                          c["policy"]["padding"]["max_padding_ratio"] == 0.8 and c, WAIT,
                          "the tuned cap in the ConfigMap")
        assert config["policy"]["padding"]["compaction_threshold"] == DEFAULT_POLICY["padding"]["compaction_threshold"]
        assert config["router"]["baton_weight"] == 10  # the weight is untouched by tuning
        wait_for_events(cluster, "tuned", {"PolicyTuned"}, WAIT)

        cluster.kubectl("patch", "bd", "tuned", "--type=merge", "-p", '{"spec": {"rollout": {"abort": true}}}')
        wait_for_phase(cluster, "tuned", "Aborted", WAIT)
        wait_for(lambda: mirror.weights[-1:] == [0], WAIT, "the ConfigMap at 0%")
        wait_for(lambda: _condition(cluster, "tuned", "Degraded").get("reason") == "Aborted", WAIT,
                 "Degraded=True/Aborted")
        cluster.kubectl("patch", "bd", "tuned", "--type=merge", "-p", '{"spec": {"rollout": {"abort": false}}}')
        wait_for(lambda: rollout_status(cluster, "tuned").get("phase") in ("Progressing", "AwaitingApproval"),
                 WAIT, "the rollout to start again")
        wait_for(lambda: mirror.weights[-1:] == [10], WAIT, "the ConfigMap back at the first step")
    assert mirror.weights[:3] == [10, 0, 10]


def _config(cluster, name):
    cm = cluster.get("configmaps", f"{name}-baton-config")
    return yaml.safe_load(cm["data"]["baton.yaml"]) if cm else None


def test_finds_sidecars_through_endpoint_slices_and_removing_the_rollout_ends_it(cluster, stub, tmp_path) -> None:
    port = int(stub.url.rsplit(":", 1)[1])  # the stub plays a pod at 127.0.0.1 serving Baton on spec.port
    bd = batondeployment("sliced", "http://127.0.0.1:9", stub.url, {**ROLLOUT, "manualGates": [50]}, port=port)
    del bd["metadata"]["annotations"]
    endpoint_slice = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "sliced-abcde", "labels": {"kubernetes.io/service-name": "sliced"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}},
                      {"addresses": ["127.0.0.2"], "conditions": {"ready": False}}]}
    apply_object(cluster, endpoint_slice, tmp_path)
    with ConfigMirror(cluster, "sliced", stub.apply_config), \
            running_operator(cluster, env={"BATON_ROLLOUT_ALLOW_REPORT_URLS": "false"}):
        apply_object(cluster, bd, tmp_path)
        _deployment_available(cluster, "sliced")
        wait_for_phase(cluster, "sliced", "AwaitingApproval", WAIT)
        assert rollout_status(cluster, "sliced")["analysis"]["pods"] == 1  # the unready endpoint is left out

        # Without spec.rollout the reconciler owns the weight again (spec.router.weight) and the state goes.
        cluster.kubectl("patch", "bd", "sliced", "--type=json", "-p",
                        '[{"op": "remove", "path": "/spec/rollout"},'
                        ' {"op": "add", "path": "/spec/router/weight", "value": 100}]')
        wait_for(lambda: "rollout" not in (cluster.get("bd", "sliced").get("status") or {}), WAIT,
                 "status.rollout to be cleared")
        wait_for(lambda: _config(cluster, "sliced")["router"]["baton_weight"] == 100, WAIT, "spec.router.weight")
        bd = cluster.get("bd", "sliced")
        assert bd["status"]["phase"] == "Ready" and _condition(cluster, "sliced", "Progressing")["status"] == "False"


SHADOWED = {**ROLLOUT, "steps": [10, 100], "manualGates": [100],
            "shadow": {"percent": 50, "minPairs": 20, "maxDurationSeconds": 300}}


def test_shadow_stage_resumes_after_a_restart_and_passes_to_the_first_step(cluster, stub, tmp_path) -> None:
    stub.paired_verdict = "insufficient"  # undecided at first: the stage holds, a fixed point to restart at
    with ConfigMirror(cluster, "mirrored", stub.apply_config) as mirror:
        with running_operator(cluster):
            apply_object(cluster, batondeployment("mirrored", "http://127.0.0.1:9", stub.url, SHADOWED), tmp_path)
            _deployment_available(cluster, "mirrored")
            held = wait_for(lambda: (r := rollout_status(cluster, "mirrored")).get("phase") == "Shadowing"
                            and (r.get("shadow") or {}).get("pairs", 0) >= 20 and r, WAIT, "pairs in the status")
            wait_for(lambda: _condition(cluster, "mirrored", "Progressing").get("reason") == "TrafficShifting",
                     WAIT, "Progressing=True/TrafficShifting")
        assert held["weight"] == 0 and held["shadow"]["outcome"] == "running"
        assert held["shadow"]["verdict"] == "insufficient" and held["analysis"]["checks"][0]["result"] == "inconclusive"
        assert _config(cluster, "mirrored")["router"]["shadow_percent"] == 50
        assert stub.shadow_percent == 50 and stub.weight == 0
        started = held["history"]

        stub.paired_verdict = "better"
        with running_operator(cluster):  # resumes the stage: no new start, the same clock
            state = wait_for_phase(cluster, "mirrored", "AwaitingApproval", WAIT)
            reasons = wait_for_events(cluster, "mirrored", {"ShadowPassed", "RolloutAwaitingApproval"}, WAIT)
        wait_for(lambda: mirror.weights[-1:] == [10] and mirror.shadows[-1:] == [0], WAIT, "the first step")
    assert state["history"][0] == started[0] and [h["weight"] for h in state["history"]] == [0, 10]
    assert state["shadow"]["outcome"] == "passed" and state["shadow"]["verdict"] == "better"
    assert state["analysis"]["failedChecks"] == []  # the 10% step's own analysis, passed
    assert reasons.count("RolloutStarted") == 1
    # The first ConfigMap (mirroring off) can be replaced before a 0.2 s poll sees it, as between two of
    # kubelet's syncs: only what follows it is certain.
    assert mirror.weights == [0, 10] and mirror.shadows[-2:] == [50, 0] and mirror.shadows[:-2] in ([], [0])
    assert "shadow_percent" not in _config(cluster, "mirrored")["router"]


def test_shadow_stage_rolls_back_when_the_paired_verdict_is_worse(cluster, stub, tmp_path) -> None:
    stub.paired_verdict = "worse"
    with ConfigMirror(cluster, "shadowed", stub.apply_config) as mirror, running_operator(cluster):
        apply_object(cluster, batondeployment("shadowed", "http://127.0.0.1:9", stub.url, SHADOWED), tmp_path)
        _deployment_available(cluster, "shadowed")
        wait_for_phase(cluster, "shadowed", "RolledBack", WAIT)
        degraded = wait_for(lambda: (c := _condition(cluster, "shadowed", "Degraded")).get("status") == "True"
                            and c, WAIT, "Degraded=True")
        wait_for(lambda: mirror.shadows[-2:] == [50, 0], WAIT, "mirroring off")
        wait_for_events(cluster, "shadowed", {"AnalysisFailed", "RolledBack"}, WAIT, kind="Warning")
    assert mirror.weights == [0] and mirror.shadows[-2:] == [50, 0]  # Baton never served a client
    assert mirror.shadows[:-2] in ([], [0])  # the first ConfigMap may be replaced before a poll sees it
    bd = cluster.get("bd", "shadowed")
    state = bd["status"]["rollout"]
    assert state["failedAnalyses"] == 2 and state["weight"] == 0
    assert state["analysis"]["failedChecks"] == ["pairedVerdict"]
    assert state["shadow"]["outcome"] == "failed" and state["shadow"]["verdict"] == "worse"
    assert [(h["action"], h["weight"], h.get("shadowPercent")) for h in state["history"]] == [
        ("start", 0, 50), ("rollback", 0, None)]
    assert degraded["reason"] == "RolledBack" and "shadow stage" in degraded["message"]
    assert bd["status"]["phase"] == "Degraded" and bd["status"]["traffic"]["weight"] == 0
