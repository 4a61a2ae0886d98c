"""Workload construction, parsing and scaling (no model)."""

from __future__ import annotations

import json
import random

import pytest

from baton_sidecar.bench.azure_trace import read_azure_trace, synthetic_conv_rows
from baton_sidecar.bench.workloads import (BenchRequest, TokenSource, Workload, WorkloadError, all_at_once,
                                           arena_workload, assign_priorities, jsonl_workload, offline_workload,
                                           parse_range, poisson_workload, scale_tokens, time_scale_for_rate,
                                           trace_workload, with_time_scale)
from tiny import tiny_tokenizer


@pytest.fixture
def source() -> TokenSource:
    return TokenSource(list(range(100, 400)), "test")


def test_parse_range():
    assert parse_range("10:130", "x") == (10, 130)
    assert parse_range("64", "x") == (64, 64)
    for bad in ("0:5", "9:3", "a:b", "1:2:3"):
        with pytest.raises(ValueError, match="--prompt-len"):
            parse_range(bad, "--prompt-len")


def test_token_source_takes_real_windows_and_wraps(source):
    rng = random.Random(0)
    window = source.take(50, rng)
    assert len(window) == 50
    start = source.tokens.index(window[0])
    expected = [source.tokens[(start + i) % len(source.tokens)] for i in range(50)]
    assert list(window) == expected
    assert len(source.take(1000, rng)) == 1000  # longer than the stream: wraps around


def test_token_source_from_texts_uses_the_tokenizer():
    tokenizer = tiny_tokenizer()
    src = TokenSource.from_texts(tokenizer, ["w5 w6 w7", "w8"], "t")
    assert src.tokens == [5, 6, 7, 8]


def test_offline_is_seeded_and_in_range(source):
    a = offline_workload(source, 32, (10, 130), (8, 256), seed=3)
    b = offline_workload(source, 32, (10, 130), (8, 256), seed=3)
    c = offline_workload(source, 32, (10, 130), (8, 256), seed=4)
    assert a.requests == b.requests and a.requests != c.requests
    assert len(a.requests) == 32
    assert all(10 <= r.prompt_len <= 130 and 8 <= r.max_tokens <= 256 for r in a.requests)
    assert all(r.arrival_s == 0 for r in a.requests)
    assert a.total_output_tokens == sum(r.max_tokens for r in a.requests)


def test_poisson_arrivals_increase_at_roughly_the_rate(source):
    w = poisson_workload(source, rate=4.0, num_requests=400, seed=1)
    times = [r.arrival_s for r in w.requests]
    assert times[0] == 0 and times == sorted(times)
    assert 3.0 < (len(times) - 1) / times[-1] < 5.0
    with pytest.raises(ValueError, match="rate"):
        poisson_workload(source, rate=0)


def write_trace(path, rows):
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(f"{t},{c},{g}\n" for t, c, g in rows))


def test_read_azure_trace_relative_sorted_times(tmp_path):
    path = tmp_path / "trace.csv"
    write_trace(path, [("2023-11-16 18:15:50.9951690", 396, 109), ("2023-11-16 18:15:46.6805900", 374, 44),
                       ("2023-11-16 18:15:47.1805900", 10, 1)])
    rows = read_azure_trace(path)
    assert [r.context_tokens for r in rows] == [374, 10, 396]
    assert rows[0].t == 0
    assert rows[1].t == pytest.approx(0.5, abs=1e-5)
    assert rows[2].t == pytest.approx(4.314579, abs=1e-5)


def test_read_azure_trace_errors(tmp_path):
    with pytest.raises(WorkloadError, match="does not exist"):
        read_azure_trace(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,Context\n1,2\n")
    with pytest.raises(WorkloadError, match="GeneratedTokens"):
        read_azure_trace(bad)
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,abc,3\n")
    with pytest.raises(WorkloadError, match=":2: bad row"):
        read_azure_trace(bad)


def test_trace_scaling_of_tokens_and_time(tmp_path, source):
    path = tmp_path / "trace.csv"
    write_trace(path, [(0.0, 1000, 100), (1.0, 80, 3), (3.0, 100000, 5000), (4.0, 16, 16)])
    rows = read_azure_trace(path)
    w = trace_workload(rows, source, num_requests=3, start_s=0.5, prompt_scale=8, output_scale=4,
                       time_scale=2.0, max_prompt=512, max_output=256)
    # rows from t=1.0: (80, 3), (100000, 5000), (16, 16); arrivals relative to the first, times 2
    assert [r.prompt_len for r in w.requests] == [10, 512, 2]
    assert [r.max_tokens for r in w.requests] == [1, 256, 4]
    assert [r.arrival_s for r in w.requests] == [0.0, 4.0, 6.0]
    assert w.description["prompt_token_scale"] == 8 and w.description["time_scale"] == 2.0
    assert w.description["native_rate_req_per_s"] == pytest.approx(2 / 3)
    with pytest.raises(WorkloadError, match="no trace rows"):
        trace_workload(rows, source, start_s=99)


def test_scale_tokens_rounds_and_clamps():
    assert scale_tokens(1020, 8, 512) == 128
    assert scale_tokens(1, 8, 512) == 1
    assert scale_tokens(10_000, 1, 256) == 256


def test_time_scaling_to_a_target_rate(source):
    w = poisson_workload(source, rate=2.0, num_requests=50, seed=0)
    factor = time_scale_for_rate(w, 0.5)
    scaled = with_time_scale(w, factor, load=0.8)
    assert (len(scaled.requests) - 1) / scaled.span_s == pytest.approx(0.5)
    assert scaled.description["load"] == 0.8
    assert scaled.description["time_scale"] == pytest.approx(factor)
    assert [r.prompt_token_ids for r in scaled.requests] == [r.prompt_token_ids for r in w.requests]
    assert all_at_once(scaled).span_s == 0
    with pytest.raises(ValueError):
        time_scale_for_rate(all_at_once(w), 1.0)


def test_assign_priorities_marks_the_fraction(source):
    w = assign_priorities(offline_workload(source, 50), 0.2, seed=1)
    priorities = [r.priority for r in w.requests]
    assert priorities.count(0) == 10 and priorities.count(10) == 40


def test_synthetic_rows_resemble_the_conv_trace():
    rows = synthetic_conv_rows(2000, seed=0)
    contexts = sorted(r.context_tokens for r in rows)
    generated = sorted(r.generated_tokens for r in rows)
    assert 800 < contexts[1000] < 1300 and 100 < generated[1000] < 170
    assert 4.5 < len(rows) / rows[-1].t < 6.5


def test_jsonl_workload(tmp_path):
    tokenizer = tiny_tokenizer()
    path = tmp_path / "w.jsonl"
    lines = [{"prompt": "w5 w6", "max_tokens": 3, "arrival_s": 1.5, "priority": 0, "sla_class": "interactive"},
             {"prompt_token_ids": [7, 8, 9], "max_tokens": 2}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    w = jsonl_workload(path, tokenizer, vocab_size=96)
    assert [r.prompt_token_ids for r in w.requests] == [(7, 8, 9), (5, 6)]  # sorted by arrival
    assert w.requests[1] == BenchRequest(1, (5, 6), 3, 1.5, 0, "interactive")


@pytest.mark.parametrize("line, message", [
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "w5", "max_tokens": 0}, "max_tokens"),
    ({"prompt_token_ids": [1, 200], "max_tokens": 1}, "prompt_token_ids"),
    ({"prompt": "w5", "max_tokens": 1, "arrival_s": -1}, "arrival_s"),
    ({"prompt": "w5", "max_tokens": 1, "priority": "high"}, "priority"),
])
def test_jsonl_workload_rejects_bad_lines(tmp_path, line, message):
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(WorkloadError, match=message):
        jsonl_workload(path, tiny_tokenizer(), vocab_size=96)


def test_jsonl_not_json(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text("{oops\n")
    with pytest.raises(WorkloadError, match=":1: not JSON"):
        jsonl_workload(path, tiny_tokenizer())


def test_arena_output_length_is_the_answer_length(tmp_path):
    tokenizer = tiny_tokenizer()
    q = tmp_path / "q.jsonl"
    a = tmp_path / "a.jsonl"
    q.write_text("\n".join(json.dumps(x) for x in [
        {"uid": "u1", "prompt": "w2 w3 w4"}, {"uid": "u2", "prompt": "w5"}, {"uid": "u3", "prompt": "w9"}]))
    a.write_text("\n".join(json.dumps(x) for x in [
        {"uid": "u1", "messages": [{"role": "user", "content": "w2"},
                                   {"role": "assistant", "content": {"answer": "w1 " * 10}}]},
        {"uid": "u2", "messages": [{"role": "user", "content": "w5"},
                                   {"role": "assistant", "content": {"answer": "w7 w8"}}]}]))
    w = arena_workload(q, a, tokenizer, num_requests=10, output_scale=1.0, max_output=8)
    lengths = {r.prompt_token_ids: r.max_tokens for r in w.requests}
    assert lengths == {(2, 3, 4): 8, (5,): 2}  # u3 has no answer; u1's 10 tokens capped at 8
    assert all(r.arrival_s == 0 for r in w.requests)


def test_workload_summary_keys(source):
    summary = Workload("x", [BenchRequest(0, (1, 2), 3), BenchRequest(1, (1,), 5, 2.0)], {"k": 1}).summary()
    assert summary["num_requests"] == 2 and summary["k"] == 1
    assert summary["output_tokens"]["total"] == 8 and summary["offered_rate_req_per_s"] == 0.5
