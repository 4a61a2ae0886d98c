"""A/B router: byte-exact pass-through, trace context, failures, fallback, and a 30/70 split against a
real third-party incumbent (``transformers serve``). Faults are injected with a scripted incumbent."""

import asyncio
import hashlib
import json
import time

import aiohttp
import pytest
import requests

from baton_sidecar.config import RouterConfig
from baton_sidecar.server.router import BATON, INCUMBENT
from server_helpers import MODEL_NAME, StubIncumbent, closed_port_url, metric_value

pytestmark = pytest.mark.model

CHAT = [{"role": "user", "content": "hi"}]
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def stub(server_thread):
    s = StubIncumbent(server_thread)
    yield s
    s.close()


def test_stream_passes_through_byte_exact_with_trace_context(make_server, stub):
    url, _ = make_server(router=RouterConfig(incumbent_url=stub.url, baton_weight=0))
    raw_body = b'{"model": "%s",   "messages": [{"role": "user", "content": "hi"}], "stream": true}' \
        % MODEL_NAME.encode()
    resp = requests.post(url + "/v1/chat/completions?x=1", data=raw_body, timeout=30,
                         headers={"traceparent": TRACEPARENT, "tracestate": "k=v",
                                  "Authorization": "Bearer client-key",
                                  "Content-Type": "application/json"})
    assert resp.status_code == 200 and resp.headers["x-baton-arm"] == INCUMBENT
    assert resp.content == b"".join(StubIncumbent.SSE_PARTS)
    assert resp.headers["Content-Type"] == "text/event-stream" and resp.headers["x-incumbent"] == "yes"
    headers, body = stub.received[-1]
    assert body == raw_body
    assert headers["traceparent"] == TRACEPARENT and headers["tracestate"] == "k=v"
    assert headers["Authorization"] == "Bearer client-key"


def test_json_passes_through_and_is_accounted(make_server, stub):
    stub.mode = "json"
    url, _ = make_server(router=RouterConfig(incumbent_url=stub.url, baton_weight=0))
    resp = requests.post(url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "x"},
                         timeout=30)
    assert resp.status_code == 200 and resp.content == StubIncumbent.JSON_BODY
    text = requests.get(url + "/baton/metrics", timeout=5).text
    assert metric_value(text, "baton_requests_total", {"arm": INCUMBENT, "finish_reason": "length"}) == 1
    assert metric_value(text, "baton_tokens_total", {"arm": INCUMBENT, "kind": "completion"}) == 5
    report = requests.get(url + "/baton/ab/report", timeout=30).json()
    assert report["arms"][INCUMBENT]["count"] == 1 and report["arms"][BATON]["count"] == 0


def test_incumbent_unreachable_is_502(make_server):
    dead = closed_port_url()
    url, _ = make_server(router=RouterConfig(incumbent_url=dead, baton_weight=0))
    resp = requests.post(url + "/v1/chat/completions", json={"messages": CHAT}, timeout=30)
    assert resp.status_code == 502
    err = resp.json()["error"]
    assert err["type"] == "upstream_error" and dead in err["message"] and "unreachable" in err["message"]
    text = requests.get(url + "/baton/metrics", timeout=5).text
    assert metric_value(text, "baton_incumbent_failures_total", {"kind": "connect"}) == 1
    report = requests.get(url + "/baton/ab/report", timeout=30).json()
    assert report["arms"][INCUMBENT]["errors"] == 1 and report["arms"][INCUMBENT]["error_rate"] == 1


def test_incumbent_5xx_passes_through_and_counts_against_it(make_server, stub):
    stub.mode = "500"
    url, _ = make_server(router=RouterConfig(incumbent_url=stub.url, baton_weight=0))
    resp = requests.post(url + "/v1/completions", json={"prompt": "x"}, timeout=30)
    assert resp.status_code == 500 and resp.json() == {"error": {"message": "boom"}}  # its own
    assert resp.headers["x-baton-arm"] == INCUMBENT
    text = requests.get(url + "/baton/metrics", timeout=5).text
    assert metric_value(text, "baton_incumbent_failures_total", {"kind": "status"}) == 1
    report = requests.get(url + "/baton/ab/report", timeout=30).json()
    assert report["arms"][INCUMBENT]["errors"] == 1


def test_incumbent_5xx_falls_back_when_asked(make_server, stub):
    stub.mode = "500"
    url, _ = make_server(router=RouterConfig(incumbent_url=stub.url, baton_weight=0,
                                             fallback_to_baton=True))
    resp = requests.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=60)
    assert resp.status_code == 200 and resp.headers["x-baton-arm"] == BATON


def test_incumbent_timeout_is_504(make_server, stub):
    stub.mode = "slow"
    url, _ = make_server(router=RouterConfig(incumbent_url=stub.url, baton_weight=0,
                                             incumbent_timeout_s=0.5))
    resp = requests.post(url + "/v1/completions", json={"prompt": "x"}, timeout=30)
    err = resp.json()["error"]
    assert resp.status_code == 504 and "did not answer" in err["message"]
    assert err["code"] == "incumbent_timeout"


def test_client_leaving_an_incumbent_stream_closes_the_upstream(make_server, stub):
    stub.mode = "stall"
    url, _ = make_server(router=RouterConfig(incumbent_url=stub.url, baton_weight=0))
    with requests.post(url + "/v1/chat/completions", stream=True, timeout=30,
                       json={"messages": CHAT, "stream": True}) as resp:
        assert next(resp.iter_content(None)).startswith(b"data: ")
    deadline = time.monotonic() + 10
    while stub.cancelled == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stub.cancelled == 1
    text = requests.get(url + "/baton/metrics", timeout=5).text
    assert metric_value(text, "baton_requests_running", {"arm": INCUMBENT}) == 0
    assert metric_value(text, "baton_requests_total", {"arm": INCUMBENT, "finish_reason": "cancelled"}) == 1


def test_incumbent_breaking_mid_stream_is_counted(make_server, stub):
    stub.mode = "break"
    url, _ = make_server(router=RouterConfig(incumbent_url=stub.url, baton_weight=0))
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        with requests.post(url + "/v1/chat/completions", stream=True, timeout=30,
                           json={"messages": CHAT, "stream": True}) as resp:
            assert resp.status_code == 200  # already sent when the incumbent broke off
            b"".join(resp.iter_content(None))
    text = requests.get(url + "/baton/metrics", timeout=5).text
    assert metric_value(text, "baton_incumbent_failures_total", {"kind": "stream"}) == 1
    assert metric_value(text, "baton_requests_running", {"arm": INCUMBENT}) == 0
    report = requests.get(url + "/baton/ab/report", timeout=30).json()
    assert report["arms"][INCUMBENT]["errors"] == 1


def test_fallback_to_baton_is_counted(make_server):
    url, _ = make_server(router=RouterConfig(incumbent_url=closed_port_url(), baton_weight=0,
                                             fallback_to_baton=True))
    resp = requests.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=120)
    assert resp.status_code == 200 and resp.headers["x-baton-arm"] == BATON
    text = requests.get(url + "/baton/metrics", timeout=5).text
    assert metric_value(text, "baton_router_fallbacks_total") == 1
    report = requests.get(url + "/baton/ab/report", timeout=30).json()
    assert report["fallbacks_to_baton"] == 1 and report["arms"][INCUMBENT]["errors"] == 1
    assert report["arms"][BATON]["count"] == 0  # re-served requests stay out of the comparison


async def _send_all(url: str, jobs: list[tuple[dict, dict]]) -> list[tuple[int, str, str]]:
    """POST every (headers, body) concurrently; (status, arm, body text) each."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        async def one(headers, body):
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            async with s.post(url + path, json=body, headers=headers) as r:
                return r.status, r.headers.get("x-baton-arm"), await r.text()
        return await asyncio.gather(*(one(h, b) for h, b in jobs))


def test_ab_split_30_70_with_a_real_incumbent(make_server, hf_incumbent):
    router = RouterConfig(incumbent_url=hf_incumbent.url, baton_weight=30)
    url, _ = make_server(router=router)
    before = hf_incumbent.served()
    jobs, expected = [], []
    for i in range(16):
        headers = {"x-baton-session": f"session-{i}"} if i % 2 == 0 else {}
        user = None if i % 2 == 0 else f"user-{i}"
        body = {"model": MODEL_NAME, "prompt": f"Count: {i},", "max_tokens": 2, "temperature": 0}
        if i % 4 < 2:
            body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": f"Hi {i}"}],
                    "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
        if user:
            body["user"] = user
        jobs.append((headers, body))
        # The documented rule, computed here rather than by the router's own code: the key is
        # "h:<sticky header>" or else "u:<user>", SHA-256, first 8 bytes as a point in [0, 100).
        key = f"h:{headers['x-baton-session']}" if headers else f"u:{user}"
        point = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2 ** 64 * 100
        expected.append(BATON if point < 30 else INCUMBENT)
    assert 0 < expected.count(BATON) < len(expected)

    first = asyncio.run(_send_all(url, jobs))
    again = asyncio.run(_send_all(url, jobs))  # sticky: same key, same arm
    for results in (first, again):
        assert [status for status, _, _ in results] == [200] * len(jobs)
        assert [arm for _, arm, _ in results] == expected
    for (status, arm, text), (_, body) in zip(first, jobs):
        if body.get("stream"):  # transformers serve ends a stream with its usage chunk, no [DONE]
            assert text.endswith("data: [DONE]\n\n" if arm == BATON else "\n\n")
            assert '"finish_reason":' in text.replace('": ', '":')
        else:
            assert 1 <= json.loads(text)["usage"]["completion_tokens"] <= 2

    n_inc = 2 * expected.count(INCUMBENT)
    n_baton = 2 * expected.count(BATON)
    assert hf_incumbent.served() - before == n_inc  # its access log: it really served its share

    report = requests.get(url + "/baton/ab/report", timeout=60).json()
    for arm, n in ((BATON, n_baton), (INCUMBENT, n_inc)):
        entry = report["arms"][arm]
        assert entry["count"] == n and entry["errors"] == 0 and entry["error_rate"] == 0
        assert entry["e2e_s"]["n"] == n
        assert entry["ttft_s"]["n"] >= sum(1 for (_, b), e in zip(jobs, expected)
                                           if e == arm and b.get("stream"))
        p95 = entry["e2e_s"]["p95"]
        assert p95["ci95"][0] <= p95["value"] <= p95["ci95"][1]
        assert entry["sla"]["evaluated"] == n and entry["sla"]["attainment"] is not None
    # Fewer than 20 samples in an arm: no verdict either way, and the report says why.
    assert min(n_baton, n_inc) < 20 and report["verdict"] == "inconclusive"
    for v in report["verdicts"].values():
        assert v["statistic"] == "p95" and v["reason"] == "insufficient samples"
        assert v["n"]["baton"] <= n_baton and v["n"]["incumbent"] <= n_inc
    assert report["router"]["baton_weight"] == 30

    text = requests.get(url + "/baton/metrics", timeout=5).text
    served = {arm: sum(metric_value(text, "baton_requests_total", {"arm": arm, "finish_reason": r})
                       or 0 for r in ("length", "stop")) for arm in (BATON, INCUMBENT)}
    assert served == {BATON: n_baton, INCUMBENT: n_inc}
    assert metric_value(text, "baton_e2e_request_latency_seconds_count", {"arm": INCUMBENT}) == n_inc
