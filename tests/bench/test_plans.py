"""The plan modules on the tiny model: what they decide, and that they leave the arguments alone."""

from __future__ import annotations

import argparse
import copy

import pytest

from baton_sidecar.bench import cli
from baton_sidecar.bench.inputs import BenchError, WorkloadOptions
from baton_sidecar.bench.plans import compare, padding, priority
from baton_sidecar.bench.runner import CapacityRun, Runner


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_bench_arguments(parser)
    return parser.parse_args(list(argv))


def _runner(args: argparse.Namespace, loaded) -> Runner:
    """A runner that already holds ``loaded`` (``load`` does nothing more)."""
    runner = Runner(cli.run_options(args))
    runner.loaded, runner.tokenizer = loaded, loaded.tokenizer if loaded else None
    return runner


def _no_data(tmp_path, *argv: str) -> argparse.Namespace:
    return parse(*argv, "--data-dir", str(tmp_path), "--synthetic-fallback", "--no-progress")


def test_plan_priority_leaves_args_untouched(tmp_path, tiny_model):
    args = _no_data(tmp_path, "--scenario", "priority")
    before = copy.deepcopy(vars(args))
    runner = _runner(args, tiny_model)
    plan = cli.make_plan(args, runner)
    assert vars(args) == before  # it used to set args.num_requests to 48
    requests = plan.workload.requests
    assert len(requests) == priority.NUM_REQUESTS and all(16 <= r.max_tokens <= 64 for r in requests)
    assert sum(r.priority == 0 for r in requests) == round(0.2 * len(requests))
    assert requests[-1].arrival_s > 0 and plan.loads == (1.5,) and plan.load_key == "overload"
    assert list(plan.systems) == list(priority.VARIANTS) and plan.baseline == "fifo"
    assert isinstance(plan.capacity, CapacityRun) and plan.capacity.label == "capacity(fifo)"
    assert {r.arrival_s for r in plan.capacity.workload.requests} == {0.0}
    assert runner.options.policy.limits.max_batch_size == priority.MAX_BATCH_SIZE


def test_plan_priority_takes_options_not_args(tmp_path, tiny_model):
    options = WorkloadOptions(num_requests=6, output_range=(2, 3), data_dir=tmp_path, synthetic_fallback=True)
    plan = priority.plan(_runner(parse(), tiny_model), options, urgent_fraction=0.5, overload=2.0, capacity=3.0)
    assert options.num_requests == 6 and options.output_range == (2, 3)
    assert len(plan.workload.requests) == 6 and plan.capacity == 3.0 and plan.loads == (2.0,)
    assert sum(r.priority == 0 for r in plan.workload.requests) == 3


def test_plan_padding_variants_and_load(tmp_path, tiny_model):
    args = _no_data(tmp_path, "--scenario", "padding", "-n", "6", "--capacity", "2")
    plan = cli.make_plan(args, _runner(args, tiny_model))
    assert list(plan.systems) == ["pad1.0_nobucket", "pad0.6_bucket", "pad0.3_bucket"]
    assert plan.baseline == "pad1.0_nobucket" and plan.loads == (1.5,) and plan.capacity == 2.0
    args = _no_data(tmp_path, "--scenario", "padding", "-n", "6", "--time-scale", "2", "--padding-settings", "0.5:on")
    plan = cli.make_plan(args, _runner(args, tiny_model))
    assert list(plan.systems) == ["pad0.5_bucket"] and plan.loads == () and plan.capacity is None
    assert plan.workload.description["time_scale"] == 2


def test_plan_padding_summary():
    settings = {"pad0.5_bucket": (0.5, True)}
    result = {"systems": {"pad0.5_bucket": {"output_tokens_per_s": 3.0, "engine": {"mean_batch_size": 2.5}}}}
    padding.summarize(settings, result)
    variant = result["scenario"]["variants"]["pad0.5_bucket"]
    assert variant["max_padding_ratio"] == 0.5 and variant["bucketing"] is True
    assert variant["output_tokens_per_s"] == 3.0 and variant["mean_batch_size"] == 2.5


def test_plan_compare_defaults_and_loads(tmp_path, tiny_model):
    args = _no_data(tmp_path, "offline", "-n", "3")
    plan = cli.make_plan(args, _runner(args, tiny_model))
    assert list(plan.systems) == compare.DEFAULT_SYSTEMS["offline"].split(",")
    assert plan.loads == () and plan.capacity is None and plan.title == plan.kind == "offline"
    args = _no_data(tmp_path, "poisson", "-n", "3", "--systems", "baton", "--load", "0.5,1")
    plan = cli.make_plan(args, _runner(args, tiny_model))
    assert plan.loads == (0.5, 1.0) and plan.capacity.label == "capacity(rtc)"
    args = _no_data(tmp_path, "poisson", "-n", "3", "--systems", "baton", "--time-scale", "2")
    assert cli.make_plan(args, _runner(args, tiny_model)).loads == ()  # a time scale replaces the loads


def test_plan_compare_url_alone_needs_a_capacity(tmp_path, tiny_model):
    args = _no_data(tmp_path, "poisson", "-n", "3", "--url", "http://h:1")
    runner = Runner(cli.run_options(args))
    runner.tokenizer = tiny_model.tokenizer  # no model: only the url system runs
    with pytest.raises(BenchError, match="--capacity"):
        cli.make_plan(args, runner)
    args = _no_data(tmp_path, "poisson", "-n", "3", "--url", "http://h:1", "--capacity", "2")
    plan = cli.make_plan(args, runner)
    assert list(plan.systems) == ["url"] and plan.capacity == 2.0 and plan.loads == (0.8,)


def test_plan_priority_summary_against_fifo():
    def system(urgent, normal, tps):
        return {"output_tokens_per_s": tps, "preemptions": 1,
                "by_priority": {"priority_0": {"ttft_p95_s": urgent}, "priority_10": {"ttft_p95_s": normal}}}

    result = {"systems": {"fifo": system(3.0, 1.0, 10.0), "preempt_swap": system(0.6, 1.5, 9.5)}}
    priority.summarize(result)
    swap = result["scenario"]["variants"]["preempt_swap"]
    assert swap["urgent_ttft_p95_vs_fifo"] == pytest.approx(0.2)
    assert swap["throughput_cost_vs_fifo"] == pytest.approx(0.05)
    assert swap["normal_ttft_p95_s"] == 1.5
    assert set(result["by_priority"]) == {"fifo", "preempt_swap"}
