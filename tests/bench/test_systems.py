"""Every system replays a small workload on the tiny model: exact outputs, complete records."""

from __future__ import annotations

import pytest

from baton_sidecar.bench.ceiling import compare_decode_step, measure_ceiling
from baton_sidecar.bench.systems import build_system
from baton_sidecar.bench.workloads import BenchRequest, TokenSource, Workload, offline_workload
from baton_sidecar.config import EngineConfig, Limits, PolicyConfig


@pytest.fixture(scope="module")
def workload() -> Workload:
    source = TokenSource.synthetic(96, seed=1, size=2000)
    base = offline_workload(source, 5, (3, 12), (2, 7), seed=2)
    # Staggered arrivals exercise the open-loop paths (sleeping until a request's arrival).
    return Workload("t", [BenchRequest(r.index, r.prompt_token_ids, r.max_tokens, 0.02 * r.index)
                          for r in base.requests])


@pytest.mark.parametrize("name", ["baton", "rtc", "hf_static", "hf_cb", "sequential"])
def test_system_produces_exact_lengths(tiny_model, workload, name):
    policy = PolicyConfig(limits=Limits(max_batch_size=4))
    system = build_system(name, tiny_model, EngineConfig(), policy, hf_batch_size=2)
    seen = []
    run = system.run(workload, seen.append)
    assert sum(seen) == workload.total_output_tokens
    assert len(run.records) == len(workload.requests)
    for request, record in zip(workload.requests, run.records):
        assert record.error is None, record.error
        assert record.output_tokens == request.max_tokens
        assert len(record.token_times_s) == request.max_tokens
        assert record.submitted_s >= request.arrival_s - 1e-6
        assert record.ttft_s >= 0 and record.e2e_s >= record.ttft_s - 1e-9
        assert record.token_times_s == sorted(record.token_times_s)
    assert run.wall_s > 0
    if name in ("baton", "rtc"):
        assert run.steps and all("step_s" in s for s in run.steps)
        assert max(s["rows"] for s in run.steps) <= 4


def test_ceiling_and_decode_step_comparison_run(tiny_model):
    ceiling = measure_ceiling(tiny_model, [1, 2], context=8, steps=2, warmup=1)
    assert set(ceiling) == {"1", "2"}
    assert all(v["tokens_per_s"] > 0 and v["context_len"] == 8 for v in ceiling.values())
    source = TokenSource.synthetic(96, seed=0, size=500)
    c = compare_decode_step(tiny_model, source, batch=3, context=6, steps=2, warmup=1)
    assert c["batch_size"] == 3 and c["bare_forward_s"] > 0 and c["engine_decode_s"] > 0
    # 6 prompt tokens + the first token + the decode steps so far, plus the column being written
    assert c["engine_context_len"][0] >= 8
    assert c["engine_step_s"] >= c["engine_decode_s"]  # a step contains its decode forward
    assert c["decode_vs_bare"] == pytest.approx(c["engine_decode_s"] / c["bare_forward_s"])
    assert c["step_vs_bare"] == pytest.approx(c["engine_step_s"] / c["bare_forward_s"])
    assert c["decode_within_10pct"] == (c["decode_vs_bare"] <= 1.10)
    assert c["step_within_10pct"] == (c["step_vs_bare"] <= 1.10)


def _at_once(workload: Workload) -> Workload:
    return Workload("at-once", [BenchRequest(r.index, r.prompt_token_ids, r.max_tokens, 0.0)
                                for r in workload.requests])


def _batches(steps: list[dict]) -> list[list[dict]]:
    """Steps split where a prefill happens (a run-to-completion batch forms only then)."""
    batches: list[list[dict]] = []
    for step in steps:
        if step["prefill_tokens"] or not batches:
            batches.append([])
        batches[-1].append(step)
    return batches


def test_baton_releases_rows_as_they_finish_and_rtc_holds_the_batch(tiny_model, workload):
    policy = PolicyConfig(limits=Limits(max_batch_size=8))
    runs = {name: build_system(name, tiny_model, EngineConfig(), policy).run(_at_once(workload), lambda n: None)
            for name in ("baton", "rtc")}
    decode_tokens = sum(r.max_tokens - 1 for r in workload.requests)  # the first comes from prefill
    # Re-batching: a row leaves the step it finishes, so every decoded row yields a token.
    assert sum(s["rows"] for s in runs["baton"].steps) == decode_tokens
    # Run-to-completion: nothing joins a running batch and nothing leaves it early, so rows are
    # constant from one batch's prefill to the next; finished rows ride along, decoded for nothing.
    rtc_steps = runs["rtc"].steps
    assert all(len({s["rows"] for s in batch if s["rows"]}) <= 1 for batch in _batches(rtc_steps))
    assert sum(s["rows"] for s in rtc_steps) >= decode_tokens


def test_engine_steps_count_chunked_prefill_as_prefill(tiny_model, workload):
    policy = PolicyConfig(limits=Limits(max_batch_size=4, max_prefill_tokens=4))
    run = build_system("baton", tiny_model, EngineConfig(), policy).run(workload, lambda n: None)
    assert sum(s["prefill_tokens"] for s in run.steps) == sum(r.prompt_len for r in workload.requests)
    chunked = [s for s in run.steps if s["chunk_tokens"]]
    assert chunked and all(s["chunk_tokens"] <= 4 for s in chunked)
    # A chunk's forward is its own (prefill_s) or the decode's, when it rode in it (fused).
    assert all(s["decode_s"] > 0 and s["chunk_s"] == 0 if s["fused"] else s["prefill_s"] >= s["chunk_s"] > 0
               for s in chunked)
    assert all(s["step_s"] >= s["prefill_s"] + s["decode_s"] for s in run.steps)


def test_decode_step_comparison_above_the_default_batch_limit(tiny_model):
    """Batch 64 (the GPU check's) is over ``Limits().max_batch_size``: the comparison raises it."""
    source = TokenSource.synthetic(96, seed=0, size=500)
    c = compare_decode_step(tiny_model, source, batch=40, context=4, steps=1, warmup=0)
    assert c["batch_size"] == 40 and c["engine_decode_s"] > 0
