"""The simulator's workloads: the bench's sources as columns, rescaled to a rate."""

from __future__ import annotations

import json

import numpy as np
import pytest

from baton_sidecar.bench.azure_trace import TraceRow
from baton_sidecar.bench.workloads import BenchRequest, Workload, WorkloadError, scale_tokens
from baton_sidecar.simulate import workload as workloads

ROWS = [TraceRow(0.0, 1020, 129), TraceRow(1.5, 36, 2), TraceRow(2.0, 5000, 700), TraceRow(4.0, 12, 1)]


def test_trace_scales_as_the_bench_and_replays_end_to_end():
    w = workloads.trace(ROWS, 10, prompt_scale=8, output_scale=4, max_prompt=512, max_output=128)
    assert w.prompt_tokens[:4].tolist() == [scale_tokens(r.context_tokens, 8, 512) for r in ROWS]
    assert w.output_tokens[:4].tolist() == [scale_tokens(r.generated_tokens, 4, 128) for r in ROWS]
    assert w.prompt_tokens.tolist() == (w.prompt_tokens[:4].tolist() * 3)[:10]
    # The repeat starts one mean inter-arrival (4 s / 3) after the last row.
    assert w.arrival_s.tolist()[:6] == pytest.approx([0.0, 1.5, 2.0, 4.0, 4 + 4 / 3, 4 + 4 / 3 + 1.5])
    assert w.description["trace_repeats"] == 3


def test_at_rate_scales_arrivals_or_draws_poisson_ones():
    w = workloads.trace(ROWS, 4)
    faster = w.at_rate(6.0)
    assert faster.offered_rate == pytest.approx(6.0)
    assert np.allclose(faster.arrival_s / faster.arrival_s[-1], w.arrival_s / w.arrival_s[-1])
    offline = workloads.uniform(4000, (10, 20), (5, 9))
    assert offline.span_s == 0
    arrived = offline.at_rate(50.0, seed=3)
    assert arrived.offered_rate == pytest.approx(50.0, rel=0.05)
    assert np.array_equal(arrived.arrival_s, offline.at_rate(50.0, seed=3).arrival_s)  # seeded
    with pytest.raises(ValueError):
        w.at_rate(0)


def test_a_bench_runs_requests_and_a_bench_workload_become_columns(tmp_path):
    rows = [{"index": 1, "priority": 10, "prompt_tokens": 30, "max_tokens": 7, "submitted_s": 0.5},
            {"index": 0, "priority": 0, "prompt_tokens": 20, "max_tokens": 9, "submitted_s": 0.1}]
    (tmp_path / "requests.json").write_text(json.dumps({"capacity(rtc)": [], "baton@0.8": rows}))
    w = workloads.from_requests_json(tmp_path / "requests.json", "baton@0.8")
    assert w.arrival_s.tolist() == [0.1, 0.5] and w.prompt_tokens.tolist() == [20, 30]
    assert w.output_tokens.tolist() == [9, 7] and w.priority.tolist() == [0, 10]
    with pytest.raises(WorkloadError, match="no run 'rtc'"):
        workloads.from_requests_json(tmp_path / "requests.json", "rtc")

    bench = Workload("t", [BenchRequest(0, (5, 6, 7), 4, 1.0), BenchRequest(1, (5,), 2, 0.0, sla_class="batch")])
    w = workloads.from_bench(bench)
    assert w.arrival_s.tolist() == [0.0, 1.0] and w.prompt_tokens.tolist() == [1, 3]
    assert list(w.sla_class) == ["batch", None] and w.priority is None


def test_bad_columns_are_refused():
    with pytest.raises(WorkloadError, match="time order"):
        workloads.SimWorkload("x", np.array([1.0, 0.0]), np.array([1, 1]), np.array([1, 1]))
    with pytest.raises(WorkloadError, match=">= 1"):
        workloads.SimWorkload("x", np.array([0.0]), np.array([0]), np.array([1]))
