"""Property-based fuzz of the two generation routes against a live standalone sidecar.

Hypothesis sends 540-560 bodies per route (``fuzz_bodies``), one at a time over a keep-alive
connection, to a sidecar with the real model and no incumbent, so Baton answers every one itself.
The property: every answer is a 2xx (JSON, or SSE ending in ``data: [DONE]`` with no error event)
or a 4xx with OpenAI's error body; never a 5xx, never a non-JSON error. Beyond it (``check_temper``,
``check_served``): a body is 413 exactly when it is over the limit; a valid body is served, within
its token cap, with no stop string in its text and logprobs exactly when asked; a body valid but for
one field is refused naming that field. Afterwards the sidecar is still healthy: ready, giving the
same greedy answer as before the run, and with nothing left counted as running. Runs are
derandomized: CI sees the same bodies every time. About 80 s for both routes on 2 CPUs.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from typing import Any

import pytest
import requests
from hypothesis import event, given, note, settings

from baton_sidecar.config import ServerConfig
from fuzz_bodies import (Case, CHAT, COMPLETIONS, CONTEXT, EXAMPLES, FUZZ, fuzz_plan, INT64_MAX, LIMIT, VOCAB)
from server_helpers import MODEL_NAME

pytestmark = pytest.mark.model


# -- checking answers ------------------------------------------------------------------------------

def _send(session: requests.Session, url: str, case: Case) -> requests.Response:
    data: Any = case.raw
    if case.chunked:  # no Content-Length: the limit is enforced while reading
        data = iter([case.raw[i:i + 1024] for i in range(0, len(case.raw), 1024)] or [b""])
    return session.post(url, data=data, headers=case.headers, timeout=60)


def _token_cap(route: str, body: dict[str, Any]) -> int:
    names = ("max_tokens",) if route == COMPLETIONS else ("max_completion_tokens", "max_tokens")
    caps = [body[n] for n in names if body.get(n) is not None]
    return caps[0] if caps else 16


def check_error(resp: requests.Response) -> dict[str, Any]:
    """A 4xx with OpenAI's error body; returns its ``error``."""
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:2000])
    assert resp.headers.get("Content-Type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    return err


def check_stream(resp: requests.Response, route: str, body: dict[str, Any] | None) -> None:
    assert resp.headers.get("Content-Type", "").startswith("text/event-stream"), resp.headers
    events = resp.content.decode("utf-8").split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], events[-3:]
    chunks = []
    for ev in events[:-2]:
        assert ev.startswith("data: "), ev
        chunk = json.loads(ev.removeprefix("data: "))
        assert "error" not in chunk, chunk  # an engine fault mid-stream
        chunks.append(chunk)
    by_index: dict[int, list[dict]] = {}  # each chunk carries one choice; n > 1 interleave
    for chunk in chunks:
        for choice in chunk["choices"]:
            by_index.setdefault(choice["index"], []).append(choice)
    texts, finishes = [], []
    for index, choices in sorted(by_index.items()):
        reasons = [c["finish_reason"] for c in choices]
        assert not any(reasons[:-1]) and reasons[-1], (index, reasons)  # once, last
        finishes.append(reasons[-1])
        if route == COMPLETIONS:
            texts.append("".join(c["text"] for c in choices))
        else:
            texts.append("".join(c["delta"].get("content") or "" for c in choices))
        if body is not None and not _wants_logprobs(route, body):
            assert all(c["logprobs"] is None for c in choices), choices
    usage = [c["usage"] for c in chunks if c.get("usage")]
    if body is not None:
        assert body.get("stream") is True
        assert bool(usage) == ((body.get("stream_options") or {}).get("include_usage") is True)
    check_served(route, body, texts, finishes, usage[-1] if usage else None)


def check_json(resp: requests.Response, route: str, body: dict[str, Any] | None) -> None:
    assert resp.headers.get("Content-Type", "").startswith("application/json"), resp.headers
    answer = resp.json()
    choices = answer["choices"]
    assert [c["index"] for c in choices] == list(range(len(choices))), choices
    if route == COMPLETIONS:
        assert answer["object"] == "text_completion"
        texts = [c["text"] for c in choices]
    else:
        assert answer["object"] == "chat.completion"
        texts = [c["message"]["content"] for c in choices]
        for c, text in zip(choices, texts):  # no content only beside tool calls
            assert isinstance(text, str) or c["message"].get("tool_calls"), c
    if body is not None:
        assert body.get("stream") is not True
        assert all((c["logprobs"] is not None) == _wants_logprobs(route, body) for c in choices), choices
    check_served(route, body, [t or "" for t in texts], [c["finish_reason"] for c in choices], answer["usage"])


def _wants_logprobs(route: str, body: dict[str, Any]) -> bool:
    lp = body.get("logprobs")
    return lp is True if route == CHAT else lp is not None


def check_served(route: str, body: dict[str, Any] | None, texts: list[str], finishes: list[str],
                 usage: dict[str, int] | None) -> None:
    """A served answer against what was asked: one choice per ``n``, the token cap (summed over
    the choices in usage), and no stop string in a generated text."""
    assert all(f in ("stop", "length", "tool_calls") for f in finishes), finishes
    if body is None:
        return
    assert len(texts) == (body.get("n") or 1), texts
    cap = _token_cap(route, body)
    if usage is not None:
        n = usage["completion_tokens"]
        # A choice cut by the cap made exactly ``cap`` tokens; one that stopped, at most that.
        assert cap * finishes.count("length") <= n <= cap * len(texts), (usage, finishes, cap)
    stop = body.get("stop") or []
    stops = [stop] if isinstance(stop, str) else stop
    if not body.get("echo"):  # an echoed prompt may hold a stop string
        assert not any(s in text for s in stops for text in texts), (texts, stops)


def check_answer(resp: requests.Response, route: str, case: Case) -> None:
    status = resp.status_code
    if not 200 <= status < 300:
        check_error(resp)
    elif resp.headers.get("Content-Type", "").startswith("text/event-stream"):
        check_stream(resp, route, case.body)
    else:
        check_json(resp, route, case.body)


# -- health after the run --------------------------------------------------------------------------

PROBES = {
    COMPLETIONS: {"model": MODEL_NAME, "prompt": "The capital of France is", "max_tokens": 4,
                  "temperature": 0},
    CHAT: {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Name a colour."}],
           "max_tokens": 4, "temperature": 0},
}


def probe_text(session: requests.Session, url: str, route: str) -> str:
    resp = session.post(url + route, json=PROBES[route], timeout=60)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    return choice["text"] if route == COMPLETIONS else choice["message"]["content"]


def running_gauges(text: str) -> dict[str, float]:
    """Every ``baton_requests_running`` sample and the engine's running/waiting gauges."""
    wanted = ("baton_requests_running", "baton_engine_running_requests",
              "baton_engine_waiting_requests")
    found = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m and m.group(1) in wanted:
            found[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return found


def assert_idle(session: requests.Session, url: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        gauges = running_gauges(session.get(url + "/baton/metrics", timeout=10).text)
        assert any(k.startswith("baton_requests_running") for k in gauges), gauges
        if not any(gauges.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not any(gauges.values()), gauges


# -- the test --------------------------------------------------------------------------------------

def check_temper(resp: requests.Response, route: str, case: Case) -> None:
    """What the kind of body says of its answer, beyond 2xx-or-4xx: a body over the limit (and
    only such a body) is 413; a valid one is served; one bad field is refused, by name."""
    status = resp.status_code
    if "Content-Encoding" not in case.headers:  # the limit counts the bytes as received
        assert (status == 413) == (len(case.raw) > LIMIT), status
    if status == 413:
        return
    if case.temper == "valid":
        assert status == 200, resp.text
    elif case.temper.startswith("bad "):
        name = case.temper.removeprefix("bad ")
        cap = case.body.get(name) if name == "max_tokens" else None
        if (route == CHAT and isinstance(cap, int) and CONTEXT <= cap <= INT64_MAX
                and case.body.get("max_completion_tokens") is not None):
            return  # a chat max_tokens over the context that loses to max_completion_tokens
        assert 400 <= status < 500, resp.text
        param = resp.json()["error"]["param"] or ""
        assert param == name or param.startswith((name + ".", name + "[")), (name, resp.text)


@pytest.mark.parametrize("route", [COMPLETIONS, CHAT])
def test_generation_route_answers_any_body_with_2xx_or_an_openai_4xx(make_server, engine, route):
    assert (len(engine.tokenizer), engine.max_model_len) == (VOCAB, CONTEXT)
    url, _ = make_server(server=ServerConfig(served_model_name=MODEL_NAME, max_body_bytes=LIMIT))
    seen: Counter[tuple[str, int, str]] = Counter()  # (temper, status, json or sse)
    with requests.Session() as session:
        expected = probe_text(session, url, route)

        def fuzz(case: Case) -> None:
            note(f"{case.temper}; headers {case.headers}; chunked {case.chunked}; "
                 f"body {case.raw[:2000]!r}{'...' if len(case.raw) > 2000 else ''}")
            resp = _send(session, url + route, case)
            check_answer(resp, route, case)
            check_temper(resp, route, case)
            kind = "sse" if "event-stream" in resp.headers.get("Content-Type", "") else "json"
            event(f"{case.temper}: {resp.status_code} {kind}")
            seen[(case.temper, resp.status_code, kind)] += 1

        for strategy, examples in fuzz_plan(route):
            settings(FUZZ, max_examples=examples)(given(strategy)(fuzz))()

        assert requests.get(url + "/baton/health", timeout=10).status_code == 200
        assert requests.get(url + "/baton/ready", timeout=10).status_code == 200
        assert probe_text(session, url, route) == expected
        assert_idle(session, url)

    total = sum(seen.values())
    print(f"\n{route}: {total} bodies: {sorted(seen.items())}")
    # The mix stays a mix: enough bodies, answers of every kind, streamed and not.
    assert total >= EXAMPLES, seen
    assert {200, 400, 404, 413} <= {status for _, status, _ in seen}, seen
    served = {want: sum(n for (_, status, kind), n in seen.items() if (status, kind) == (200, want))
              for want in ("json", "sse")}
    assert served["sse"] >= 50 and served["json"] >= 50, served
