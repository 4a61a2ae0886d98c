"""The README's generated Performance section, from small synthetic results (no model, no runs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from baton_sidecar.bench import cli, readme, report
from baton_sidecar.bench.runner import Plan, Runner, base_result, command_line
from baton_sidecar.bench.metrics import RequestRecord, summarize
from baton_sidecar.bench.workloads import BenchRequest, Workload

REPO_ROOT = Path(__file__).resolve().parents[2]
BEFORE = "# Project\n\n## Performance\n\nHand-written intro.\n\n"
AFTER = "\n\nHand-written outro.\n\n## Tests\n"
PNG = b"\x89PNG\r\n\x1a\n fake plot bytes"


def _records(n: int, offset: float) -> list[RequestRecord]:
    out = []
    for i in range(n):
        r = RequestRecord(i, 0.0, 5, 3)
        r.token_times_s = [offset + i * 0.1 + k * 0.05 for k in range(3)]
        r.finished_s, r.output_tokens = r.token_times_s[-1], 3
        out.append(r)
    return out


def _result(title: str, command: str, loads: bool = False) -> dict:
    systems = {"baton": summarize(_records(4, 0.1)), "rtc": summarize(_records(4, 0.5))}
    result = {
        "schema_version": 1, "title": title, "started_at": "2030-01-02T03:04:05",
        "argv": command.split(), "command": command,
        "model": "tiny-model", "device": "cpu", "dtype": "float32",
        "host": {"cpu_model": "Test CPU 9000", "cpu_count": 2, "torch_threads": 1, "load_avg_start": 0.25},
        "workload": {"name": title, "num_requests": 4}, "baseline": "baton", "systems": systems,
        "floors": [{"name": f"{title}: baton / rtc", "measured": 1.5, "target": ">= 1.2", "met": True},
                   {"name": f"{title}: decode step", "measured": 1.3, "target": "<= 1.10", "met": False}],
        "notes": ["a synthetic stand-in was used"],
    }
    if loads:
        result["capacity"] = {"requests_per_s": 2.0, "source": "measured: rtc, all requests at t=0"}
        result["loads"] = {"0.8": {"load": 0.8, "time_scale": 1.5, "offered_rate_req_per_s": 1.6,
                                   "systems": systems}}
    return result


def _write_run(directory: Path, result: dict, plots: tuple[str, ...]) -> Path:
    """A bench ``--out`` directory: result.json and the named plot files."""
    result = {**result, "output_dir": str(directory)}
    report.write_json(result, directory / "result.json")
    for name in plots:
        (directory / name).write_bytes(PNG + name.encode())
    return directory / "result.json"


@pytest.fixture
def runs(tmp_path):
    offline = _write_run(tmp_path / "out" / "offline",
                         _result("offline", ".venv/bin/baton-sidecar bench offline --threads 1"), ("latency_cdf.png",))
    trace = _write_run(tmp_path / "out" / "trace",
                       _result("trace", "baton-sidecar bench trace --load 0.8 --threads 1", loads=True),
                       ("latency_cdf.png", "vs_load.png"))
    page = tmp_path / "repo" / "README.md"
    page.parent.mkdir()
    page.write_text(BEFORE + f"{readme.START}\nold numbers\n{readme.END}" + AFTER)
    return page, [offline, trace]


def test_rewrites_only_the_marked_section(runs):
    page, results = runs
    assert readme.update_readme(page, results) is True
    text = page.read_text()
    assert text.startswith(BEFORE + readme.START + "\n") and text.endswith(readme.END + AFTER)
    assert "old numbers" not in text
    section = text[text.index(readme.START):text.index(readme.END)]
    trace_result = _result("trace", "x", loads=True)
    assert report.systems_table(trace_result["systems"]) in section
    assert "#### Offered load 0.8" in section and "Capacity 2.000 req/s" in section
    assert report.floors_table(trace_result["floors"]) in section
    assert section.count("Floors met: 1 of 2") == 2 and "| NO |" in section
    # the exact commands, the machine and the date
    assert "```sh\n.venv/bin/baton-sidecar bench offline --threads 1\n```" in section
    assert "baton-sidecar bench trace --load 0.8 --threads 1" in section
    assert "Test CPU 9000, 2 CPUs, torch threads 1" in section and "on cpu (float32)" in section
    assert "load average at start 0.25" in section and "Run 2030-01-02 03:04:05" in section
    assert "- a synthetic stand-in was used" in section
    # the plots, copied to committed paths and linked relative to the README
    img = page.parent / "docs" / "img"
    assert "](docs/img/bench-offline.png)" in section and "](docs/img/bench-trace.png)" in section
    assert "](docs/img/bench-trace-vs-load.png)" in section
    assert (img / "bench-trace-vs-load.png").read_bytes() == PNG + b"vs_load.png"
    assert sorted(p.name for p in img.iterdir()) == ["bench-offline.png", "bench-trace-vs-load.png",
                                                     "bench-trace.png"]


def test_gpu_paragraph_uses_cuda_without_threads(runs):
    page, results = runs
    readme.update_readme(page, results)
    gpu = page.read_text().split("### On a GPU", 1)[1].split(readme.END)[0]
    commands = [line for line in gpu.splitlines() if line.startswith("baton-sidecar bench")]
    assert len(commands) == 2
    for command in commands:
        assert "--device cuda" in command and "--dtype bfloat16" in command and "-n 256" in command
        assert "--threads" not in command
    assert 'make bench BENCH_INT8= BENCH_ARGS="--device cuda --dtype bfloat16 -n 256"' in gpu


def test_second_run_changes_nothing(runs, capsys):
    page, results = runs
    assert readme.main([*map(str, results), "--readme", str(page)]) == 0
    first = page.read_text()
    assert "rewritten" in capsys.readouterr().out
    assert readme.main([*map(str, results), "--readme", str(page)]) == 0
    assert page.read_text() == first and "unchanged" in capsys.readouterr().out


@pytest.mark.parametrize("text, message", [
    ("# no markers\n", "found 0 and 0"),
    (f"{readme.START}\n", "found 1 and 0"),
    (f"{readme.START}\n{readme.END}\n{readme.END}\n", "found 1 and 2"),
    (f"{readme.END}\nx\n{readme.START}\n", "comes before"),
])
def test_bad_markers_exit_2_and_write_nothing(runs, text, message, capsys):
    page, results = runs
    page.write_text(text)
    assert readme.main([*map(str, results), "--readme", str(page)]) == 2
    assert message in capsys.readouterr().err
    assert page.read_text() == text
    assert not (page.parent / "docs").exists()


def test_unreadable_result_exits_2(runs, tmp_path, capsys):
    page, _ = runs
    before = page.read_text()
    (tmp_path / "bad.json").write_text("{}")
    assert readme.main([str(tmp_path / "missing.json"), "--readme", str(page)]) == 2
    assert readme.main([str(tmp_path / "bad.json"), "--readme", str(page)]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "not a bench result" in err
    assert page.read_text() == before


def test_no_plot_no_link(runs, tmp_path):
    page, _ = runs
    bare = _write_run(tmp_path / "out" / "bare", _result("offline", "baton-sidecar bench --no-plots"), ())
    readme.update_readme(page, [bare])
    assert "![" not in page.read_text()


def test_the_repository_readme_has_one_marked_section():
    section = readme.replace_section((REPO_ROOT / "README.md").read_text(), "")  # raises on bad markers
    assert "## Performance\n\n" + readme.START in section


@pytest.mark.parametrize("argv, command", [
    ([".venv/bin/baton-sidecar", "bench", "offline", "--threads", "1"], "baton-sidecar bench offline --threads 1"),
    (["/x/baton_sidecar/bench/__main__.py", "trace", "--load", "0.8"],
     "python -m baton_sidecar.bench trace --load 0.8"),
    (["baton-sidecar", "bench", "--model", "/models/my model"], "baton-sidecar bench --model '/models/my model'"),
])
def test_command_line(argv, command):
    assert command_line(argv) == command


def test_result_records_argv_command_and_machine(monkeypatch):
    parser = argparse.ArgumentParser()
    cli.add_bench_arguments(parser)
    runner = Runner(cli.run_options(parser.parse_args(["--threads", "1"])))
    argv = ["/venv/bin/baton-sidecar", "bench", "offline", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    result = base_result(runner, Plan("offline", "offline", {}, Workload("w", [BenchRequest(0, (1, 2), 3)])))
    assert result["argv"] == argv and result["command"] == "baton-sidecar bench offline --threads 1"
    assert {"cpu_model", "cpu_count", "torch_threads", "load_avg_start", "gpu"} <= set(result["host"])


def test_gpu_figures_are_marked_unmeasured_until_a_cuda_result():
    cpu = _result("offline", "baton-sidecar bench offline")
    assert "GPU figures: not yet measured" in readme.render([cpu], [[]])
    gpu = {**cpu, "device": "cuda:0"}
    text = readme.render([gpu], [[]])
    assert "not yet measured" not in text and "scripts/gpu-check.sh" in text


def test_result_section_carries_the_roofline():
    from baton_sidecar.bench import roofline

    cost = roofline.CostModel(weight_bytes=10**9, matmul_params=10**8, layers=2, heads=4, kv_heads=2, head_dim=16,
                              kv_element_size=4, weight_bytes_by_dtype={"float32": 10**9})
    peaks = {"copy_gb_per_s": 20.0, "matmul_gflop_per_s": {"float32": 100.0}, "matmul_n": 1024, "device": "cpu",
             "threads": 1}
    step = {"t": 0.0, "step_s": 0.1, "decode_s": 0.1, "rows": 2, "length": 50, "padding_ratio": 0.0}
    result = _result("offline", "baton-sidecar bench offline")
    result["roofline"] = {"peaks": peaks, "cost_model": cost.as_dict(),
                          "systems": {"baton": roofline.summarize([step], cost, peaks)}}
    section = readme.result_section(result, [])
    assert "#### Roofline" in section and "| baton | 2 | 1 | 50 |" in section
