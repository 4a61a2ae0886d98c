"""Percentiles, per-request latencies, goodput and step summaries (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from baton_sidecar.bench.ceiling import ceiling_batch_sizes, efficiency, interpolate_step_s
from baton_sidecar.bench.metrics import (SLO, RequestRecord, distribution, first_token_windows, itl_gaps,
                                         makespan_s, percentile, ratio, summarize, summarize_by_priority,
                                         summarize_steps)


@pytest.mark.parametrize("values", [[1.0], [3.0, 1.0], [5, 1, 4, 2, 3], list(np.linspace(0, 7, 41) ** 2)])
@pytest.mark.parametrize("q", [0, 50, 95, 99, 100])
def test_percentile_matches_numpy_linear(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges():
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    d = distribution("ttft", [])
    assert d == {"ttft_mean_s": None, "ttft_p50_s": None, "ttft_p95_s": None, "ttft_p99_s": None}


def record(index, submitted, times, finished, max_tokens=None, priority=None, error=None):
    r = RequestRecord(index, submitted, 10, max_tokens or len(times), priority)
    r.token_times_s, r.finished_s, r.output_tokens, r.error = list(times), finished, len(times), error
    return r


def test_request_latencies():
    r = record(0, 1.0, [1.5, 1.7, 2.1], 2.2)
    assert r.ttft_s == pytest.approx(0.5)
    assert r.tpot_s == pytest.approx(0.3)
    assert r.itls_s() == pytest.approx([0.2, 0.4])
    assert r.e2e_s == pytest.approx(1.2)
    one = record(1, 0.0, [0.4], 0.4)
    assert one.tpot_s is None and one.itls_s() == []


def test_itl_gaps_pooled_and_within_windows():
    a = record(0, 0.0, [0.1, 0.2, 0.5, 1.0, 1.1], 1.1)
    b = record(1, 0.5, [0.6, 0.7], 0.7)
    failed = record(2, 0.0, [0.1, 0.9], 0.9, error="refused")
    assert itl_gaps([a, b, failed]) == pytest.approx([0.1, 0.3, 0.5, 0.1, 0.1])  # completed requests only
    # A gap counts when it overlaps a window: inside, across an edge, or spanning it; touching is not enough.
    assert itl_gaps([a, b], [(0.25, 0.45)]) == pytest.approx([0.3])  # 0.2 -> 0.5 spans it
    assert itl_gaps([a, b], [(0.45, 0.65)]) == pytest.approx([0.3, 0.5, 0.1])  # across both edges; b inside
    assert itl_gaps([a], [(0.5, 1.0)]) == pytest.approx([0.5])  # 0.5 -> 1.0 lies inside; its neighbours touch
    assert itl_gaps([a], [(2.0, 3.0), (0.0, 0.15)]) == pytest.approx([0.1])
    assert itl_gaps([a], []) == []
    waiting = RequestRecord(3, 0.4, 10, 2)
    assert first_token_windows([a, b, waiting]) == [(0.0, 0.1), (0.5, 0.6)]  # no first token: no window


def test_slo_and_goodput():
    slo = SLO(ttft_s=1.0, tpot_s=0.25, e2e_s=None)
    fast = record(0, 0.0, [0.5, 0.6, 0.7], 0.7)
    slow_first = record(1, 0.0, [1.5, 1.6], 1.6)
    slow_tokens = record(2, 1.0, [1.2, 1.8, 2.4], 2.4)
    failed = record(3, 0.0, [], None, max_tokens=5, error="refused: queue_full")
    records = [fast, slow_first, slow_tokens, failed]
    assert [slo.met(r) for r in records] == [True, False, False, False]
    s = summarize(records, slo)
    assert s["duration_s"] == pytest.approx(2.4) == makespan_s(records)
    assert s["completed"] == 3 and s["failed"] == 1 and s["errors"] == ["refused: queue_full"]
    assert s["output_tokens"] == 8
    assert s["output_tokens_per_s"] == pytest.approx(8 / 2.4)
    assert s["requests_per_s"] == pytest.approx(3 / 2.4)
    assert s["goodput_req_per_s"] == pytest.approx(1 / 2.4)
    assert s["goodput_fraction"] == pytest.approx(0.25)
    assert s["ttft_p50_s"] == pytest.approx(0.5)
    assert s["e2e_mean_s"] == pytest.approx((0.7 + 1.6 + 1.4) / 3)
    assert s["itl_p50_s"] == pytest.approx(float(np.percentile([0.1, 0.1, 0.1, 0.6, 0.6], 50)))
    for prefix in ("ttft", "tpot", "itl", "e2e"):
        for stat in ("mean", "p50", "p95", "p99"):
            assert f"{prefix}_{stat}_s" in s


def test_useful_tokens_never_exceed_what_was_asked():
    r = record(0, 0.0, [0.1, 0.2, 0.3], 0.3, max_tokens=2)
    assert summarize([r])["output_tokens"] == 2


def test_by_priority_uses_the_whole_makespan():
    records = [record(0, 0.0, [0.1], 0.2, priority=0), record(1, 0.0, [1.0], 4.0, priority=10)]
    by = summarize_by_priority(records)
    assert set(by) == {"priority_0", "priority_10"}
    assert by["priority_0"]["duration_s"] == pytest.approx(4.0)
    assert by["priority_0"]["ttft_p95_s"] == pytest.approx(0.1)


def test_ratio():
    assert ratio(2.0, 4.0) == 0.5
    assert ratio(None, 1.0) is None and ratio(1.0, 0) is None


def test_step_summary_padding_weights():
    steps = [
        {"t": 1, "step_s": 1.0, "decode_s": 0.5, "prefill_s": 0.3, "prefill_tokens": 40, "rows": 2, "length": 10,
         "padding_ratio": 0.5},
        {"t": 2, "step_s": 2.0, "decode_s": 1.5, "prefill_s": 0.0, "prefill_tokens": 0, "rows": 4, "length": 20,
         "padding_ratio": 0.1},
        {"t": 3, "step_s": 0.1, "decode_s": 0.0, "prefill_s": 0.0, "prefill_tokens": 0, "rows": 0, "length": 0,
         "padding_ratio": 0.0},
    ]
    s = summarize_steps(steps)
    assert s["steps"] == 3 and s["decode_steps"] == 2
    assert s["mean_batch_size"] == 3 and s["max_batch_size"] == 4
    assert s["padding_ratio_time_weighted"] == pytest.approx((0.5 * 0.5 + 0.1 * 1.5) / 2.0)
    assert s["padding_ratio_slot_weighted"] == pytest.approx((0.5 * 20 + 0.1 * 80) / 100)
    assert s["other_s"] == pytest.approx(3.1 - 2.0 - 0.3)
    assert s["prefill_tokens"] == 40
    assert s["decode_step_p50_s_by_batch"] == {"2": 0.5, "4": 1.5}


def test_ceiling_interpolation_and_batch_sizes():
    ceiling = {"1": {"step_s": 0.1}, "4": {"step_s": 0.16}, "16": {"step_s": 0.4}}
    assert interpolate_step_s(ceiling, 1) == pytest.approx(0.1)
    assert interpolate_step_s(ceiling, 2) == pytest.approx(0.12)
    assert interpolate_step_s(ceiling, 10) == pytest.approx(0.28)
    assert interpolate_step_s(ceiling, 32) == pytest.approx(0.8)
    assert ceiling_batch_sizes([3, 7, 24]) == [1, 2, 4, 8, 16, 24]
    assert ceiling_batch_sizes([]) == [1, 16]


def test_efficiency_against_the_ceiling():
    ceiling = {"1": {"step_s": 0.1}, "2": {"step_s": 0.12}}
    steps = [{"rows": 2, "decode_s": 0.15, "step_s": 0.2, "prefill_s": 0.0},
             {"rows": 1, "decode_s": 0.1, "step_s": 0.1, "prefill_s": 0.0}]
    e = efficiency(steps, ceiling, makespan_s=0.5, output_tokens_per_s=3.0)
    assert e["bare_decode_s"] == pytest.approx(0.22)
    assert e["decode_efficiency"] == pytest.approx(0.22 / 0.25)
    assert e["step_efficiency"] == pytest.approx(0.22 / 0.3)
    assert e["wall_efficiency"] == pytest.approx(0.44)
    assert e["largest_batch"] == 2
    assert e["throughput_vs_ceiling"] == pytest.approx(3.0 / (2 / 0.12))
    assert efficiency([], ceiling, 1.0, 1.0) == {}
