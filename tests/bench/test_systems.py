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
    assert c["engine_context_len"][0] >= 7
    assert isinstance(c["decode_within_10pct"], bool)
