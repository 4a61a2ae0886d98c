"""Shadow mode: the incumbent answers, Baton runs a copy that no client ever sees, and pairs are reported.

In-process tests use a scripted incumbent (exact bytes, so "the client got the incumbent's answer" is
checked byte for byte) and the session's real engine. The end-to-end test runs real processes: a
``transformers serve --continuous-batching`` incumbent and a ``baton-sidecar serve`` at weight 0
with ``shadow_percent: 100``, driven by the ``openai`` client.
"""

from __future__ import annotations

import concurrent.futures
import time

import openai
import pytest
import requests
import yaml

from baton_sidecar.config import Limits, PolicyConfig, RouterConfig
from baton_sidecar.engine import SamplingParams
from server_helpers import MODEL_NAME, SidecarProcess, StubIncumbent, metric_value

VERDICTS = {"better", "not_worse", "worse"}  # decisive verdicts


def wait_for_pairs(url: str, pairs: int, timeout_s: float = 120) -> dict:
    """The report once it has ``pairs`` pairs (copies may finish after the incumbent's answer)."""
    deadline = time.monotonic() + timeout_s
    while True:
        report = requests.get(url + "/baton/ab/report", timeout=60).json()
        if report["paired"]["pairs"] >= pairs or time.monotonic() > deadline:
            return report
        time.sleep(0.2)


@pytest.mark.parametrize("mode, body", [
    ("sse", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
             "temperature": 0, "stream": True}),
    ("json", {"model": MODEL_NAME, "prompt": "Count: 1, 2,", "max_tokens": 4, "temperature": 0}),
])
def test_the_client_gets_the_incumbents_bytes_and_a_pair_is_recorded(make_server, server_thread, mode, body):
    stub = StubIncumbent(server_thread, mode)
    try:
        url, app = make_server(router=RouterConfig(incumbent_url=stub.url, baton_weight=0, shadow_percent=100))
        for _ in range(3):
            resp = requests.post(url + "/v1/" + ("chat/completions" if mode == "sse" else "completions"),
                                 json=body, timeout=60)
            assert resp.status_code == 200 and resp.headers["x-baton-arm"] == "incumbent"
            assert resp.content == (b"".join(StubIncumbent.SSE_PARTS) if mode == "sse" else StubIncumbent.JSON_BODY)
        report = wait_for_pairs(url, 3)
    finally:
        stub.close()
    paired = report["paired"]
    assert paired["pairs"] == 3 and paired["shadowed"] == 3 and paired["verdict"] == "insufficient"
    assert paired["metrics"]["e2e"]["n"] == 3
    # The scripted incumbent streams its first content, so both arms have a TTFT.
    assert paired["metrics"]["ttft"]["n"] == (3 if mode == "sse" else 0)
    # Greedy pairs compare texts: the stub's canned text is not what the model writes.
    assert paired["agreement"]["greedy_pairs"] == 3 and paired["agreement"]["identical_share"] == 0
    assert report["arms"]["baton"]["count"] == 0 and report["arms"]["incumbent"]["count"] == 3
    assert report["router"]["shadow_percent"] == 100
    metrics = requests.get(url + "/baton/metrics", timeout=10).text  # copies are not Baton traffic
    assert not metric_value(metrics, "baton_e2e_request_latency_seconds_count", {"arm": "baton"})


def test_no_copy_while_the_engine_has_no_room(make_server, server_thread, engine):
    """A batch of one, held by a real request: the copy is refused, the client still answered."""
    stub = StubIncumbent(server_thread, "json")
    policy = PolicyConfig(limits=Limits(max_batch_size=1))
    stream = server_thread.run_sync(lambda: engine.submit([1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True)))
    try:
        url, app = make_server(router=RouterConfig(incumbent_url=stub.url, baton_weight=0, shadow_percent=100),
                               policy=policy)
        deadline = time.monotonic() + 60
        while engine.stats().running == 0:  # the holder is in the batch
            assert time.monotonic() < deadline
            time.sleep(0.01)
        resp = requests.post(url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2},
                             timeout=60)
        assert resp.status_code == 200 and resp.content == StubIncumbent.JSON_BODY
        paired = requests.get(url + "/baton/ab/report", timeout=60).json()["paired"]
        assert paired["shadowed"] == 0 and paired["skipped"] == {"batch_full": 1}
    finally:
        server_thread.run_sync(stream.cancel)
        stub.close()


def test_shadow_percent_is_a_validated_router_field():
    assert RouterConfig(shadow_percent=25).shadow_percent == 25
    for bad in (-1, 101, "10", True):
        with pytest.raises(ValueError, match="shadow_percent"):
            RouterConfig(shadow_percent=bad)


def test_shadow_mode_end_to_end_with_real_processes(tmp_path, hf_incumbent):
    """100 requests to a sidecar at weight 0 mirroring all of them: every answer is the incumbent's,
    and the report pairs all 100 with a verdict."""
    config = tmp_path / "baton.yaml"
    config.write_text(yaml.safe_dump({"router": {"incumbent_url": hf_incumbent.url, "baton_weight": 0,
                                                 "shadow_percent": 100}}))
    sidecar = SidecarProcess("--served-model-name", MODEL_NAME, "--threads", "1", "--config", str(config),
                             env={"OMP_NUM_THREADS": "1"}, timeout=240)
    before = hf_incumbent.served()
    try:
        client = openai.OpenAI(base_url=sidecar.url + "/v1", api_key="unused", timeout=120, max_retries=0)

        def one(i: int) -> tuple[str, str]:
            if i % 2:
                raw = client.chat.completions.with_raw_response.create(
                    model=MODEL_NAME, messages=[{"role": "user", "content": f"Name a colour. ({i})"}],
                    max_tokens=4, temperature=0, stream=i % 4 == 1)
            else:
                raw = client.completions.with_raw_response.create(
                    model=MODEL_NAME, prompt=f"Item {i}: the", max_tokens=4, temperature=0)
            return raw.headers["x-baton-arm"], raw.http_response.status_code

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(one, range(100)))
        assert answers == [("incumbent", 200)] * 100  # 25 of them streamed (i % 4 == 1)
        assert hf_incumbent.served() - before == 100
        report = wait_for_pairs(sidecar.url, 100)
    finally:
        sidecar.stop()
    paired = report["paired"]
    assert paired["pairs"] == 100 and paired["shadowed"] == 100, paired
    # A verdict from the data, never for want of pairs: with the CI across the margin's edge
    # (both arms share two cores here, so the difference moves from run to run) it is
    # "insufficient", and the basis says so.
    assert paired["verdict"] in VERDICTS or "straddles" in paired["basis"], paired["basis"]
    assert report["arms"]["baton"]["count"] == 0 and report["arms"]["incumbent"]["count"] == 100
    agreement = paired["agreement"]
    assert agreement["greedy_pairs"] == 100 and agreement["identical_share"] is not None
    # Every pair has e2e; TTFT (and so per-token latency) only where the incumbent streamed.
    for metric, n in (("e2e", 100), ("ttft", 25), ("tpot", 25)):
        block = paired["metrics"][metric]
        assert block["n"] == n and block["p_value"] is not None
        assert block["median_ci95"][0] <= block["median_diff_s"] <= block["median_ci95"][1]
    assert paired["contention"]["mean_incumbent_in_flight"] >= 1
