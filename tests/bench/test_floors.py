"""The floors table: which floors apply to which result, what they measure, in which order."""

from __future__ import annotations

import pytest

from baton_sidecar.bench import floors
from baton_sidecar.bench.floors import FLOORS, Floor, evaluate


def _ratios(**by_system: dict) -> dict:
    return {"ratios_vs_baton": by_system}


def test_every_floor_is_well_formed():
    for floor in FLOORS:
        assert floor.op in floors.COMPARISONS
        assert float(floor.shown) == pytest.approx(floor.limit, abs=5e-4), floor.name
        assert all(key for key in floor.path.split(".")), floor.path


def test_offline_floors_come_from_the_ratios():
    result = _ratios(hf_static={"output_tokens_per_s": 2.0}, hf_cb={"output_tokens_per_s": 1.1},
                     rtc={"output_tokens_per_s": 9.0, "e2e_p95_s": 0.1})
    assert evaluate(result, "offline") == [
        {"name": "offline: baton / hf_static output tok/s", "measured": 2.0, "target": ">= 1.75", "met": True},
        {"name": "offline: baton / hf_cb output tok/s", "measured": 1.1, "target": ">= 1.2", "met": False},
    ]


def test_a_floor_needs_its_system_and_its_kind():
    result = _ratios(rtc={"e2e_p95_s": 0.5})
    assert evaluate(result, "offline") == []  # rtc has no offline floor
    assert evaluate(result, "padding") == []
    rows = evaluate(result, "trace")
    assert rows == [{"name": "trace: baton e2e p95 / rtc e2e p95", "measured": 0.5, "target": "<= 0.6", "met": True}]
    assert evaluate(result, "jsonl")[0]["name"] == "jsonl: baton e2e p95 / rtc e2e p95"


def test_missing_measurement_is_reported_unmet_or_met():
    rows = evaluate(_ratios(hf_cb={"e2e_p95_s": None}), "poisson")
    assert rows == [{"name": "poisson: baton e2e p95 / hf_cb e2e p95", "measured": None, "target": "<= 0.8",
                     "met": None}]


def test_decode_step_floors_apply_to_any_kind_with_the_measurement():
    result = {"decode_step_b16": {"decode_vs_bare": 1.05, "step_vs_bare": 1.2}}
    for kind in ("offline", "trace", "prompts"):
        assert [(r["target"], r["met"]) for r in evaluate(result, kind)] == [("<= 1.10", True), ("<= 1.10", False)]
    assert evaluate({"decode_step_b16": None}, "offline") == []


def test_priority_floors_fan_out_over_preemption_variants_variant_by_variant():
    variants = {"fifo": {"urgent_ttft_p95_vs_fifo": 1.0, "throughput_cost_vs_fifo": 0.0},
                "preempt_swap": {"urgent_ttft_p95_vs_fifo": 0.2, "throughput_cost_vs_fifo": 0.2},
                "preempt_recompute": {"urgent_ttft_p95_vs_fifo": 0.34, "throughput_cost_vs_fifo": 0.05}}
    rows = evaluate({"scenario": {"variants": variants}}, "priority")
    assert [(r["name"], r["target"], r["met"]) for r in rows] == [
        ("priority: preempt_swap urgent TTFT p95 / fifo", "<= 0.333", True),
        ("priority: preempt_swap throughput cost vs fifo", "<= 0.10", False),
        ("priority: preempt_recompute urgent TTFT p95 / fifo", "<= 0.333", False),  # 0.34 > 1/3
        ("priority: preempt_recompute throughput cost vs fifo", "<= 0.10", True),
    ]
    assert evaluate({"scenario": {"variants": variants}}, "padding") == []


def test_a_new_floor_is_a_new_record():
    table = (Floor("padding: {0} slot padding", "scenario.variants.*.padding_ratio_slot_weighted", "<=", 0.5, "0.5",
                   ("padding",)),)
    result = {"scenario": {"variants": {"pad1.0_nobucket": {"padding_ratio_slot_weighted": 0.7},
                                        "pad0.3_bucket": {"padding_ratio_slot_weighted": 0.2}}}}
    assert [(r["name"], r["met"]) for r in evaluate(result, "padding", table)] == [
        ("padding: pad1.0_nobucket slot padding", False), ("padding: pad0.3_bucket slot padding", True)]


def test_int8_floors_compare_baton_int8_with_float_baton_and_hf_cb():
    from baton_sidecar.bench.plans.compare import ratios

    systems = {"baton": {"output_tokens_per_s": 50.0, "e2e_p95_s": 4.0},
               "baton_int8": {"output_tokens_per_s": 100.0, "e2e_p95_s": 2.0},
               "hf_cb": {"output_tokens_per_s": 30.0, "e2e_p95_s": 5.0}}
    result = {"ratios_vs_baton": ratios(systems), "ratios_vs_baton_int8": ratios(systems, "baton_int8")}
    assert result["ratios_vs_baton_int8"]["baton"]["output_tokens_per_s"] == 2.0
    offline = {row["name"]: row for row in evaluate(result, "offline")}
    assert offline["offline: baton_int8 / baton output tok/s"]["met"] is True
    assert offline["offline: baton_int8 / hf_cb output tok/s"]["measured"] == pytest.approx(100 / 30)
    trace = {row["name"]: row for row in evaluate(result, "trace")}
    assert trace["trace: baton_int8 e2e p95 / hf_cb e2e p95"] == {
        "name": "trace: baton_int8 e2e p95 / hf_cb e2e p95", "measured": 0.4, "target": "<= 0.5", "met": True}


def test_llama_server_floors_apply_only_to_runs_that_had_it():
    from baton_sidecar.bench.plans.compare import ratios

    systems = {"baton_int8": {"output_tokens_per_s": 90.0, "e2e_p95_s": 6.5},
               "llama_server": {"output_tokens_per_s": 100.0, "e2e_p95_s": 5.0}}
    result = {"ratios_vs_baton_int8": ratios(systems, "baton_int8")}
    offline = {row["name"]: row for row in evaluate(result, "offline")}
    assert offline["offline: baton_int8 / llama_server output tok/s"] == {
        "name": "offline: baton_int8 / llama_server output tok/s", "measured": 0.9, "target": ">= 1.0", "met": False}
    trace = {row["name"]: row for row in evaluate(result, "trace")}
    assert trace["trace: baton_int8 e2e p95 / llama_server e2e p95"]["measured"] == pytest.approx(1.3)
    assert trace["trace: baton_int8 e2e p95 / llama_server e2e p95"]["met"] is False
    del systems["llama_server"]
    without = {"ratios_vs_baton_int8": ratios(systems, "baton_int8")}
    assert not [row for row in evaluate(without, "offline") if "llama_server" in row["name"]]
