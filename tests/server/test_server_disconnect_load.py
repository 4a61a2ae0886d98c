"""Client disconnects cancel engine work; a bounded overload answers only 200 or 429."""

import asyncio
import socket
import time

import aiohttp
import pytest
import requests

from baton_sidecar.config import ServerConfig
from server_helpers import MODEL_NAME, metric_value

pytestmark = pytest.mark.model

ADMIN = {"Authorization": "Bearer load-test"}


def wait_idle(url: str, engine, timeout: float = 30.0) -> str:
    """Poll /metrics until nothing runs or waits, anywhere; the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        text = requests.get(url + "/baton/metrics", timeout=5).text
        busy = [metric_value(text, "baton_requests_running", {"arm": "baton"}),
                metric_value(text, "baton_engine_running_requests"),
                metric_value(text, "baton_engine_waiting_requests")]
        if busy == [0, 0, 0] or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def open_stream(url: str, body: bytes, path: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_in_the_engine(server, engine, stream):
    body = (b'{"model": "%s", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true,'
            b' "stream": %s}' % (MODEL_NAME.encode(), b"true" if stream else b"false"))
    sock = open_stream(server, body, "/v1/completions")
    try:
        if stream:
            got = b""
            while got.count(b"data: ") < 2:  # headers plus two tokens: mid-stream for sure
                got += sock.recv(65536)
        else:
            deadline = time.monotonic() + 60
            while engine.stats().running == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
        steps_at_close = engine.stats().steps
    finally:
        sock.close()
    text = wait_idle(server, engine)
    assert metric_value(text, "baton_requests_running", {"arm": "baton"}) == 0
    assert metric_value(text, "baton_engine_running_requests") == 0
    assert metric_value(text, "baton_requests_total", {"arm": "baton", "finish_reason": "cancelled"}) == 1
    # Cancelled within a step or two of the close (not after the 400 tokens it asked for).
    assert engine.stats().steps - steps_at_close <= 2


def test_bounded_overload_200_or_429_and_healthy_after(make_server, engine, server_thread):
    url, app = make_server(server=ServerConfig(served_model_name=MODEL_NAME, admin_token="load-test"))
    tight = {"policy": {"limits": {"max_batch_size": 4, "max_queue": 4}}}
    assert requests.put(url + "/baton/admin/config", json=tight, headers=ADMIN, timeout=10).ok
    try:
        async def storm():
            conn = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=conn,
                                             timeout=aiohttp.ClientTimeout(total=240)) as s:
                async def one(i):
                    body = {"model": MODEL_NAME, "prompt": f"Request {i}:", "max_tokens": 2,
                            "stream": i % 2 == 0}
                    async with s.post(url + "/v1/completions", json=body) as r:
                        text = await r.text()
                        return r.status, r.headers.get("Retry-After"), text
                return await asyncio.gather(*(one(i) for i in range(200)),
                                            return_exceptions=True)
        results = asyncio.run(storm())
    finally:
        restore = {"policy": {"limits": {"max_batch_size": 32, "max_queue": 256}}}
        requests.put(url + "/baton/admin/config", json=restore, headers=ADMIN, timeout=10)

    assert not [r for r in results if isinstance(r, BaseException)], "lost requests"
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    assert statuses.count(200) >= 4 and statuses.count(429) >= 1
    for status, retry_after, text in results:
        if status == 429:
            assert int(retry_after) >= 1 and '"queue_full"' in text
        else:  # streamed ones end with [DONE], plain ones carry usage
            assert text.endswith("data: [DONE]\n\n") or '"usage"' in text

    text = wait_idle(url, engine)
    assert metric_value(text, "baton_request_refusals_total",
                        {"arm": "baton", "reason": "queue_full"}) == statuses.count(429)
    served = sum(metric_value(text, "baton_requests_total", {"arm": "baton", "finish_reason": r}) or 0
                 for r in ("length", "stop"))
    assert served == statuses.count(200)
    assert requests.get(url + "/baton/health", timeout=5).status_code == 200
    assert requests.get(url + "/baton/ready", timeout=5).status_code == 200
    after = requests.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=60)
    assert after.status_code == 200
