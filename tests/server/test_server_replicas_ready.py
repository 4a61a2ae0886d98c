"""Readiness gates a Service of several replicas while their models load.

Three real ``baton-sidecar serve`` processes stand for a standalone BatonDeployment scaled to three
pods: one is serving, two have just started. No Kubernetes can be had here, so the test plays the
endpoints controller and kube-proxy as they behave: a replica is an endpoint of the Service while its
readiness probe (``/baton/ready``, the path the operator puts on the container) answers 200, and
requests go round-robin over the endpoints. Scaling out must never route a request to a cold pod, and a
cold pod reached directly must refuse at once (503 ``not_ready``), not hang.
"""

from __future__ import annotations

import collections
import time

import pytest
import requests

from prometheus_client.parser import text_string_to_metric_families

from server_helpers import MODEL_NAME, SidecarProcess

pytestmark = pytest.mark.model

READY_PATH = "/baton/ready"


def probe(replica: SidecarProcess) -> int:
    return requests.get(replica.url + READY_PATH, timeout=5).status_code


def requests_served(replica: SidecarProcess) -> float:
    """Baton's finished requests, all finish reasons, read with Prometheus' own parser."""
    text = requests.get(replica.url + "/baton/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "baton_requests_total" and sample.labels.get("arm") == "baton")


def complete(replica: SidecarProcess) -> requests.Response:
    body = {"model": MODEL_NAME, "prompt": "Count to three:", "max_tokens": 4}
    return requests.post(replica.url + "/v1/completions", json=body, timeout=120)


def test_only_ready_replicas_are_endpoints_while_others_load() -> None:
    replicas = [SidecarProcess("--served-model-name", MODEL_NAME)]
    try:
        # Scale out to three: a new pod listens (liveness passes) before its model is loaded; at that
        # moment it is no endpoint, and a request reaching it anyway is refused at once.
        for _ in range(2):
            replicas.append(SidecarProcess("--served-model-name", MODEL_NAME, wait_ready=False))
            assert probe(replicas[-1]) == 503
            refused = complete(replicas[-1])
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"

        served: collections.Counter[int] = collections.Counter()
        turn = 0
        deadline = time.monotonic() + 300
        while True:  # route through the "Service" until every replica has become an endpoint
            endpoints = [i for i, r in enumerate(replicas) if probe(r) == 200]
            assert 0 in endpoints  # the serving pod never drops out while the others load
            if len(endpoints) == 3 or time.monotonic() > deadline:
                break
            target = endpoints[turn % len(endpoints)]
            turn += 1
            resp = complete(replicas[target])
            assert resp.status_code == 200, resp.text
            served[target] += 1
        assert len(endpoints) == 3, "the new replicas never became ready"

        for i, replica in enumerate(replicas):  # now all three take their share
            assert complete(replica).status_code == 200
            served[i] += 1
        # Each answered exactly what was routed to it (the refusal while loading is no finished request).
        assert [requests_served(r) for r in replicas] == [served[i] for i in range(3)]
    finally:
        for replica in replicas:
            replica.stop()
