"""Every HTTP rejection path, with OpenAI-style error bodies; no client mistake yields a 5xx."""

import asyncio
import concurrent.futures
import json
import time

import aiohttp
import pytest
import requests

from baton_sidecar.config import Limits, PolicyConfig, ServerConfig
from baton_sidecar.engine import AdmissionError
from baton_sidecar.server.app import drain
from baton_sidecar.server.local import admission_error
from server_helpers import MODEL_NAME

pytestmark = pytest.mark.model

CHAT = [{"role": "user", "content": "hi"}]


def post(url, path, body=None, raw=None, headers=None, timeout=60):
    return requests.post(url + path, json=body if raw is None else None, data=raw,
                         headers=headers, timeout=timeout)


def assert_error(resp, status, param=None, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param and param in err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def test_malformed_json_is_400(server):
    assert_error(post(server, "/v1/completions", raw=b'{"prompt": "x",'), 400, "body", "invalid_json")
    assert_error(post(server, "/v1/chat/completions", raw=b"[1]"), 400, "body", "invalid_json")
    assert_error(post(server, "/v1/completions", raw=b"\xff\xfe\x00"), 400, "body")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "max_tokens": "3"}, "max_tokens"),
    ("/v1/completions", {"prompt": {"a": 1}}, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": [1]}, "temperature"),
    ("/v1/completions", {"prompt": "x", "stop": {"a": 1}}, "stop"),
    ("/v1/completions", {"prompt": "x", "stream": 1}, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": "2", "logprobs": True},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "seed": 1.5}, "seed"),
])
def test_wrong_types_are_400_naming_the_field(server, path, body, param):
    assert_error(post(server, path, {"model": MODEL_NAME, **body}), 400, param, "invalid_type")


def test_n_out_of_range_is_400(server):
    assert_error(post(server, "/v1/chat/completions", {"messages": CHAT, "n": 0}), 400, "n")
    assert_error(post(server, "/v1/completions", {"prompt": "x", "n": 2, "best_of": 1}), 400, "best_of")


def test_unknown_model_is_404(server):
    err = assert_error(post(server, "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404,
                       "model", "model_not_found")
    assert "gpt-9" in err["message"]


def test_body_over_limit_is_413(make_server):
    url, _ = make_server(server=ServerConfig(served_model_name=MODEL_NAME, max_body_bytes=2048))
    big = json.dumps({"prompt": "x" * 4096}).encode()
    assert_error(post(url, "/v1/completions", raw=big), 413, "body", "request_too_large")

    def chunked():  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(big), 512):
            yield big[i:i + 512]
    assert_error(post(url, "/v1/completions", raw=chunked()), 413, code="request_too_large")


def test_prompt_longer_than_the_context_is_400(server, engine):
    too_long = post(server, "/v1/completions",
                    {"prompt": "x", "max_tokens": engine.max_model_len + 1})
    assert_error(too_long, 400, "max_tokens")
    ids = post(server, "/v1/completions", {"prompt": [len(engine.tokenizer) + 5]})
    assert_error(ids, 400, "prompt")


@pytest.mark.parametrize("caps, param", [({"max_completion_tokens": 10 ** 6}, "max_completion_tokens"),
                                         ({"max_completion_tokens": 10 ** 6, "max_tokens": 1},
                                          "max_completion_tokens"),
                                         ({"max_tokens": 10 ** 6}, "max_tokens")])
def test_chat_cap_over_the_context_is_400_naming_the_field_sent(server, caps, param):
    resp = post(server, "/v1/chat/completions", {"messages": CHAT, **caps})
    assert_error(resp, 400, param, "invalid_value")


@pytest.mark.parametrize("prompt", ["\x1d", "\x04\x06\x13", "\x1d" * 5000])
def test_prompt_of_characters_the_tokenizer_drops_is_400(server, prompt):
    """SmolLM2's tokenizer drops a few control characters; a prompt of only those has no tokens
    (the long one is tokenized on the worker thread, the short one by the engine)."""
    resp = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    err = assert_error(resp, 400, "prompt", "invalid_value")
    assert "no tokens" in err["message"]


@pytest.mark.parametrize("path, field_name", [("/v1/completions", "temperature"),
                                              ("/v1/chat/completions", "top_p")])
def test_number_past_the_float_range_is_400(server, path, field_name):
    """A 400-digit integer literal is a Python int no float holds: refused, not a 500."""
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": CHAT}
    raw = json.dumps({**body, "max_tokens": 1})[:-1] + f', "{field_name}": 1{"0" * 400}}}'
    resp = post(server, path, raw=raw.encode(), headers={"Content-Type": "application/json"})
    assert_error(resp, 400, field_name, "invalid_type")


def test_kv_budget_too_large_is_400(make_server, engine, server_thread):
    small = PolicyConfig(limits=Limits(max_kv_tokens=64))
    server_thread.run_sync(lambda: engine.apply_policy(small))
    try:
        url, _ = make_server()
        resp = post(url, "/v1/completions", {"prompt": "hello", "max_tokens": 100})
        assert_error(resp, 400, "prompt", "context_length_exceeded")
    finally:
        server_thread.run_sync(lambda: engine.apply_policy(PolicyConfig()))


def test_a_queued_request_a_tighter_policy_can_never_run_is_400_as_at_admission(make_server, engine, server_thread):
    """Accepted under the old KV budget, queued, then the budget shrinks below what it needs alone:
    its client gets admission's 400, not a 500, and not a wait forever."""
    roomy = PolicyConfig(limits=Limits(max_batch_size=1, max_kv_tokens=4000))
    try:
        url, _ = make_server(policy=roomy)
        server_thread.run_sync(lambda: engine.apply_policy(roomy))
        with requests.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 400, "stream": True,
                                                            "ignore_eos": True}, stream=True, timeout=60) as holder:
            chunks = holder.iter_content(None)  # kept: a generator let go closes the connection
            next(chunks)  # it holds the only row
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                queued = pool.submit(post, url, "/v1/completions", {"prompt": "hello " * 40, "max_tokens": 300})
                deadline = time.monotonic() + 30
                while engine.stats().waiting < 1 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert engine.stats().waiting == 1
                server_thread.run_sync(lambda: engine.apply_policy(
                    PolicyConfig(limits=Limits(max_batch_size=1, max_kv_tokens=320))))
                err = assert_error(queued.result(timeout=30), 400, "prompt", "context_length_exceeded")
        assert "no longer fit" in err["message"]
    finally:
        server_thread.run_sync(lambda: engine.apply_policy(PolicyConfig()))


def test_unknown_sla_class_is_400(server):
    resp = post(server, "/v1/chat/completions", {"messages": CHAT, "sla_class": "platinum"})
    assert_error(resp, 400, "sla_class")


def test_queue_full_is_429_with_retry_after(make_server, engine, server_thread):
    tight = PolicyConfig(limits=Limits(max_batch_size=1, max_queue=1))
    server_thread.run_sync(lambda: engine.apply_policy(tight))
    try:
        url, _ = make_server()
        # Submissions in one loop tick: one runs, one waits, the next find the queue full.
        async def burst():
            async with aiohttp.ClientSession() as s:
                async def one():
                    async with s.post(url + "/v1/completions",
                                      json={"prompt": "hi", "max_tokens": 2}) as r:
                        return r.status, dict(r.headers), await r.json()
                return await asyncio.gather(*(one() for _ in range(4)))
        results = asyncio.run(burst())
        refused = [r for r in results if r[0] == 429]
        assert refused and all(r[0] in (200, 429) for r in results)
        status, headers, body = refused[0]
        assert int(headers["Retry-After"]) >= 1 and body["error"]["code"] == "queue_full"
    finally:
        server_thread.run_sync(lambda: engine.apply_policy(PolicyConfig()))


def test_not_ready_is_503(make_server):
    url, _ = make_server(engine_override=None)  # the model is still loading
    assert requests.get(url + "/baton/health", timeout=5).status_code == 200
    ready = requests.get(url + "/baton/ready", timeout=5)
    assert ready.status_code == 503 and ready.json() == {"status": "loading"}
    assert_error(post(url, "/v1/completions", {"prompt": "x"}), 503, code="not_ready")


def test_draining_is_503(make_server, server_thread):
    url, app = make_server()
    assert server_thread.call(drain(app, 1.0))
    assert requests.get(url + "/baton/ready", timeout=5).status_code == 503
    resp = post(url, "/v1/chat/completions", {"messages": CHAT})
    assert_error(resp, 503, code="shutting_down")
    assert resp.headers["Retry-After"]


def test_engine_admission_errors_map_to_statuses():
    full = admission_error(AdmissionError("queue_full", "full", retry_after_s=2.5), "chat")
    assert full.status == 429 and full.headers["Retry-After"] == "3"
    big = admission_error(AdmissionError("too_large", "big"), "chat")
    assert big.status == 400 and big.param == "messages"
    down = admission_error(AdmissionError("shutting_down", "bye"), "completion")
    assert down.status == 503 and down.code == "shutting_down"


def test_unknown_route_and_method(server):
    assert_error(requests.get(server + "/v1/nothing", timeout=5), 404)
    resp = requests.get(server + "/v1/completions", timeout=5)
    assert_error(resp, 405)
    assert "POST" in resp.headers.get("Allow", "")


def test_admin_disabled_without_token(server):
    assert_error(requests.put(server + "/baton/admin/config", json={}, timeout=5), 404)
    assert_error(requests.get(server + "/baton/admin/config", timeout=5), 404)


def test_admin_rejections(make_server):
    url, _ = make_server(server=ServerConfig(served_model_name=MODEL_NAME, admin_token="t0k"))
    assert_error(requests.put(url + "/baton/admin/config", json={}, timeout=5), 401)
    assert_error(requests.put(url + "/baton/admin/config", json={},
                              headers={"Authorization": "Bearer nope"}, timeout=5), 401)
    ok = {"Authorization": "Bearer t0k"}
    bad = requests.put(url + "/baton/admin/config", json={"router": {"baton_weight": 150}}, headers=ok,
                       timeout=5)
    assert_error(bad, 400, "router.baton_weight", "invalid_config")
    bad = requests.put(url + "/baton/admin/config", data=b"{{", headers=ok, timeout=5)
    assert_error(bad, 400, code="invalid_config")
    assert requests.get(url + "/baton/admin/config", headers=ok, timeout=5).status_code == 200


def test_wrong_values_never_yield_5xx(server):
    """A sweep of odd values for every field: each answer is a 200 or a 4xx with an error body."""
    values = [True, -1, 1.5, "x", "", [None], {"a": 1}, 10 ** 30]
    common = ["model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "user",
              "priority", "ignore_eos", "sla_class", "stream_options", "stop_token_ids",
              "logit_bias", "logprobs"]
    routes = {
        "completions": ({"prompt": "x", "max_tokens": 1},
                        common + ["prompt", "best_of", "echo", "suffix"]),
        "chat/completions": ({"messages": CHAT, "max_tokens": 1},
                             common + ["messages", "max_completion_tokens", "top_logprobs",
                                       "response_format", "tools"]),
    }
    cases = [(route, {**good, name: value}) for route, (good, names) in routes.items()
             for name in names for value in values]

    async def sweep():
        sem = asyncio.Semaphore(16)
        async with aiohttp.ClientSession() as s:
            async def one(route, body):
                async with sem, s.post(f"{server}/v1/{route}", data=json.dumps(body)) as r:
                    return route, body, r.status, await r.text()
            return await asyncio.gather(*(one(r, b) for r, b in cases))

    results = asyncio.run(asyncio.wait_for(sweep(), 240))
    for route, body, status, text in results:
        assert status < 500, (route, body, text)
        if status != 200:
            assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    assert {status for *_, status, _ in results} >= {200, 400}


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("path, raw, param, code", [
    ("/v1/completions", rb'{"prompt": "a\ud800b", "max_tokens": 1}', "prompt", "invalid_value"),
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "\udfff"}]}',
     "messages[0].content", "invalid_value"),
    ("/v1/completions", rb'{"prompt": "x", "stop": ["ok", "\ud800"]}', "stop[1]", "invalid_value"),
    ("/v1/chat/completions",
     rb'{"messages": [{"role": "user", "content": "hi"}], "user": "\uDBFF"}', "user",
     "invalid_value"),
    ("/v1/completions", b'{"prompt": ' + DEEP + b"}", "body", "invalid_json"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": '
     + b"9" * 5000 + b"}", "body", "invalid_json"),
])
def test_undecodable_text_and_json_are_400_naming_the_field(server, path, raw, param, code):
    resp = post(server, path, raw=raw, headers={"Content-Type": "application/json"})
    err = assert_error(resp, 400, param, code)
    assert err["type"] == "invalid_request_error"


def test_surrogate_pairs_are_served_with_refusal_null(server):
    """An emoji escaped as a valid pair is one code point: it reaches the tokenizer and is served.
    Chat answers carry OpenAI's ``refusal: null`` (message, and the opening delta of a stream)."""
    raw = rb'{"messages": [{"role": "user", "content": "\ud83d\ude00"}], "max_tokens": 1'
    headers = {"Content-Type": "application/json"}
    resp = post(server, "/v1/chat/completions", raw=raw + b"}", headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["refusal"] is None
    resp = post(server, "/v1/chat/completions", raw=raw + b', "stream": true}', headers=headers)
    assert resp.status_code == 200, resp.text
    first = json.loads(resp.text.split("\n\n")[0].removeprefix("data: "))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
