"""Arm choice, sticky hashing and SSE accounting (no model, no network)."""

import json
import random

import pytest

from baton_sidecar.config import RouterConfig
from baton_sidecar.server.eligibility import EligibilityCounts, refusal_reason
from baton_sidecar.server.errors import APIError, bad_request
from baton_sidecar.server.json_body import decode_json_body
from baton_sidecar.server.proxy import IncumbentFailure, SSEStats, forward_headers
from baton_sidecar.server.router import (BATON, INCUMBENT, Router, choose_arm, hash_point,
                                         sticky_key)
from baton_sidecar.server.tracing import NULL_TRACE


def test_hash_point_is_stable_and_uniform():
    assert hash_point("alice") == hash_point("alice")
    points = [hash_point(f"user-{i}") for i in range(20000)]
    assert all(0 <= p < 100 for p in points)
    share = sum(p < 30 for p in points) / len(points)
    assert 0.28 < share < 0.32


def test_choose_arm_edges():
    assert choose_arm("k", 50, incumbent_configured=False) == BATON
    assert choose_arm("k", 100, True) == BATON
    assert choose_arm("k", 0, True) == INCUMBENT
    assert choose_arm(None, 30, True, rand=lambda: 0.29) == BATON
    assert choose_arm(None, 30, True, rand=lambda: 0.31) == INCUMBENT


def test_sticky_assignment_is_monotone_in_weight():
    keys = [f"s{i}" for i in range(2000)]
    at30 = {k for k in keys if choose_arm(k, 30, True) == BATON}
    at60 = {k for k in keys if choose_arm(k, 60, True) == BATON}
    assert at30 <= at60  # raising the weight only moves sessions to Baton
    assert 0.25 < len(at30) / len(keys) < 0.35


def test_random_split_matches_weight():
    rng = random.Random(1)
    arms = [choose_arm(None, 30, True, rand=rng.random) for _ in range(20000)]
    assert 0.28 < arms.count(BATON) / len(arms) < 0.32


def test_sticky_key_prefers_header_then_user():
    assert sticky_key({"x-baton-session": "abc"}, "x-baton-session", "u") == "h:abc"
    assert sticky_key({}, "x-baton-session", "u") == "u:u"
    assert sticky_key({"x-baton-session": ""}, "x-baton-session", None) is None


def test_router_update_changes_future_assignments():
    r = Router(RouterConfig(incumbent_url="http://127.0.0.1:1", baton_weight=0))
    assert r.assign({}, "u1") == INCUMBENT
    r.update(RouterConfig(incumbent_url="http://127.0.0.1:1", baton_weight=100))
    assert r.assign({}, "u1") == BATON


def test_forward_headers_drop_hop_by_hop_and_keep_trace_context():
    headers = {"Host": "a", "Connection": "keep-alive", "Content-Length": "3",
               "Accept-Encoding": "gzip", "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
               "Authorization": "Bearer k"}
    assert set(forward_headers(headers, NULL_TRACE)) == {"traceparent", "Authorization",
                                                         "Accept-Encoding"}
    # Accounted (A/B) requests are read in passing, so they ask for an uncompressed answer.
    assert set(forward_headers(headers, NULL_TRACE, keep_encoding=False)) == {
        "traceparent", "Authorization"}


def test_refusals_name_a_small_set_of_reasons():
    assert refusal_reason(bad_request("n", "only n=1", code="unsupported_value")) == "unsupported:n"
    assert refusal_reason(bad_request("messages[3].content[0]", "x", code="unsupported_value")) \
        == "unsupported:messages.content"
    assert refusal_reason(bad_request("max_tokens", "x", code="invalid_type")) == "invalid:max_tokens"
    assert refusal_reason(APIError(400, "not JSON", param="body", code="invalid_json")) == "invalid:body"
    assert refusal_reason(APIError(400, "no param")) == "invalid:body"
    assert refusal_reason(bad_request("tools[0].function.parameters.$defs", "x")) == \
        "invalid:tools.function.parameters"


def test_refusal_reasons_never_carry_the_clients_own_keys():
    """The reasons are a Prometheus label and an unauthenticated report: no request content, and no
    label value a client can mint at will."""
    for body in ({"metadata": {"secret-customer-42": "\ud800"}}, {"secret_top_key": "\ud800"},
                 {"messages": [{"role": "user", "content": "ok", "customer_x": ["\ud800"]}]}):
        with pytest.raises(APIError) as caught:
            decode_json_body(json.dumps(body).encode())
        assert "secret" in caught.value.param or "customer" in caught.value.param  # the client is told where
        assert refusal_reason(caught.value) == "invalid:unicode"
    assert refusal_reason(bad_request("metadata.secret-customer-42", "too long")) == "invalid:metadata"
    assert refusal_reason(bad_request("Customer.x", "x")) == "invalid:body"
    assert refusal_reason(bad_request("a.b.c.d.e", "x")) == "invalid:a.b.c"


@pytest.mark.parametrize("url, shown", [
    ("http://user:token@incumbent:8000/v1", "http://incumbent:8000/v1"),
    ("https://incumbent", "https://incumbent"),
    ("http://[::1]:8000/", "http://[::1]:8000/"),
])
def test_the_incumbent_is_shown_without_credentials_or_query(url, shown):
    config = RouterConfig(incumbent_url=url)
    assert config.incumbent_base == shown and config.incumbent_url == url  # the proxy keeps the real one
    assert "token" not in str(IncumbentFailure.timeout(config)) and "secret" not in str(
        IncumbentFailure.unreachable(config, OSError("refused")))


def test_eligibility_counts_report_shares_and_top_reasons():
    counts = EligibilityCounts()
    assert counts.report() == {"eligible": {"count": 0, "share": None},
                               "ineligible": {"count": 0, "share": None, "top_reasons": []}}
    for _ in range(6):
        counts.record_eligible()
    for reason in ["unsupported:tools"] * 3 + ["other_route"]:
        counts.record_ineligible(reason)
    rep = counts.report()
    assert rep["eligible"] == {"count": 6, "share": 0.6}
    assert rep["ineligible"]["count"] == 4 and rep["ineligible"]["share"] == 0.4
    assert rep["ineligible"]["top_reasons"] == [
        {"reason": "unsupported:tools", "count": 3, "share": 0.3},
        {"reason": "other_route", "count": 1, "share": 0.1}]


def test_sse_stats_reads_chunks_across_splits():
    s = SSEStats(arrival=0.0)
    data = (b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
            b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
            b'data: {"choices":[{"text":"x","finish_reason":null}]}\n\n'
            b'data: {"choices":[{"delta":{},"finish_reason":"length"}]}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
            b"data: [DONE]\n\n")
    for i in range(0, len(data), 7):
        s.feed(data[i:i + 7])
    assert s.chunks_with_content == 2 and s.ttft_s is not None
    assert s.finish_reason == "length" and s.usage["completion_tokens"] == 2
