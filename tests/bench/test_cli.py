"""The command line: argument checks, missing data, the report's files and JSON keys."""

from __future__ import annotations

import argparse
import json

import pytest

from baton_sidecar.bench import cli, report
from baton_sidecar.bench.inputs import BenchError, build_workload, parse_loads, token_source
from baton_sidecar.bench.metrics import RequestRecord
from baton_sidecar.bench.plans import compare, padding


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_bench_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_and_positional_file():
    args = parse()
    assert args.workload == "offline" and args.path is None and args.hf_batch_size == 8
    args = parse("trace", "some.csv", "--load", "0.5,0.8", "--token-scale", "4")
    assert (args.workload, args.path, args.load, args.token_scale) == ("trace", "some.csv", "0.5,0.8", 4.0)


@pytest.mark.parametrize("argv, message", [
    (["--num-requests", "0"], "--num-requests"),
    (["--time-scale", "-1"], "--time-scale"),
    (["--urgent-fraction", "2"], "--urgent-fraction"),
    (["offline", "x.csv"], "takes no FILE"),
    (["--url", "ftp://x"], "--url"),
    (["--padding-settings", "2:on"], "--padding-settings"),
    (["--scenario", "priority", "poisson"], "--scenario"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    assert cli.run_bench(parse(*argv)) == 2
    assert message in capsys.readouterr().err


def test_missing_trace_says_so_before_loading_anything(tmp_path, capsys):
    assert cli.run_bench(parse("trace", "--data-dir", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert "AzureLLMInferenceTrace_conv_2023.csv is absent" in err and "--synthetic-fallback" in err
    assert cli.run_bench(parse("--scenario", "padding", "--data-dir", str(tmp_path))) == 2


def test_systems_and_loads_parsing():
    assert compare.parse_systems(None, None, "baton,rtc") == ["baton", "rtc"]
    assert compare.parse_systems(None, "http://h:1", "baton") == ["url"]
    assert compare.parse_systems("baton", "http://h:1", "x") == ["baton", "url"]
    assert compare.parse_systems("baton,baton_int8,hf_cb", None, "") == ["baton", "baton_int8", "hf_cb"]
    with pytest.raises(BenchError, match="unknown system"):
        compare.parse_systems("baton,vllm", None, "")
    with pytest.raises(BenchError, match="listed twice"):
        compare.parse_systems("baton,baton", None, "")
    assert parse_loads(None, "0.8") == [0.8]
    assert parse_loads("0.5,1", None) == [0.5, 1.0]
    assert parse_loads(None, None) is None
    with pytest.raises(BenchError):
        parse_loads("x", None)
    assert padding.parse_settings("1.0:off,0.6:on,0.3") == [(1.0, False), (0.6, True), (0.3, False)]
    assert [padding.label(v, b) for v, b in [(1.0, False), (0.6, True), (0.25, True)]] == [
        "pad1.0_nobucket", "pad0.6_bucket", "pad0.25_bucket"]


def _records(n: int, offset: float) -> list[RequestRecord]:
    out = []
    for i in range(n):
        r = RequestRecord(i, 0.0, 5, 3, priority=0 if i == 0 else 10)
        r.token_times_s = [offset + i * 0.1 + k * 0.05 for k in range(3)]
        r.finished_s, r.output_tokens = r.token_times_s[-1], 3
        out.append(r)
    return out


def test_report_files(tmp_path):
    from baton_sidecar.bench.metrics import summarize

    systems = {"baton": summarize(_records(4, 0.1)), "rtc": summarize(_records(4, 0.5))}
    result = {"title": "t", "workload": {"name": "offline"}, "systems": systems, "slo": {"ttft_s": 1.0},
              "ceiling": {"1": {"step_s": 0.1, "tokens_per_s": 10.0, "context_len": 8}},
              "floors": [{"name": "f", "measured": 2.0, "target": ">= 1", "met": True}],
              "loads": {"0.5": {"load": 0.5, "systems": systems}, "1.0": {"load": 1.0, "systems": systems}}}
    markdown = report.markdown_report(result)
    assert "| baton |" in markdown and "| rtc |" in markdown and "Bare-forward ceiling" in markdown
    report.write_json(result, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["systems"]["baton"]["completed"] == 4
    report.plot_latency_cdfs({"baton": _records(4, 0.1), "rtc": _records(4, 0.5)}, tmp_path / "cdf.png")
    report.plot_vs_load(result["loads"], tmp_path / "load.png")
    steps = [{"t": 1.0 + i, "rows": 2, "padding_ratio": 0.1 * i} for i in range(3)]
    report.plot_padding({"a": steps}, tmp_path / "pad.png")
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("cdf.png", "load.png", "pad.png"))


# --- a tiny run on the real model ---------------------------------------------------------------------

REQUIRED_SYSTEM_KEYS = (
    "output_tokens_per_s", "requests_per_s", "goodput_req_per_s", "goodput_fraction", "completed",
    *(f"{m}_{s}_s" for m in ("ttft", "tpot", "itl", "e2e") for s in ("mean", "p50", "p95", "p99")))


@pytest.mark.model
def test_tiny_real_model_run_writes_documented_keys(tmp_path, real_model, monkeypatch):
    from baton_sidecar.bench import cli as bench_cli

    # Reuse the session's loaded model instead of loading it again.
    monkeypatch.setattr("baton_sidecar.model.load_model", lambda *a, **k: real_model)
    out, path = tmp_path / "out", tmp_path / "r.json"
    code = bench_cli.main(["-n", "4", "--prompt-len", "8:24", "--output-len", "2:5",
                           "--systems", "baton,rtc,sequential", "--no-ceiling", "--no-progress",
                           "--synthetic-fallback",  # passes with or without ../shared/data
                           "--out", str(out), "--json", str(path)])
    assert code == 0
    result = json.loads(path.read_text())
    assert result["schema_version"] == 1
    assert set(result["systems"]) == {"baton", "rtc", "sequential"}
    for name, summary in result["systems"].items():
        assert summary["completed"] == 4, (name, summary["errors"])
        for key in REQUIRED_SYSTEM_KEYS:
            assert key in summary, (name, key)
    assert result["systems"]["baton"]["engine"]["decode_steps"] > 0
    assert set(result["ratios_vs_baton"]) == {"rtc", "sequential"}
    assert result["workload"]["num_requests"] == 4 and "slo" in result
    for name in ("result.json", "report.md", "requests.json", "steps.json", "latency_cdf.png"):
        assert (out / name).is_file(), name


@pytest.mark.model
def test_tiny_scenarios_write_their_summaries(tmp_path, real_model, monkeypatch):
    from baton_sidecar.bench import cli as bench_cli

    monkeypatch.setattr("baton_sidecar.model.load_model", lambda *a, **k: real_model)
    path = tmp_path / "priority.json"
    assert bench_cli.main(["--scenario", "priority", "-n", "5", "--output-len", "2:3", "--prompt-len", "8:12",
                           "--capacity", "3", "--no-progress", "--no-plots", "--synthetic-fallback", "--out", str(tmp_path / "p"),
                           "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert set(result["systems"]) == {"fifo", "priority_no_preempt", "preempt_swap", "preempt_recompute"}
    for variant in result["scenario"]["variants"].values():
        assert {"urgent_ttft_p95_s", "urgent_ttft_p95_vs_fifo", "throughput_cost_vs_fifo"} <= set(variant)
    assert result["capacity"]["requests_per_s"] == 3
    assert len(result["floors"]) == 4

    path = tmp_path / "padding.json"
    assert bench_cli.main(["--scenario", "padding", "-n", "4", "--max-output", "3", "--max-prompt", "32",
                           "--capacity", "1", "--no-progress", "--no-plots", "--synthetic-fallback", "--out", str(tmp_path / "d"),
                           "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert set(result["scenario"]["variants"]) == {"pad1.0_nobucket", "pad0.6_bucket", "pad0.3_bucket"}
    for variant in result["scenario"]["variants"].values():
        assert {"padding_ratio_time_weighted", "output_tokens_per_s", "e2e_p95_s"} <= set(variant)
    assert result["workload"]["prompt_token_scale"] == 8.0 and result["workload"]["load"] == 1.5


def test_synthetic_fallback_when_the_data_is_absent(tmp_path, capsys):
    from tiny import tiny_tokenizer

    options = cli.workload_options(parse("trace", "--data-dir", str(tmp_path), "--synthetic-fallback", "-n", "10"))
    notes: list[str] = []
    source = token_source(tiny_tokenizer(), options, notes)
    workload = build_workload("trace", options, tiny_tokenizer(), source, notes)
    assert len(workload.requests) == 10 and workload.description["source"].startswith("synthetic")
    assert any("absent" in note for note in notes) and "warning" in capsys.readouterr().err
    strict = cli.workload_options(parse("trace", "--data-dir", str(tmp_path)))
    with pytest.raises(BenchError, match="--synthetic-fallback"):
        token_source(tiny_tokenizer(), strict, [])
