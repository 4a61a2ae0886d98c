"""The drop-in rule against a real third-party incumbent (``transformers serve --continuous-batching``).

At weight 0 every request, whatever Baton thinks of it, gets exactly the answer the incumbent gives
when asked directly (status, content type, body modulo ids and timestamps, SSE event sequence). At
weight 100 what Baton can serve is Baton's and the rest is the incumbent's, counted by reason.
"""

from __future__ import annotations

import json
import re
import socket
import time
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from baton_sidecar.config import RouterConfig, ServerConfig
from server_helpers import MODEL_NAME

pytestmark = pytest.mark.model

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
VOLATILE = {"id", "created", "created_at", "system_fingerprint"}
CHAT = [{"role": "user", "content": "Say hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": {"type": "object", "properties": {}}}}]
LIMIT = 64 << 10  # the sidecar's --max-body-bytes in these tests


def chat(**extra: Any) -> dict:
    return {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 4, "temperature": 0, **extra}


def completion(**extra: Any) -> dict:
    return {"model": MODEL_NAME, "prompt": "The capital of France is", "max_tokens": 4,
            "temperature": 0, **extra}


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def chunked(data: bytes, size: int = 1000):
    """A body sent with Transfer-Encoding: chunked (no Content-Length)."""
    for i in range(0, len(data), size):
        yield data[i:i + size]


C, CC = "/v1/completions", "/v1/chat/completions"
# (name, method, path, body bytes or a callable making a fresh iterator, extra headers)
CASES: list[tuple[str, str, str, Any, dict]] = [
    ("completion", "POST", C, raw(completion()), {}),
    ("completion stream", "POST", C, raw(completion(stream=True)), {}),
    ("completion stream with usage", "POST", C,
     raw(completion(stream=True, stream_options={"include_usage": True})), {}),
    ("completion with stop", "POST", C, raw(completion(stop=["."], max_tokens=8)), {}),
    ("completion token-id prompt", "POST", C, raw(completion(prompt=[504, 3458, 282])), {}),
    ("completion echo", "POST", C, raw(completion(echo=True)), {}),
    ("completion best_of", "POST", C, raw(completion(best_of=2)), {}),
    ("chat", "POST", CC, raw(chat()), {}),
    ("chat stream", "POST", CC, raw(chat(stream=True)), {}),
    ("chat with tools", "POST", CC, raw(chat(tools=TOOLS)), {}),
    ("chat n=2", "POST", CC, raw(chat(n=2)), {}),
    ("chat json mode", "POST", CC, raw(chat(response_format={"type": "json_object"})), {}),
    ("chat frequency_penalty", "POST", CC, raw(chat(frequency_penalty=0.5)), {}),
    ("chat logit_bias", "POST", CC, raw(chat(logit_bias={"28": 5})), {}),
    ("chat sticky header and user", "POST", CC, raw(chat(user="u-1")), {"x-baton-session": "s1"}),
    ("another model (an adapter)", "POST", CC, raw(chat(model="my-lora-adapter")), {}),
    ("embeddings route", "POST", "/v1/embeddings", raw({"model": MODEL_NAME, "input": "x"}), {}),
    ("tokenize route", "POST", "/tokenize", raw({"model": MODEL_NAME, "prompt": "x"}), {}),
    ("responses route", "POST", "/v1/responses",
     raw({"model": MODEL_NAME, "input": "Say hi", "max_output_tokens": 4}), {}),
    ("incumbent health", "GET", "/health", None, {}),
    ("models", "GET", "/v1/models", None, {}),
    ("models, other method", "OPTIONS", "/v1/models", None,
     {"Origin": "http://x", "Access-Control-Request-Method": "GET"}),
    ("unknown route", "GET", "/no/such/route?x=1", None, {}),
    ("wrong method", "DELETE", C, None, {}),
    ("HEAD on a GET route", "HEAD", "/health", None, {}),
    ("malformed JSON", "POST", C, b'{"prompt": "x",', {"Content-Type": "application/json"}),
    ("a JSON array", "POST", CC, b"[1, 2]", {"Content-Type": "application/json"}),
    ("empty body", "POST", C, b"", {"Content-Type": "application/json"}),
    ("max_tokens of the wrong type", "POST", C, raw(completion(max_tokens="a")), {}),
    ("messages of the wrong type", "POST", CC, raw(chat(messages="x")), {}),
    ("lone surrogate", "POST", C, b'{"model": "baton-test", "prompt": "\\ud800 x", "max_tokens": 2}',
     {"Content-Type": "application/json"}),
    ("JSON nested 1000 deep", "POST", C, b'{"a":' * 1000 + b"1" + b"}" * 1000,
     {"Content-Type": "application/json"}),
    ("a 5000-digit integer", "POST", C, b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
     {"Content-Type": "application/json"}),
    ("large body (over the sidecar's limit)", "POST", CC,
     raw(chat(padding="x" * (2 * LIMIT))), {"Content-Type": "application/json"}),
    ("large body, chunked", "POST", C,
     lambda: chunked(raw(completion(padding="y" * (2 * LIMIT))), 4096),
     {"Content-Type": "application/json"}),
    ("small body, chunked", "POST", C, lambda: chunked(raw(completion()), 7),
     {"Content-Type": "application/json"}),
]


def normalise(value: Any) -> Any:
    """JSON with ids, timestamps and UUIDs masked: what differs between two identical requests."""
    if isinstance(value, dict):
        return {k: "<volatile>" if k in VOLATILE else normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    if isinstance(value, str):
        return UUID.sub("<uuid>", value)
    return value


def answer(resp: requests.Response) -> tuple:
    """(status, content type, body) with the body as normalised JSON, SSE events, or bytes."""
    ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    data = resp.content
    if ctype == "text/event-stream":
        events = []
        for block in data.decode().split("\n\n"):
            block = block.strip()
            payload = block[len("data:"):].strip() if block.startswith("data:") else None
            events.append(normalise(json.loads(payload)) if payload and payload != "[DONE]"
                          else block)
        return resp.status_code, ctype, events
    try:
        return resp.status_code, ctype, normalise(json.loads(data))
    except ValueError:
        return resp.status_code, ctype, data


def send(base: str, method: str, path: str, body: Any, headers: dict) -> requests.Response:
    data = body() if callable(body) else body
    return requests.request(method, base + path, data=data, headers=headers, timeout=120)


@pytest.fixture
def sidecar(make_server, hf_incumbent):
    def make(weight: float, served: str = MODEL_NAME) -> tuple[str, Any]:
        return make_server(server=ServerConfig(served_model_name=served, max_body_bytes=LIMIT),
                           router=RouterConfig(incumbent_url=hf_incumbent.url, baton_weight=weight))
    return make


def metric_samples(text: str, name: str) -> dict[tuple, float]:
    """Prometheus' own parser: {label values: value} of the samples called ``name``."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_weight_zero_changes_no_answer(sidecar, hf_incumbent):
    url, _ = sidecar(0)
    assert len(CASES) >= 25
    mismatches = []
    for name, method, path, body, headers in CASES:
        direct = answer(send(hf_incumbent.url, method, path, body, headers))
        through = send(url, method, path, body, headers)
        if answer(through) != direct:
            mismatches.append((name, direct, answer(through)))
        assert through.headers.get("x-baton-arm") in ("incumbent", None), name
    assert not mismatches, "\n".join(f"{n}:\n  direct  {d!r:.400}\n  sidecar {s!r:.400}"
                                     for n, d, s in mismatches)
    # Nothing went to Baton's engine, and nothing entered the A/B samples.
    report = requests.get(url + "/baton/ab/report", timeout=60).json()
    assert report["arms"]["baton"]["count"] == 0
    assert report["ineligible"]["count"] > 0 and report["eligible"]["count"] > 0


def test_a_client_leaving_a_passed_through_stream_is_let_go(sidecar, hf_incumbent):
    url, _ = sidecar(0)
    before = hf_incumbent.served(C)
    with requests.post(url + C, json=completion(stream=True, max_tokens=200), stream=True,
                       timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["x-baton-arm"] == "incumbent"
        next(resp.iter_content(None))  # the stream started; now hang up
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = requests.get(url + "/baton/metrics", timeout=10).text
        running = metric_samples(text, "baton_requests_running")
        if running[(("arm", "incumbent"),)] == 0:
            break
        time.sleep(0.1)
    assert running[(("arm", "incumbent"),)] == 0
    # The sidecar and the incumbent both serve the next request as before.
    again = requests.post(url + C, json=completion(), timeout=60)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4
    # The incumbent logs the abandoned stream when it has wound it down, which may come after this one.
    deadline = time.monotonic() + 20
    while hf_incumbent.served(C) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert hf_incumbent.served(C) == before + 2


ELIGIBLE = [("completion", C, completion()), ("completion stream", C, completion(stream=True)),
            ("chat", CC, chat()), ("chat stream", CC, chat(stream=True)),
            ("chat, model named", CC, chat(max_completion_tokens=3)),
            ("chat json mode", CC, chat(response_format={"type": "json_object"})),
            ("chat penalties and bias", CC, chat(frequency_penalty=0.5, presence_penalty=0.2, logit_bias={"28": 5})),
            ("chat n=2", CC, chat(n=2)), ("completion echo", C, completion(echo=True, logprobs=1)),
            ("completion best_of", C, completion(best_of=2)),
            ("chat tools", CC, chat(tools=TOOLS)), ("chat tools required", CC, chat(tools=TOOLS, tool_choice="required"))]
INELIGIBLE = [("unsupported:functions", CC, chat(functions=[{"name": "f"}])),
              ("unsupported:suffix", C, completion(suffix="!")),
              ("other_model", CC, chat(model="my-lora-adapter")),
              ("invalid:max_tokens", C, completion(max_tokens="a")),
              ("invalid:sla_class", C, completion(sla_class="no-such-class"))]


def test_weight_100_serves_what_baton_can_and_passes_the_rest(sidecar, hf_incumbent):
    url, _ = sidecar(100)
    before = hf_incumbent.served(status=r"\d+")
    for name, path, body in ELIGIBLE:
        resp = requests.post(url + path, json=body, timeout=120)
        assert resp.status_code == 200 and resp.headers["x-baton-arm"] == "baton", name
    for reason, path, body in INELIGIBLE:
        resp = requests.post(url + path, json=body, timeout=120)
        assert resp.headers.get("x-baton-arm") == "incumbent", (reason, resp.text)
    resp = requests.post(url + "/v1/embeddings", json={"input": "x"}, timeout=60)
    assert resp.status_code == 404 and resp.headers["x-baton-arm"] == "incumbent"
    resp = requests.post(url + C, data=b"{bad", timeout=60)
    assert resp.headers["x-baton-arm"] == "incumbent" and resp.status_code == 422  # its own error

    text = requests.get(url + "/baton/metrics", timeout=10).text
    counted = {dict(k)["reason"]: v for k, v in
               metric_samples(text, "baton_router_ineligible_total").items()}
    expected = {reason: 1.0 for reason, _, _ in INELIGIBLE}
    expected.update({"other_route": 1.0, "invalid:body": 1.0})
    assert counted == expected
    assert metric_samples(text, "baton_router_eligible_total") == {(): len(ELIGIBLE)}
    # Every ineligible request really reached the incumbent (its access log, any status), and
    # nothing else did.
    assert hf_incumbent.served(status=r"\d+") - before == len(INELIGIBLE) + 2  # + embeddings, the bad body

    report = requests.get(url + "/baton/ab/report", timeout=60).json()
    assert report["arms"]["baton"]["count"] == len(ELIGIBLE)
    assert report["arms"]["incumbent"]["count"] == 0  # ineligible traffic is not A/B traffic
    total = len(ELIGIBLE) + len(INELIGIBLE) + 2
    block = report["ineligible"]
    assert block["count"] == len(INELIGIBLE) + 2
    assert block["share"] == pytest.approx(block["count"] / total, abs=1e-4)
    assert report["eligible"] == {"count": len(ELIGIBLE),
                                  "share": pytest.approx(len(ELIGIBLE) / total, abs=1e-4)}
    assert {r["reason"]: r["count"] for r in block["top_reasons"]} == expected


def test_models_is_the_union_of_both_arms(sidecar, hf_incumbent):
    same, _ = sidecar(50)
    direct = requests.get(hf_incumbent.url + "/v1/models", timeout=30)
    through = requests.get(same + "/v1/models", timeout=30)
    assert through.content == direct.content  # Baton's name is the incumbent's: nothing to add
    other, _ = sidecar(50, served="baton-canary")
    ids = [m["id"] for m in requests.get(other + "/v1/models", timeout=30).json()["data"]]
    assert ids == [MODEL_NAME, "baton-canary"]


def test_own_routes_are_never_passed_on(sidecar):
    url, _ = sidecar(0)
    assert requests.get(url + "/baton/ready", timeout=10).json() == {"status": "ready"}
    assert requests.get(url + "/baton/health", timeout=10).json() == {"status": "ok"}
    assert "baton_router_baton_weight" in requests.get(url + "/baton/metrics", timeout=10).text
    # The incumbent's own /health and /metrics stay the incumbent's.
    assert requests.get(url + "/health", timeout=10).headers["x-baton-arm"] == "incumbent"
    resp = requests.post(url + "/baton/health", timeout=10)
    assert resp.status_code == 405 and resp.headers["Allow"] == "GET, HEAD"
    assert resp.json()["error"]["code"] == "405"
    resp = requests.get(url + "/baton/nothing", timeout=10)
    assert resp.status_code == 404 and "x-baton-arm" not in resp.headers


def test_standalone_keeps_its_own_answers(make_server):
    url, _ = make_server()  # no incumbent
    assert requests.get(url + "/health", timeout=10).json() == {"status": "ok"}
    assert requests.get(url + "/ready", timeout=10).json() == {"status": "ready"}
    assert "baton_router_baton_weight" in requests.get(url + "/metrics", timeout=10).text
    resp = requests.get(url + "/v1/completions", timeout=10)
    assert resp.status_code == 405 and resp.headers["Allow"] == "POST"
    resp = requests.post(url + "/v1/embeddings", json={"input": "x"}, timeout=10)
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "not_found_error"
    resp = requests.post(url + C, json=completion(suffix="!"), timeout=10)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "suffix"


def test_a_stalled_body_gets_408_and_does_not_hold_the_connection(make_server, hf_incumbent):
    url, _ = make_server(server=ServerConfig(served_model_name=MODEL_NAME, body_timeout_s=0.5),
                         router=RouterConfig(incumbent_url=hf_incumbent.url, baton_weight=0))
    host, port = url.removeprefix("http://").split(":")
    for path in (C, "/v1/responses"):  # a generation route, and a streamed pass-through
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: 100\r\n\r\n{{\"prompt\": ".encode())
            start = time.monotonic()
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            assert time.monotonic() - start < 5
        assert reply.startswith(b"HTTP/1.1 408"), (path, reply[:300])
        assert b'"request_timeout"' in reply
    text = requests.get(url + "/baton/metrics", timeout=10).text
    assert metric_samples(text, "baton_http_rejections_total") == {(("reason", "body_timeout"),): 2}
