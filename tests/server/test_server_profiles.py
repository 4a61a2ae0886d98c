"""Traffic profiles: the bounded ring, its text budget, the ``GET /baton/ab/profile`` export (both
arms, text off and on, ``since``, the 400), and its replay through the bench's JSONL reader."""

from __future__ import annotations

import hashlib
import json
import random
import time

import pytest
import requests

from baton_sidecar.bench.inputs import WorkloadOptions, build_workload
from baton_sidecar.config import RouterConfig
from baton_sidecar.engine.request import SamplingParams
from baton_sidecar.server.local import render_chat
from baton_sidecar.server.oai_request import ParsedRequest
from baton_sidecar.server.profiles import (Profile, ProfileRing, export_jsonl, parse_profile_since,
                                           vocabulary_words)
from baton_sidecar.server.router import BATON, INCUMBENT
from server_helpers import MODEL_NAME, StubIncumbent
from tiny import tiny_tokenizer

CHAT = [{"role": "user", "content": "Tell me a fact about the moon, in one short sentence."}]


def _profile(t: float, prompt_tokens: int | None = 5, output_tokens: int | None = 3,
             request: ParsedRequest | None = None, arm: str = BATON) -> Profile:
    return Profile(arrival_unix=t, kind="completion", arm=arm, prompt_tokens=prompt_tokens,
                   output_tokens=output_tokens, finish_reason="length", request=request)


def _completion(prompt: str | list[int]) -> ParsedRequest:
    return ParsedRequest(kind="completion", model=None, params=SamplingParams(max_tokens=4),
                         prompt=prompt)


# -- the ring, no model --------------------------------------------------------------------------

def test_ring_keeps_the_last_capacity_profiles():
    ring = ProfileRing(capacity=3)
    for i in range(5):
        ring.record(_profile(100.0 + i))
    assert len(ring) == 3
    assert [p.arrival_unix for p in ring.select()] == [102.0, 103.0, 104.0]
    assert [p.arrival_unix for p in ring.select(103.0)] == [103.0, 104.0]
    assert ring.select(105.0) == []
    with pytest.raises(ValueError, match="capacity"):
        ProfileRing(capacity=0)


def test_text_budget_drops_the_oldest_text_first():
    ring = ProfileRing(capacity=3, text_budget_chars=10)
    first, second = _profile(1.0, request=_completion("abcdef")), _profile(2.0, request=_completion("ghijkl"))
    ring.record(first)
    assert ring.text_chars == 6 and first.request is not None
    ring.record(second)  # 12 > 10: the older text goes, the profile stays
    assert first.request is None and second.request is not None and ring.text_chars == 6
    for t in (3.0, 4.0, 5.0):  # `first`, then `second` leave the ring, `second` with its text
        ring.record(_profile(t))
    assert second.request is None and ring.text_chars == 0 and len(ring) == 3
    ids = _profile(6.0, request=_completion([5, 6]))
    ring.record(ids)  # token ids count 4 each
    assert ring.text_chars == 8


@pytest.mark.parametrize("value", ["", "abc", "-1", "nan", "inf", "1e400", "1" * 50])
def test_since_must_be_unix_seconds(value):
    with pytest.raises(ValueError, match="^since: "):
        parse_profile_since(value)


def test_since_parses():
    assert parse_profile_since(None) is None
    assert parse_profile_since("1700000000.25") == 1700000000.25
    assert parse_profile_since("0") == 0.0


def test_export_synthesises_exact_lengths_and_rebases_arrivals():
    tokenizer = tiny_tokenizer()
    profiles = [_profile(50.5, prompt_tokens=7, output_tokens=0),
                _profile(50.0, prompt_tokens=12, output_tokens=9),
                _profile(51.0, prompt_tokens=None),  # length unknown: left out
                _profile(52.25, request=_completion([3, 4, 5]), prompt_tokens=None, output_tokens=2)]
    body, skipped = export_jsonl(profiles, tokenizer)
    rows = [json.loads(line) for line in body.decode().splitlines()]
    assert skipped == 1
    assert [r["arrival_s"] for r in rows] == [0.0, 0.5, 2.25]
    assert [r["max_tokens"] for r in rows] == [9, 1, 2]  # at least 1 (the bench's minimum)
    for row, tokens in zip(rows[:2], (12, 7)):
        assert row["prompt_source"] == "synthetic" and row["prompt_tokens"] == tokens
        assert len(tokenizer.encode(row["prompt"], add_special_tokens=False)) == tokens
    assert rows[2]["prompt_token_ids"] == [3, 4, 5] and rows[2]["prompt_source"] == "recorded"
    assert export_jsonl([], tokenizer) == (b"", 0)


def test_vocabulary_words_are_one_token_each():
    tokenizer = tiny_tokenizer()
    words = vocabulary_words(tokenizer)
    assert len(words) > 50
    text = " ".join(random.Random(1).choices(words, k=300))
    assert len(tokenizer.encode(text, add_special_tokens=False)) == 300


# -- over HTTP, with the real model ----------------------------------------------------------------

class NoUsageIncumbent(StubIncumbent):
    """The stub's stream without its usage chunk: the sidecar must count the prompt itself."""

    SSE_PARTS = StubIncumbent.SSE_PARTS[:4] + (b"data: [DONE]\n\n",)


@pytest.fixture
def stub(server_thread):
    s = NoUsageIncumbent(server_thread)
    yield s
    s.close()


def _session_for(arm: str, weight: float) -> str:
    """A sticky-header value the router sends to ``arm`` at ``baton_weight`` (router.py's hash)."""
    for i in range(1000):
        point = int.from_bytes(hashlib.sha256(f"h:s{i}".encode()).digest()[:8], "big") / 2 ** 64 * 100
        if (point < weight) == (arm == BATON):
            return f"s{i}"
    raise AssertionError("no session found")


def _post(url: str, route: str, body: dict, arm: str) -> requests.Response:
    resp = requests.post(url + route, json={"model": MODEL_NAME, **body}, timeout=60,
                         headers={"x-baton-session": _session_for(arm, 50)})
    assert resp.status_code == 200 and resp.headers["x-baton-arm"] == arm
    return resp


def _export(url: str, since: str | None = None, wait_counted: int = 0) -> list[dict]:
    """The export's rows; waits until ``wait_counted`` rows have a prompt count (counted off-loop)."""
    deadline = time.monotonic() + 30
    while True:
        resp = requests.get(url + "/baton/ab/profile", params={"since": since} if since else None,
                            timeout=30)
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        rows = [json.loads(line) for line in resp.text.splitlines()]
        if sum(r["prompt_tokens"] is not None for r in rows) >= wait_counted:
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)


def _serve_both_arms(url: str) -> None:
    _post(url, "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 3,
                                   "temperature": 0, "priority": 2, "sla_class": "batch"}, BATON)
    time.sleep(0.05)  # distinct arrivals
    _post(url, "/v1/chat/completions", {"messages": CHAT, "stream": True, "priority": -1}, INCUMBENT)


@pytest.mark.model
def test_both_arms_are_profiled_without_text(make_server, stub, engine):
    url, _ = make_server(router=RouterConfig(incumbent_url=stub.url, baton_weight=50))
    _serve_both_arms(url)
    rows = _export(url, wait_counted=2)
    assert [r["arm"] for r in rows] == [BATON, INCUMBENT]
    baton, incumbent = rows
    assert baton["kind"] == "completion" and baton["priority"] == 2 and baton["sla_class"] == "batch"
    assert baton["output_tokens"] == 3 and baton["max_tokens"] == 3 and baton["finish_reason"] == "length"
    assert baton["ttft_s"] > 0 and baton["e2e_s"] >= baton["ttft_s"]
    assert incumbent["kind"] == "chat" and incumbent["priority"] == -1
    assert incumbent["finish_reason"] == "stop" and incumbent["output_tokens"] == 1  # content chunks
    assert incumbent["ttft_s"] is not None
    # No usage from the incumbent: counted with Baton's tokenizer, as Baton would render the chat.
    assert incumbent["prompt_tokens"] == len(render_chat(engine.tokenizer, CHAT))
    text = "\n".join(json.dumps(r) for r in rows)
    assert "France" not in text and "moon" not in text and "messages" not in text
    for row in rows:
        assert row["prompt_source"] == "synthetic"
        assert len(engine.tokenizer.encode(row["prompt"], add_special_tokens=False)) == row["prompt_tokens"]
    assert 0.0 == baton["arrival_s"] < incumbent["arrival_s"]


@pytest.mark.model
def test_text_is_kept_with_profile_text(make_server, stub, engine):
    router = RouterConfig(incumbent_url=stub.url, baton_weight=50, profile_text=True)
    url, _ = make_server(router=router)
    _serve_both_arms(url)
    baton, incumbent = _export(url, wait_counted=2)
    assert baton["prompt"] == "The capital of France is" and baton["prompt_source"] == "recorded"
    assert incumbent["messages"] == CHAT and incumbent["prompt_source"] == "recorded"
    assert CHAT[0]["content"] in incumbent["prompt"]  # as the chat template renders it


@pytest.mark.model
def test_since_selects_by_arrival_and_bad_since_is_400(server):
    for prompt in ("one", "two", "three"):
        r = requests.post(server + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=60)
        assert r.status_code == 200
        time.sleep(0.05)
    rows = _export(server)
    assert len(rows) == 3
    later = _export(server, since=repr(rows[1]["arrival_unix"] - 1e-6))
    assert [r["arrival_unix"] for r in later] == [r["arrival_unix"] for r in rows[1:]]
    assert later[0]["arrival_s"] == 0.0  # offsets start at the first exported request
    assert _export(server, since=str(time.time() + 60)) == []
    for bad in ("yesterday", "-5", "nan"):
        resp = requests.get(server + "/baton/ab/profile", params={"since": bad}, timeout=10)
        assert resp.status_code == 400
        err = resp.json()["error"]
        assert err["param"] == "since" and err["code"] == "invalid_value"
        assert err["type"] == "invalid_request_error" and bad in err["message"]


@pytest.mark.model
@pytest.mark.parametrize("profile_text", [False, True])
def test_export_replays_through_the_bench_jsonl_reader(make_server, stub, engine, tmp_path, profile_text):
    router = RouterConfig(incumbent_url=stub.url, baton_weight=50, profile_text=profile_text)
    url, _ = make_server(router=router)
    _serve_both_arms(url)
    _post(url, "/v1/completions", {"prompt": "Once upon a time, in a land far away,", "max_tokens": 5,
                                   "temperature": 0, "ignore_eos": True}, BATON)
    rows = _export(url, wait_counted=3)
    path = tmp_path / "profile.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    workload = build_workload("jsonl", WorkloadOptions(path=str(path)), engine.tokenizer, None, [])
    assert len(workload.requests) == len(rows) == 3
    for request, row in zip(workload.requests, rows):
        assert request.arrival_s == pytest.approx(row["arrival_s"])
        assert request.arrival_s == pytest.approx(row["arrival_unix"] - rows[0]["arrival_unix"], abs=1e-5)
        assert request.max_tokens == max(1, row["output_tokens"])
        assert abs(request.prompt_len - row["prompt_tokens"]) <= 1  # a BOS the bench does not add
        assert request.priority == row["priority"] and request.sla_class == row["sla_class"]
