"""``--scenario long-prompts``: the two streams, the plan, the summary and its floors (tiny model at most)."""

from __future__ import annotations

import statistics

import pytest

from baton_sidecar.bench import cli
from baton_sidecar.bench.floors import evaluate
from baton_sidecar.bench.inputs import BenchError, WorkloadOptions
from baton_sidecar.bench.metrics import SLO, RequestRecord
from baton_sidecar.bench.plans import long_prompts
from baton_sidecar.bench.plans.long_prompts import LONG, SHORT, Mix, ShortOnly, mixed_workload
from baton_sidecar.bench.runner import Runner
from baton_sidecar.bench.systems import EngineSystem, SystemRun
from baton_sidecar.bench.workloads import TokenSource, Workload

TINY = Mix(duration_s=1.0, short_rate=4.0, short_prompt=(4, 8), short_output=(3, 4), long_interval_s=100.0,
           long_prompt=(60, 80), long_output=(2, 2), long_tail_s=0.0)


@pytest.fixture
def source() -> TokenSource:
    return TokenSource(list(range(100, 400)), "test")


def _kind(workload: Workload, kind: str):
    return [r for r in workload.requests if r.kind == kind]


# --- the requests ---------------------------------------------------------------------------------

def test_the_mix_is_seeded_tagged_and_in_range(source):
    mix = Mix(duration_s=300.0, short_rate=1.0, long_interval_s=30.0)
    a, b, c = mixed_workload(source, mix, 3), mixed_workload(source, mix, 3), mixed_workload(source, mix, 4)
    assert a.requests == b.requests and a.requests != c.requests
    assert [r.index for r in a.requests] == list(range(len(a.requests)))
    times = [r.arrival_s for r in a.requests]
    assert times == sorted(times) and 0 <= times[0] and times[-1] < mix.duration_s
    short, long = _kind(a, SHORT), _kind(a, LONG)
    assert len(short) + len(long) == len(a.requests)
    assert a.description["short_requests"] == len(short) and a.description["long_requests"] == len(long)
    assert all(20 <= r.prompt_len <= 100 and 64 <= r.max_tokens <= 128 and r.sla_class == "interactive"
               for r in short)
    assert all(2048 <= r.prompt_len <= 6144 and r.max_tokens == 16 and r.sla_class is None for r in long)
    assert all(r.arrival_s < mix.long_window_s for r in long)
    assert 240 < len(short) < 360 and 3 <= len(long) <= 20  # 1/s over 300 s; 1/30 s over 280 s


def test_arrivals_are_poisson_at_each_rate(source):
    mix = Mix(duration_s=2000.0, short_rate=2.0, short_prompt=(1, 2), long_interval_s=10.0, long_prompt=(1, 2),
              long_tail_s=0.0)
    workload = mixed_workload(source, mix, 1)
    for kind, mean_gap in ((SHORT, 0.5), (LONG, 10.0)):
        times = [0.0] + [r.arrival_s for r in _kind(workload, kind)]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert statistics.mean(gaps) == pytest.approx(mean_gap, rel=0.1)
        assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.15)  # exponential


def test_the_short_stream_does_not_depend_on_the_long_one(source):
    def short(mix):
        return [(r.arrival_s, r.prompt_token_ids, r.max_tokens) for r in _kind(mixed_workload(source, mix, 0), SHORT)]

    assert short(Mix(duration_s=60.0)) == short(Mix(duration_s=60.0, long_interval_s=5.0, long_prompt=(100, 200)))


def test_a_run_too_short_for_a_long_prompt_still_gets_one(source):
    workload = mixed_workload(source, TINY, 0)
    long = _kind(workload, LONG)
    assert len(long) == 1 and long[0].arrival_s == pytest.approx(TINY.long_window_s / 2)
    assert Mix(duration_s=10.0, long_tail_s=20.0).long_window_s == 5.0  # never less than half


def test_mix_checks_its_fields():
    for bad, field in (({"duration_s": 0}, "duration_s"), ({"long_prompt": (5, 4)}, "long_prompt"),
                       ({"long_tail_s": -1}, "long_tail_s")):
        with pytest.raises(ValueError, match=field):
            Mix(**bad)
    assert long_prompts.slot_context(Mix()) == 6400  # 6144 + 16, rounded up to 256


# --- the plan -----------------------------------------------------------------------------------------

def _args(tmp_path, *argv: str):
    return cli.build_parser().parse_args(["--scenario", "long-prompts", "--data-dir", str(tmp_path),
                                          "--synthetic-fallback", "--no-progress", *argv])


def _runner(args, loaded) -> Runner:
    runner = Runner(cli.run_options(args))
    runner.loaded, runner.tokenizer = loaded, loaded.tokenizer
    return runner


def test_cli_builds_the_variants_each_beside_its_short_only_run(tmp_path, tiny_model):
    args = _args(tmp_path, "--duration", "2", "--long-prompt-len", "50:60", "--long-output-len", "2",
                 "--short-output-len", "3:4", "--max-step-ms", "40")
    runner = _runner(args, tiny_model)
    plan = cli.make_plan(args, runner)
    names = ["baton_tokens", "baton_time", "baton_fused", "hf_cb"]
    assert list(plan.systems) == [label for name in names for label in (f"{name}:short_only", name)]
    assert plan.kind == "long-prompts" and plan.baseline == "baton_tokens" and plan.loads == ()
    prefill = {name: (s.policy.prefill.budget, s.policy.prefill.mode, s.policy.max_step_ms)
               for name, s in plan.systems.items() if isinstance(s, EngineSystem)}
    assert prefill == {"baton_tokens": ("tokens", "separate", 40.0), "baton_time": ("time", "separate", 40.0),
                       "baton_fused": ("time", "fused", 40.0)}
    assert isinstance(plan.systems["hf_cb:short_only"], ShortOnly)
    assert runner.options.llama_slot_context == 256 and len(_kind(plan.workload, LONG)) >= 1


def test_cli_takes_a_subset_of_the_scenarios_systems(tmp_path, tiny_model):
    args = _args(tmp_path, "--systems", "baton_fused,baton_tokens", "--long-prompt-len", "50")
    assert list(cli.make_plan(args, _runner(args, tiny_model)).systems) == [
        "baton_fused:short_only", "baton_fused", "baton_tokens:short_only", "baton_tokens"]
    for bad in ("baton", "hf_cb,hf_cb"):
        args = _args(tmp_path, "--systems", bad, "--long-prompt-len", "50")
        with pytest.raises(BenchError, match="--systems"):
            cli.make_plan(args, _runner(args, tiny_model))
    assert long_prompts.parse_systems(None, llama_server=True)[-1] == "llama_server"


def test_a_long_prompt_over_the_models_context_is_refused(tmp_path, tiny_model, capsys):
    args = _args(tmp_path)  # 6144 + 16 tokens; the tiny model holds 512
    with pytest.raises(BenchError, match="--long-prompt-len"):
        cli.make_plan(args, _runner(args, tiny_model))
    assert cli.run_bench(_args(tmp_path, "--short-prompt-len", "9:3")) == 2
    assert "--short-prompt-len" in capsys.readouterr().err


def test_short_only_leaves_the_long_requests_out(source):
    seen = []

    class Recording:
        local = False

        def run(self, workload, progress):
            seen.append(workload)
            return SystemRun("x", [])

    wrapper = ShortOnly(Recording())
    workload = mixed_workload(source, TINY, 0)
    wrapper.run(workload, lambda n: None)
    assert seen[0].requests == _kind(workload, SHORT) and wrapper.local is False


# --- the summary ------------------------------------------------------------------------------------

def _record(index, submitted, times):
    r = RequestRecord(index, submitted, 10, len(times))
    r.token_times_s, r.finished_s, r.output_tokens = list(times), times[-1], len(times)
    return r


class _Run:
    def __init__(self, records):
        self.records = records


def _workload(kinds):
    from baton_sidecar.bench.workloads import BenchRequest

    return Workload("long-prompts", [BenchRequest(i, (5,), 2, kind=k) for i, k in enumerate(kinds)])


def test_summary_restricts_itl_to_the_long_prefills_and_feeds_the_floors():
    workload = _workload([SHORT, SHORT, LONG])
    # baton_tokens: the long request waits from 1.0 to its first token at 2.0; short 0's gaps are
    # 0.1, 0.5 (before), 0.9 (across the window's start), 0.1 (inside), 0.8 (across its end), 0.1 (after).
    short0 = [0.0, 0.1, 0.6, 1.5, 1.6, 2.4, 2.5]
    runs = {
        "baton_tokens": _Run([_record(0, 0.0, short0), _record(1, 3.0, [3.1, 3.2]), _record(2, 1.0, [2.0, 2.1])]),
        "baton_tokens:short_only": _Run([_record(0, 0.0, [0.0, 0.1, 0.2, 0.3]), _record(1, 3.0, [3.1, 3.2])]),
        # baton_fused: the window is 1.0-3.0; only short 1's one gap (2.6-2.8) overlaps it.
        "baton_fused": _Run([_record(0, 0.0, [0.0, 0.2, 0.4]), _record(1, 2.5, [2.6, 2.8]),
                             _record(2, 1.0, [3.0, 3.1])]),
        "baton_fused:short_only": _Run([_record(0, 0.0, [0.0, 0.1, 0.2]), _record(1, 2.5, [2.6, 2.7])]),
    }
    result = {}
    long_prompts.summarize(workload, ["baton_tokens", "baton_fused"], runs, SLO(), result)
    tokens = result["scenario"]["systems"]["baton_tokens"]
    assert tokens["short_itl_gaps"] == 7 and tokens["short_itl_in_prefill_gaps"] == 3
    assert tokens["short_itl_in_prefill_max_s"] == pytest.approx(0.9)  # 1.5 -> 2.4 crosses the end
    assert tokens["short_itl_max_s"] == pytest.approx(0.9) and tokens["short_itl_p50_s"] == pytest.approx(0.1)
    assert tokens["in_prefill_gap_share"] == pytest.approx(3 / 7)
    assert tokens["baseline_itl_p50_s"] == pytest.approx(0.1) and tokens["baseline_itl_gaps"] == 4
    assert tokens["short_itl_in_prefill_p99_vs_baseline_p50"] == pytest.approx(
        tokens["short_itl_in_prefill_p99_s"] / 0.1)
    assert tokens["short_ttft_p50_s"] == pytest.approx(0.05) and tokens["long_ttft_p50_s"] == pytest.approx(1.0)
    assert (tokens["short_requests"], tokens["long_requests"], tokens["long_completed"]) == (2, 1, 1)
    fused = result["scenario"]["systems"]["baton_fused"]
    assert fused["long_ttft_max_s"] == pytest.approx(2.0) and fused["long_ttft_p50_vs_baton_tokens"] == 2.0
    assert fused["short_itl_in_prefill_gaps"] == 1 and fused["short_itl_in_prefill_p99_s"] == pytest.approx(0.2)
    assert result["scenario"]["variants"]["baton_fused"] == {"prefill_budget": "time", "prefill_mode": "fused"}
    assert set(result["by_kind"]["baton_fused"]) == {SHORT, LONG}
    assert result["by_kind"]["baton_fused"][LONG]["num_requests"] == 1

    rows = {r["name"]: r for r in evaluate(result, "long-prompts")}
    assert list(rows) == [  # baton_time did not run: its floors are left out
        "long-prompts: baton_fused short ITL p99 during long prefills / its short ITL p50 without long prompts",
        "long-prompts: baton_fused long TTFT p50 / baton_tokens'"]
    itl, ttft = rows.values()
    assert itl["target"] == "<= 2.5" and itl["measured"] == pytest.approx(2.0) and itl["met"] is True
    assert ttft["target"] == "<= 1.15" and ttft["measured"] == 2.0 and ttft["met"] is False
    assert evaluate(result, "features") == []


@pytest.mark.parametrize("name", ["baton_time", "baton_fused"])
def test_both_time_budget_variants_have_the_two_floors(name):
    entry = {"short_itl_in_prefill_p99_vs_baseline_p50": 2.6, "long_ttft_p50_vs_baton_tokens": 1.1}
    rows = evaluate({"scenario": {"systems": {name: entry, "baton_tokens": entry}}}, "long-prompts")
    assert [(r["name"].split(" ")[1], r["target"], r["met"]) for r in rows] == [
        (name, "<= 2.5", False), (name, "<= 1.15", True)]


# --- one tiny run ---------------------------------------------------------------------------------------

def test_tiny_run_of_two_variants(tmp_path, tiny_model):
    runner = Runner(cli.run_options(_args(tmp_path)))
    runner.loaded, runner.tokenizer = tiny_model, tiny_model.tokenizer
    options = WorkloadOptions(data_dir=tmp_path, synthetic_fallback=True)
    plan = long_prompts.plan(runner, options, TINY, systems="baton_tokens,baton_fused")
    result = runner.execute(plan)
    assert set(result["systems"]) == {"baton_tokens", "baton_tokens:short_only", "baton_fused",
                                      "baton_fused:short_only"}
    n_short = result["workload"]["short_requests"]
    assert n_short > 0 and result["workload"]["long_requests"] == 1
    assert result["systems"]["baton_fused:short_only"]["num_requests"] == n_short
    assert all(s["failed"] == 0 for s in result["systems"].values())
    fused = result["scenario"]["systems"]["baton_fused"]
    assert fused["long_completed"] == 1 and fused["short_completed"] == n_short
    assert fused["long_ttft_p50_s"] > 0 and fused["baseline_itl_p50_s"] > 0
    assert result["systems"]["baton_fused"]["config"]["prefill_mode"] == "fused"
    assert [f["name"].split(":")[0] for f in result["floors"]] == ["long-prompts", "long-prompts"]
