"""Status: whether the Deployment rolled out (DeploymentProgress), conditions, phase, and transition stamps."""

from __future__ import annotations

import pytest

from baton_operator.kube import ApiError, classify, path
from baton_operator.status import (DeploymentProgress, Observation, Problem, build_status, conditions_for,
                                   deployment_progress, merge_conditions, phase_of, status_changed)

import kopf


def deployment(generation=2, replicas=2, containers=("vllm", "baton"), **status) -> dict:
    return {"metadata": {"name": "d", "generation": generation},
            "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": n} for n in containers]}}},
            "status": status}


@pytest.mark.parametrize("obj, done, reason", [
    (None, False, "DeploymentMissing"),
    (deployment(observedGeneration=1, updatedReplicas=2, replicas=2, availableReplicas=2), False, "RolloutPending"),
    (deployment(observedGeneration=2, updatedReplicas=1, replicas=3, availableReplicas=2), False, "RollingOut"),
    (deployment(observedGeneration=2, updatedReplicas=2, replicas=3, availableReplicas=2), False, "RollingOut"),
    (deployment(observedGeneration=2, updatedReplicas=2, replicas=2, availableReplicas=1), False, "RollingOut"),
    (deployment(observedGeneration=2, updatedReplicas=2, replicas=2, availableReplicas=2), True, "DeploymentAvailable"),
    (deployment(replicas=0, observedGeneration=2), True, "DeploymentAvailable"),
])
def test_deployment_progress(obj, done, reason) -> None:
    progress = deployment_progress(obj)
    assert (progress.done, progress.reason) == (done, reason)


def test_sidecar_progress_requires_the_container() -> None:
    ready = dict(observedGeneration=2, updatedReplicas=2, replicas=2, availableReplicas=2)
    assert deployment_progress(deployment(containers=("vllm",), **ready), "baton").reason == "SidecarMissing"
    assert deployment_progress(deployment(**ready), "baton").done


def _types(conditions):
    return {c["type"]: (c["status"], c["reason"]) for c in conditions}


def test_conditions_and_phase_for_each_situation() -> None:
    done = DeploymentProgress(True, "DeploymentAvailable", "ok")
    rolling = DeploymentProgress(False, "RollingOut", "1 of 2")
    cases = [
        (Observation(1), "Pending", {"Ready": "False", "Progressing": "True", "Degraded": "False"}),
        (Observation(1, progress=rolling), "Progressing",
         {"Ready": "False", "Progressing": "True", "Degraded": "False"}),
        (Observation(1, progress=done), "Ready", {"Ready": "True", "Progressing": "False", "Degraded": "False"}),
        (Observation(1, progress=done, warning=Problem("PolicyFallback", "x")), "Degraded",
         {"Ready": "True", "Progressing": "False", "Degraded": "True"}),
        (Observation(1, problem=Problem("TargetNotFound", "x")), "Degraded",
         {"Ready": "False", "Progressing": "False", "Degraded": "True"}),
        (Observation(1, problem=Problem("InvalidSpec", "x", permanent=True)), "Failed",
         {"Ready": "False", "Progressing": "False", "Degraded": "True"}),
    ]
    for obs, phase, statuses in cases:
        assert phase_of(obs) == phase
        assert {k: v[0] for k, v in _types(conditions_for(obs)).items()} == statuses
        assert all(c["observedGeneration"] == 1 for c in conditions_for(obs))


def test_transition_time_moves_only_when_the_status_flips() -> None:
    first = merge_conditions(None, conditions_for(Observation(1)), "T1")
    same = merge_conditions(first, conditions_for(Observation(2)), "T2")
    assert [c["lastTransitionTime"] for c in same] == ["T1", "T1", "T1"]
    done = DeploymentProgress(True, "A", "m")
    flipped = merge_conditions(same, conditions_for(Observation(2, progress=done)), "T3")
    assert {c["type"]: c["lastTransitionTime"] for c in flipped} == {"Ready": "T3", "Progressing": "T3",
                                                                      "Degraded": "T1"}


def test_build_status_and_change_detection() -> None:
    obs = Observation(4, progress=DeploymentProgress(True, "A", "m"), policy_hash="abc", policy_source="ns/p",
                      weight=5)
    status = build_status(obs, None, now="T")
    assert status["observedGeneration"] == 4 and status["policyHash"] == "abc" and status["traffic"] == {"weight": 5}
    assert not status_changed(status, build_status(obs, status, now="later"))
    assert status_changed(status, build_status(Observation(4, progress=DeploymentProgress(False, "B", "m")), status))
    assert "policyHash" not in build_status(Observation(4, problem=Problem("X", "y")), status)


@pytest.mark.parametrize("code, kind, delay", [
    (409, kopf.TemporaryError, 1), (422, kopf.PermanentError, None), (400, kopf.PermanentError, None),
    (403, kopf.TemporaryError, 60), (429, kopf.TemporaryError, 10), (500, kopf.TemporaryError, 5),
    (0, kopf.TemporaryError, 5),  # connection failure
])
def test_api_errors_map_to_kopf_retry_semantics(code, kind, delay) -> None:
    error = classify(ApiError(code, "Reason", "message"), "doing it")
    assert type(error) is kind
    if delay is not None:
        assert error.delay == delay


def test_paths() -> None:
    assert path("v1", "services", "ns", "s") == "/api/v1/namespaces/ns/services/s"
    assert path("apps/v1", "deployments", "ns") == "/apis/apps/v1/namespaces/ns/deployments"
    assert path("baton.dev/v1alpha1", "batondeployments", "ns", "b", "status") == \
        "/apis/baton.dev/v1alpha1/namespaces/ns/batondeployments/b/status"
