"""``baton-sidecar bench``: compare Baton with run-to-completion and transformers baselines.

Usage (see docs/benchmarks.md)::

    python -m baton_sidecar.bench                               # offline: 32 requests at once
    python -m baton_sidecar.bench trace ../shared/data/AzureLLMInferenceTrace_conv_2023.csv --load 0.8
    python -m baton_sidecar.bench --scenario priority
    python -m baton_sidecar.bench --scenario padding
    python -m baton_sidecar.bench poisson --url http://127.0.0.1:8080 --capacity 1.5 --load 0.8

``add_bench_arguments`` fills a parser; ``run_bench(args)`` runs and returns an exit code
(0 ok, 2 bad arguments or missing data).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import EngineConfig, Limits, PolicyConfig
from . import report
from .metrics import SLO, makespan_s, ratio, summarize, summarize_by_priority, summarize_steps
from .workloads import (ARENA_ANSWERS, ARENA_QUESTIONS, AZURE_CONV, Workload, WorkloadError, all_at_once,
                        arena_workload, default_data_dir, jsonl_workload, load_token_source, offline_workload,
                        parse_range, poisson_workload, read_azure_trace, synthetic_conv_rows,
                        time_scale_for_rate, trace_workload, with_time_scale)

log = logging.getLogger("baton_sidecar.bench")

WORKLOADS = ("offline", "poisson", "trace", "prompts", "jsonl")
SCENARIOS = ("priority", "padding")
DEFAULT_SYSTEMS = {"offline": "baton,rtc,hf_static,hf_cb", "prompts": "baton,rtc,hf_static,hf_cb"}
DEFAULT_ARRIVAL_SYSTEMS = "baton,rtc,hf_cb"
DEFAULT_PADDING_SETTINGS = "1.0:off,0.6:on,0.3:on"


class BenchError(Exception):
    """A user-facing problem (bad arguments, missing data): printed, exit code 2."""


# --- arguments ------------------------------------------------------------------------------------

def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workload", nargs="?", default="offline", choices=WORKLOADS,
                        help="offline (default): all requests at t=0; poisson: random arrivals; trace FILE: "
                             "Azure LLM trace CSV; prompts [QUESTIONS]: Arena-Hard prompts with real answer "
                             "lengths; jsonl FILE: generic request file")
    parser.add_argument("path", nargs="?", help="the trace CSV, the JSONL file, or the Arena-Hard question file")

    g = parser.add_argument_group("systems")
    g.add_argument("--systems", help="comma-separated: baton, rtc, hf_static, hf_cb, sequential "
                                     "(default: baton,rtc,hf_static,hf_cb offline; baton,rtc,hf_cb with arrivals)")
    g.add_argument("--url", help="also (or, without --systems, only) load an OpenAI-compatible server at URL "
                                 "through /v1/completions with streaming")
    g.add_argument("--model-name", help="model name to send with --url (default: the first of /v1/models)")
    g.add_argument("--hf-batch-size", type=int, default=8, help="hf_static batch size (default 8)")
    g.add_argument("--repeat", type=int, default=1,
                   help="run every system N times, rotating the order, and keep each one's median run")

    g = parser.add_argument_group("workload")
    g.add_argument("--num-requests", "-n", type=int, help="requests (default 32; trace and scenarios 48)")
    g.add_argument("--prompt-len", default="10:130", help="prompt tokens LO:HI for offline/poisson (default 10:130)")
    g.add_argument("--output-len", help="output tokens LO:HI for offline/poisson (default 8:256; priority "
                                        "scenario 16:64)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--rate", type=float, help="poisson/prompts arrival rate, requests/s (instead of --load)")
    g.add_argument("--token-scale", type=float, help="divide both prompt and output token counts of the trace "
                                                     "or the answer lengths by this")
    g.add_argument("--prompt-scale", type=float, help="divide trace prompt lengths by this (default 8)")
    g.add_argument("--output-scale", type=float, help="divide trace output lengths by this (default 4; prompts: 1)")
    g.add_argument("--max-prompt", type=int, default=512, help="cap on prompt tokens after scaling (default 512)")
    g.add_argument("--max-output", type=int, default=256, help="cap on output tokens after scaling (default 256)")
    g.add_argument("--trace-start", type=float, default=0.0, help="start this many seconds into the trace")
    g.add_argument("--time-scale", type=float, help="multiply arrival offsets by this (0.5 = twice as fast)")
    g.add_argument("--load", help="offered load as a fraction of measured run-to-completion capacity; several "
                                  "comma-separated values run each (default 0.8 for trace and poisson)")
    g.add_argument("--capacity", type=float, help="run-to-completion capacity in requests/s (skips measuring it)")
    g.add_argument("--synthetic-fallback", action="store_true",
                   help="if the data files are absent, use a synthetic stand-in instead of failing")
    g.add_argument("--data-dir", type=Path, help=f"where the shared data lives (default {default_data_dir()})")

    g = parser.add_argument_group("scenarios")
    g.add_argument("--scenario", choices=SCENARIOS,
                   help="priority: mixed-priority overload, preemption vs FIFO; padding: three padding "
                        "policies on the scaled Azure conversation trace")
    g.add_argument("--urgent-fraction", type=float, default=0.2, help="priority scenario: urgent share (0.2)")
    g.add_argument("--overload", type=float, default=1.5,
                   help="priority scenario: offered rate / measured capacity (default 1.5)")
    g.add_argument("--padding-settings", default=DEFAULT_PADDING_SETTINGS,
                   help=f"padding scenario: RATIO:on|off (bucketing) list (default {DEFAULT_PADDING_SETTINGS})")

    g = parser.add_argument_group("engine and model")
    g.add_argument("--model", help="local transformers dir or .gguf (default: the embedded SmolLM2-135M)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    g.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16 | auto")
    g.add_argument("--max-batch-size", type=int, help="engine and hf_cb batch limit (default 32; priority "
                                                      "scenario 8)")
    g.add_argument("--max-kv-tokens", type=int, help="engine KV-token budget (default 65536)")
    g.add_argument("--max-prefill-tokens", type=int, help="engine prefill tokens per step (default 2048)")
    g.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    g.add_argument("--settle-load", type=float,
                   help="before each system, wait until the 1-minute load average is at most this")
    g.add_argument("--settle-timeout", type=float, default=300.0,
                   help="longest wait for --settle-load, seconds (default 300)")

    g = parser.add_argument_group("goodput SLO")
    g.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT objective, s (default 2.0; 0 = none)")
    g.add_argument("--slo-tpot", type=float, default=0.5, help="TPOT objective, s (default 0.5; 0 = none)")
    g.add_argument("--slo-e2e", type=float, default=0.0, help="end-to-end objective, s (default none)")

    g = parser.add_argument_group("ceiling")
    g.add_argument("--no-ceiling", action="store_true", help="skip the bare-forward ceiling measurements")
    g.add_argument("--ceiling-context", type=int,
                   help="context length for the ceiling (default: baton's mean decode context)")

    g = parser.add_argument_group("output")
    g.add_argument("--out", type=Path, help="output directory (default bench-results/<name>-<time>)")
    g.add_argument("--json", type=Path, help="also write the JSON report here")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton-sidecar bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_bench_arguments(parser)
    return parser


# --- the run -----------------------------------------------------------------------------------

class Bench:
    """One invocation: resolved options, the loaded model, and the result being built."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.progress = not args.no_progress
        self.slo = SLO(args.slo_ttft or None, args.slo_tpot or None, args.slo_e2e or None)
        self.data_dir = args.data_dir or default_data_dir()
        self.notes: list[str] = []
        self.loaded = None
        self.tokenizer = None
        self.engine_config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype)
        scenario_batch = 8 if args.scenario == "priority" else 32
        defaults = Limits()
        self.policy = PolicyConfig(limits=Limits(
            max_batch_size=args.max_batch_size or scenario_batch,
            max_kv_tokens=args.max_kv_tokens or defaults.max_kv_tokens,
            max_queue=defaults.max_queue,
            max_prefill_tokens=args.max_prefill_tokens or defaults.max_prefill_tokens))
        self.runs: dict[str, Any] = {}  # label -> SystemRun (for plots and raw records)

    # --- model ------------------------------------------------------------------------------

    def needs_model(self, systems: list[str]) -> bool:
        return any(s != "url" for s in systems)

    def load(self, systems: list[str]) -> None:
        import torch

        if self.args.threads:
            torch.set_num_threads(self.args.threads)
        if self.needs_model(systems):
            from ..model import load_model

            self.loaded = load_model(self.engine_config, progress=self.progress)
            self.tokenizer = self.loaded.tokenizer
        else:
            self.tokenizer = _load_tokenizer(self.engine_config)

    # --- systems ------------------------------------------------------------------------------

    def system(self, name: str):
        from .systems import URLSystem, build_system

        if name == "url":
            return URLSystem(self.args.url, self.args.model_name)
        return build_system(name, self.loaded, self.engine_config, self.policy, self.args.hf_batch_size)

    def run_system(self, label: str, system, workload: Workload) -> dict[str, Any]:
        """Run one system on one workload; return its summary (and keep the run for plots)."""
        from tqdm import tqdm

        waited = self.settle()
        with tqdm(total=workload.total_output_tokens, desc=f"{label:>14}", unit="tok", file=sys.stderr,
                  disable=not self.progress, dynamic_ncols=True, leave=True) as bar:
            run = system.run(workload, bar.update)
        self.runs[label] = run
        summary = summarize(run.records, self.slo)
        summary.update(cpu_s=run.cpu_s, wall_s=run.wall_s, load_avg_before=run.load_avg_before,
                       load_avg_after=run.load_avg_after, settle_wait_s=waited, config=run.info)
        # Less sensitive to other processes on a shared CPU than wall-clock throughput.
        # (None for a remote server: this process's CPU time is only the load generator's.)
        local = getattr(system, "local", True)
        summary["output_tokens_per_cpu_s"] = ratio(summary["output_tokens"], run.cpu_s) if local else None
        if run.steps:
            summary["engine"] = summarize_steps(run.steps)
        if any(r.priority is not None for r in run.records):
            summary["by_priority"] = summarize_by_priority(run.records, self.slo)
        tps = summary.get("output_tokens_per_s")
        log.info("%s: %s output tok/s, e2e p95 %s s", label, _num(tps), _num(summary.get("e2e_p95_s")))
        return summary

    def settle(self) -> float:
        """With ``--settle-load X``: wait until the 1-minute load average is <= X (bounded wait).

        Load from other processes on a shared machine moves wall-clock numbers far more than
        anything under test; starting every system in similar conditions keeps them comparable.
        """
        limit = self.args.settle_load
        if limit is None or not hasattr(os, "getloadavg"):
            return 0.0
        start = time.monotonic()
        deadline = start + self.args.settle_timeout
        while os.getloadavg()[0] > limit and time.monotonic() < deadline:
            time.sleep(5)
        if os.getloadavg()[0] > limit:
            self.notes.append(f"load average stayed above {limit} for {self.args.settle_timeout:.0f} s; "
                              "a system started anyway")
        return time.monotonic() - start

    def run_rounds(self, systems: dict[str, Any], workload: Workload, suffix: str = "") -> dict[str, dict[str, Any]]:
        """Every system ``--repeat`` times, the order rotated each round; keep each one's median run.

        ``systems`` maps labels to system objects. Rotation spreads slow and fast periods of a
        shared machine over all systems; the kept run is the one with the median output
        tokens/s (``repeats`` lists them all).
        """
        repeat = self.args.repeat
        labels = list(systems)
        results: dict[str, list[tuple[dict[str, Any], Any]]] = {label: [] for label in labels}
        for round_index in range(repeat):
            shift = round_index % len(labels)
            for label in labels[shift:] + labels[:shift]:
                run_label = f"{label}{suffix}" + (f"#{round_index + 1}" if repeat > 1 else "")
                summary = self.run_system(run_label, systems[label], workload)
                results[label].append((summary, self.runs.pop(run_label)))
        out = {}
        for label in labels:
            ranked = sorted(results[label], key=lambda sr: sr[0].get("output_tokens_per_s") or 0.0)
            summary, run = ranked[(len(ranked) - 1) // 2]
            if repeat > 1:
                summary["repeats"] = [s.get("output_tokens_per_s") for s, _ in results[label]]
            self.runs[f"{label}{suffix}"] = run
            out[label] = summary
        return out

    def measure_capacity(self, workload: Workload) -> dict[str, Any]:
        """Run-to-completion requests/s with the workload's requests all at t=0 (or --capacity)."""
        if self.args.capacity:
            return {"requests_per_s": self.args.capacity, "source": "--capacity"}
        if self.loaded is None:
            raise BenchError("--load needs --capacity (requests/s) when only --url is benchmarked")
        summary = self.run_system("capacity(rtc)", self.system("rtc"), all_at_once(workload))
        return {"requests_per_s": summary["requests_per_s"], "source": "measured: rtc, all requests at t=0",
                "output_tokens_per_s": summary["output_tokens_per_s"], "duration_s": summary["duration_s"]}

    # --- ceiling -------------------------------------------------------------------------------

    def ceiling(self, result: dict[str, Any], token_source) -> None:
        from tqdm import tqdm

        from .ceiling import ceiling_batch_sizes, compare_decode_step, efficiency, measure_ceiling

        engine_runs = {n: r for n, r in self.runs.items() if r.steps and not n.startswith("capacity")}
        steps = [s for r in engine_runs.values() for s in r.steps if s.get("rows", 0) > 0]
        seen = sorted({int(s["rows"]) for s in steps})
        context = self.args.ceiling_context or (int(sum(s["length"] for s in steps) / len(steps)) if steps else 192)
        sizes = ceiling_batch_sizes(seen)
        with tqdm(total=len(sizes) + 1, desc="       ceiling", unit="pt", file=sys.stderr,
                  disable=not self.progress) as bar:
            result["ceiling"] = measure_ceiling(self.loaded, sizes, context=context, progress=bar.update)
            result["decode_step_b16"] = compare_decode_step(self.loaded, token_source, batch=16, context=128)
            bar.update(1)
        result["efficiency"] = {}
        for name, run in engine_runs.items():
            summary = result["systems"].get(name)
            if summary is not None:
                result["efficiency"][name] = efficiency(run.steps, result["ceiling"], makespan_s(run.records),
                                                        summary.get("output_tokens_per_s"))


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def _load_tokenizer(config: EngineConfig):
    """The tokenizer alone (``--url`` only: the model's weights are not needed)."""
    from transformers import AutoTokenizer

    from ..model import converted_gguf_dir, embedded_model_path

    source = Path(config.model) if config.model else embedded_model_path()
    if source.suffix == ".gguf":
        source = converted_gguf_dir(source)
    return AutoTokenizer.from_pretrained(source)


def _systems(args: argparse.Namespace, default: str) -> list[str]:
    if args.systems:
        names = [s.strip() for s in args.systems.split(",") if s.strip()]
    elif args.url:
        names = []
    else:
        names = default.split(",")
    if args.url:
        names.append("url")
    if not names:
        raise BenchError("no systems to run")
    known = {"baton", "rtc", "hf_static", "hf_cb", "sequential", "url"}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BenchError(f"--systems: unknown system {unknown[0]!r}; known: {', '.join(sorted(known - {'url'}))}")
    if len(set(names)) != len(names):
        raise BenchError("--systems: a system is listed twice")
    return names


def _loads(args: argparse.Namespace, default: str | None) -> list[float] | None:
    text = args.load if args.load is not None else default
    if text is None:
        return None
    try:
        loads = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"--load: expected fractions like 0.8 or 0.5,0.8,1.0, got {text!r}") from None
    if not loads or any(x <= 0 for x in loads):
        raise BenchError("--load: fractions must be > 0")
    return loads


# --- workloads from arguments ------------------------------------------------------------------

def _trace_rows(bench: Bench, path: str | None):
    args = bench.args
    trace_path = Path(path) if path else bench.data_dir / AZURE_CONV
    if trace_path.is_file():
        return read_azure_trace(trace_path), str(trace_path)
    message = (f"trace file {trace_path} is absent (the Azure LLM inference trace, CC-BY-4.0: "
               "Azure/AzurePublicDataset data/AzureLLMInferenceTrace_conv.csv)")
    if not args.synthetic_fallback:
        raise BenchError(message + "; pass --synthetic-fallback to use a synthetic stand-in")
    print(f"warning: {message}; using a synthetic stand-in (--synthetic-fallback)", file=sys.stderr)
    bench.notes.append(f"{message}; a synthetic stand-in with the trace's rate and length medians was used")
    n = (args.num_requests or 48) + 1
    return synthetic_conv_rows(max(n, 64), args.seed), "synthetic (Azure conv rate and medians)"


def _token_source(bench: Bench):
    source = load_token_source(bench.tokenizer, bench.data_dir)
    if source.origin.startswith("synthetic"):
        message = f"Arena-Hard text is absent from {bench.data_dir}: prompts are random token ids"
        if not bench.args.synthetic_fallback:
            raise BenchError(message + "; pass --synthetic-fallback to accept that")
        print(f"warning: {message}", file=sys.stderr)
        bench.notes.append(message)
    return source


def build_workload(bench: Bench, kind: str, token_source) -> Workload:
    """The base workload (arrivals unscaled) for ``kind``."""
    args = bench.args
    n = args.num_requests
    prompt_range = parse_range(args.prompt_len, "--prompt-len")
    output_default = "16:64" if args.scenario == "priority" else "8:256"
    output_range = parse_range(args.output_len or output_default, "--output-len")
    if kind == "offline":
        return offline_workload(token_source, n or 32, prompt_range, output_range, args.seed)
    if kind == "poisson":
        return poisson_workload(token_source, args.rate or 1.0, n or 32, prompt_range, output_range, args.seed)
    if kind == "trace":
        rows, origin = _trace_rows(bench, args.path)
        return trace_workload(rows, token_source, num_requests=n or 48, start_s=args.trace_start,
                              prompt_scale=args.prompt_scale or args.token_scale or 8.0,
                              output_scale=args.output_scale or args.token_scale or 4.0,
                              max_prompt=args.max_prompt, max_output=args.max_output, seed=args.seed,
                              origin=origin)
    if kind == "prompts":
        questions = Path(args.path) if args.path else bench.data_dir / ARENA_QUESTIONS
        answers = questions.parent / ARENA_ANSWERS
        if not (questions.is_file() and answers.is_file()):
            raise BenchError(f"Arena-Hard files are absent ({questions}, {answers}); the prompts workload "
                             "needs both (lmarena/arena-hard-auto data/arena-hard-v0.1)")
        return arena_workload(questions, answers, bench.tokenizer, num_requests=n or 32,
                              output_scale=args.output_scale or args.token_scale or 1.0,
                              max_prompt=args.max_prompt, max_output=args.max_output, rate=args.rate,
                              seed=args.seed)
    if kind == "jsonl":
        if not args.path:
            raise BenchError("jsonl needs a FILE argument")
        return jsonl_workload(Path(args.path), bench.tokenizer, len(bench.tokenizer))
    raise BenchError(f"unknown workload {kind!r}")


# --- the plans ---------------------------------------------------------------------------------

def _base_result(bench: Bench, title: str, workload: Workload) -> dict[str, Any]:
    import torch
    import transformers

    loaded = bench.loaded
    device = str(loaded.device) if loaded else None
    return {
        "schema_version": 1,
        "title": title,
        "started_at": datetime.now().isoformat(timespec="seconds"),
        "argv": list(sys.argv),
        "command": command_line(sys.argv),
        "model": loaded.name if loaded else bench.args.model_name,
        "device": device,
        "dtype": bench.engine_config.dtype,
        "host": {"platform": platform.platform(), "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
                 "gpu": torch.cuda.get_device_name(device) if device and device.startswith("cuda") else None,
                 "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                 "transformers": transformers.__version__,
                 "load_avg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "policy": {"max_batch_size": bench.policy.limits.max_batch_size,
                   "max_kv_tokens": bench.policy.limits.max_kv_tokens,
                   "max_prefill_tokens": bench.policy.limits.max_prefill_tokens},
        "workload": workload.summary(),
        "slo": bench.slo.as_dict(),
        "baseline": "baton",
        "systems": {},
        "notes": bench.notes,
    }


def command_line(argv: Sequence[str]) -> str:
    """``argv`` as one would type it: the program's name without its directory, arguments quoted.

    ``python -m baton_sidecar.bench`` runs with ``argv[0]`` = that package's ``__main__.py``.
    """
    program = Path(argv[0]).name if argv else "baton-sidecar"
    if program == "__main__.py":
        program = "python -m baton_sidecar.bench"
    return " ".join([program, *map(shlex.quote, argv[1:])])


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or None


def plan_systems(bench: Bench, kind: str) -> dict[str, Any]:
    """Offline / arrival workloads: every system on the identical requests, at one or more loads."""
    args = bench.args
    default_systems = DEFAULT_SYSTEMS.get(kind, DEFAULT_ARRIVAL_SYSTEMS)
    systems = _systems(args, default_systems)
    bench.load(systems)
    source = _token_source(bench) if kind in ("offline", "poisson", "trace") else None
    base = build_workload(bench, kind, source)

    has_arrivals = kind in ("poisson", "trace") or (kind == "prompts" and args.rate) or (
        kind == "jsonl" and base.span_s > 0)
    default_load = "0.8" if kind in ("trace", "poisson") and not args.rate and not args.time_scale else None
    loads = _loads(args, default_load) if has_arrivals or args.load else None
    if args.time_scale:
        base = with_time_scale(base, args.time_scale)
        loads = None
    result = _base_result(bench, kind, base)
    result["systems_order"] = systems

    capacity = None
    if loads:
        capacity = bench.measure_capacity(base)
        result["capacity"] = capacity
    points = []
    for load in loads or [None]:
        workload = base
        if load is not None:
            rate = load * capacity["requests_per_s"]
            workload = with_time_scale(base, time_scale_for_rate(base, rate), load=load,
                                       offered_rate_req_per_s=rate)
        suffix = "" if load is None or len(loads) == 1 else f"@{load}"
        summaries = bench.run_rounds({name: bench.system(name) for name in systems}, workload, suffix)
        points.append((load, workload, summaries))

    result["workload"] = points[0][1].summary()
    result["systems"] = points[0][2]
    if loads and len(loads) > 1:
        result["loads"] = {str(load): {"load": load, "time_scale": w.description.get("time_scale"),
                                       "offered_rate_req_per_s": w.description.get("offered_rate_req_per_s"),
                                       "systems": s} for load, w, s in points}
    if "baton" in systems and bench.loaded is not None and not args.no_ceiling:
        bench.ceiling(result, source or _token_source(bench))
    result["ratios_vs_baton"] = _ratios(result["systems"])
    result["floors"] = _system_floors(kind, result)
    return result


def _ratios(systems: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Baton divided by each other system, metric by metric.

    ``output_tokens_per_s`` and ``requests_per_s``: > 1 = baton faster. Latency keys
    (``ttft_p95_s``, ``e2e_p50_s``, ``e2e_p95_s``, ``e2e_p99_s``): < 1 = baton's latency lower.
    """
    baton = systems.get("baton")
    if not baton:
        return {}
    out = {}
    for name, s in systems.items():
        if name == "baton":
            continue
        out[name] = {"output_tokens_per_s": ratio(baton.get("output_tokens_per_s"), s.get("output_tokens_per_s")),
                     "requests_per_s": ratio(baton.get("requests_per_s"), s.get("requests_per_s"))}
        for key in ("ttft_p95_s", "e2e_p50_s", "e2e_p95_s", "e2e_p99_s"):
            out[name][key] = ratio(baton.get(key), s.get(key))
    return out


def _floor(name: str, measured: float | None, target: str, ok: Callable[[float], bool]) -> dict[str, Any]:
    return {"name": name, "measured": measured, "target": target,
            "met": None if measured is None else bool(ok(measured))}


def _system_floors(kind: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    floors = []
    ratios = result.get("ratios_vs_baton", {})
    if kind == "offline":
        if "hf_static" in ratios:
            floors.append(_floor("offline: baton / hf_static output tok/s",
                                 ratios["hf_static"]["output_tokens_per_s"], ">= 1.75", lambda x: x >= 1.75))
        if "hf_cb" in ratios:
            floors.append(_floor("offline: baton / hf_cb output tok/s",
                                 ratios["hf_cb"]["output_tokens_per_s"], ">= 1.2", lambda x: x >= 1.2))
    elif kind in ("trace", "poisson", "prompts", "jsonl"):
        if "rtc" in ratios:
            floors.append(_floor(f"{kind}: baton e2e p95 / rtc e2e p95", ratios["rtc"]["e2e_p95_s"], "<= 0.6",
                                 lambda x: x <= 0.6))
        if "hf_cb" in ratios:
            floors.append(_floor(f"{kind}: baton e2e p95 / hf_cb e2e p95", ratios["hf_cb"]["e2e_p95_s"],
                                 "<= 0.8", lambda x: x <= 0.8))
    step = result.get("decode_step_b16")
    if step:
        floors.append(_floor("decode step at batch 16: ModelRunner.decode / bare forward",
                             step["decode_vs_bare"], "<= 1.10", lambda x: x <= 1.10))
        floors.append(_floor("decode step at batch 16: whole EngineCore.step / bare forward",
                             step["step_vs_bare"], "<= 1.10", lambda x: x <= 1.10))
    return floors


def plan_priority(bench: Bench) -> dict[str, Any]:
    """Mixed-priority overload: urgent TTFT with preemption vs FIFO without it."""
    from .systems import EngineSystem
    from .workloads import assign_priorities

    args = bench.args
    bench.load(["baton"])
    source = _token_source(bench)
    n = args.num_requests or 48
    args.num_requests = n
    base = build_workload(bench, "offline", source)
    base = assign_priorities(base, args.urgent_fraction, args.seed)
    rebatch = replace(bench.engine_config, batching="rebatch")
    policy = bench.policy

    def engine(mode: str, use_priorities: bool) -> EngineSystem:
        p = replace(policy, preemption=replace(policy.preemption, mode=mode))
        return EngineSystem("baton", bench.loaded, rebatch, p, use_priorities=use_priorities, fixed_priority=10)

    # Capacity: FIFO baton with every request at t=0 (what the engine sustains flat out).
    if args.capacity:
        capacity = {"requests_per_s": args.capacity, "source": "--capacity"}
    else:
        s = bench.run_system("capacity(fifo)", engine("off", False), all_at_once(base))
        capacity = {"requests_per_s": s["requests_per_s"], "output_tokens_per_s": s["output_tokens_per_s"],
                    "source": "measured: baton, preemption off, priorities ignored, all requests at t=0"}
    rate = args.overload * capacity["requests_per_s"]
    poisson = poisson_workload(source, 1.0, n, parse_range(args.prompt_len, "--prompt-len"),
                               parse_range(args.output_len or "16:64", "--output-len"), args.seed)
    poisson = assign_priorities(poisson, args.urgent_fraction, args.seed)
    workload = with_time_scale(poisson, time_scale_for_rate(poisson, rate), overload=args.overload,
                               offered_rate_req_per_s=rate)
    result = _base_result(bench, "scenario: priority", workload)
    result["capacity"] = capacity
    variants = {
        "fifo": engine("off", False),  # one priority for all, no preemption
        "priority_no_preempt": engine("off", True),  # priority order, no preemption
        "preempt_swap": engine("swap", True),
        "preempt_recompute": engine("recompute", True),
    }
    result["systems"] = bench.run_rounds(variants, workload)
    urgent_key = "priority_0"
    fifo = result["systems"]["fifo"]
    fifo_urgent = fifo["by_priority"].get(urgent_key, {}).get("ttft_p95_s")
    scenario: dict[str, Any] = {"name": "priority", "urgent_class": urgent_key,
                                "fifo": "preemption off, every request submitted with priority 10 (arrival order)",
                                "variants": {}}
    floors = []
    for label, summary in result["systems"].items():
        urgent = summary["by_priority"].get(urgent_key, {}).get("ttft_p95_s")
        cost = 1 - summary["output_tokens_per_s"] / fifo["output_tokens_per_s"] \
            if summary.get("output_tokens_per_s") and fifo.get("output_tokens_per_s") else None
        scenario["variants"][label] = {
            "urgent_ttft_p95_s": urgent, "urgent_ttft_p95_vs_fifo": ratio(urgent, fifo_urgent),
            "normal_ttft_p95_s": summary["by_priority"].get("priority_10", {}).get("ttft_p95_s"),
            "output_tokens_per_s": summary.get("output_tokens_per_s"), "throughput_cost_vs_fifo": cost,
            "preemptions": summary.get("preemptions")}
        if label.startswith("preempt_"):
            floors.append(_floor(f"priority: {label} urgent TTFT p95 / fifo", ratio(urgent, fifo_urgent),
                                 "<= 0.333", lambda x: x <= 1 / 3))
            floors.append(_floor(f"priority: {label} throughput cost vs fifo", cost, "<= 0.10",
                                 lambda x: x <= 0.10))
    result["scenario"] = scenario
    result["by_priority"] = {label: s["by_priority"] for label, s in result["systems"].items()}
    result["floors"] = floors
    result["baseline"] = "fifo"
    return result


def _padding_settings(text: str) -> list[tuple[float, bool]]:
    settings = []
    for item in text.split(","):
        try:
            value, _, bucket = item.strip().partition(":")
            ratio_value = float(value)
        except ValueError:
            raise BenchError(f"--padding-settings: bad item {item!r} (expected RATIO:on|off)") from None
        if not 0 <= ratio_value <= 1 or bucket not in ("on", "off", ""):
            raise BenchError(f"--padding-settings: bad item {item!r} (ratio in [0, 1], on|off)")
        settings.append((ratio_value, bucket == "on"))
    return settings


def plan_padding(bench: Bench) -> dict[str, Any]:
    """Three padding policies on the scaled Azure conversation trace."""
    from .systems import EngineSystem

    args = bench.args
    settings = _padding_settings(args.padding_settings)
    bench.load(["baton"])
    source = _token_source(bench)
    base = build_workload(bench, "trace", source)
    if args.time_scale:
        workload = with_time_scale(base, args.time_scale)
        capacity = None
    else:
        # At 0.8 of rtc capacity the trace keeps ~2 rows running: too few to pad. 1.5 keeps a batch.
        load = (_loads(args, "1.5") or [1.5])[0]
        capacity = bench.measure_capacity(base)
        rate = load * capacity["requests_per_s"]
        workload = with_time_scale(base, time_scale_for_rate(base, rate), load=load, offered_rate_req_per_s=rate)
    result = _base_result(bench, "scenario: padding", workload)
    if capacity:
        result["capacity"] = capacity
    rebatch = replace(bench.engine_config, batching="rebatch")
    scenario: dict[str, Any] = {"name": "padding", "variants": {}}
    variants, settings_by_label = {}, {}
    for value, bucketing in settings:
        shown = f"{value:.1f}" if round(value, 1) == value else f"{value:g}"
        label = f"pad{shown}" + ("_bucket" if bucketing else "_nobucket")
        policy = replace(bench.policy, padding=replace(bench.policy.padding, max_padding_ratio=value,
                                                       bucketing=bucketing))
        variants[label] = EngineSystem(label, bench.loaded, rebatch, policy)
        settings_by_label[label] = (value, bucketing)
    result["systems"] = bench.run_rounds(variants, workload)
    for label, summary in result["systems"].items():
        value, bucketing = settings_by_label[label]
        engine = summary.get("engine", {})
        scenario["variants"][label] = {
            "max_padding_ratio": value, "bucketing": bucketing,
            "padding_ratio_time_weighted": engine.get("padding_ratio_time_weighted"),
            "padding_ratio_slot_weighted": engine.get("padding_ratio_slot_weighted"),
            "output_tokens_per_s": summary.get("output_tokens_per_s"),
            "e2e_p95_s": summary.get("e2e_p95_s"), "ttft_p95_s": summary.get("ttft_p95_s"),
            "mean_batch_size": engine.get("mean_batch_size")}
    result["scenario"] = scenario
    result["baseline"] = next(iter(result["systems"]), None)
    result["floors"] = []
    return result


# --- entry point -------------------------------------------------------------------------------

def run_bench(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        _validate(args)
        bench = Bench(args)
        if args.scenario == "priority":
            result = plan_priority(bench)
        elif args.scenario == "padding":
            result = plan_padding(bench)
        else:
            result = plan_systems(bench, args.workload)
    except (BenchError, WorkloadError, ValueError) as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    write_outputs(bench, result)
    return 0


def _validate(args: argparse.Namespace) -> None:
    if args.scenario and args.workload not in ("offline", "trace"):
        raise BenchError("--scenario runs its own workload; leave the workload argument out")
    if args.path is not None and args.workload not in ("trace", "jsonl", "prompts"):
        raise BenchError(f"{args.workload} takes no FILE argument")
    for name in ("num_requests", "hf_batch_size", "repeat", "max_batch_size", "max_kv_tokens", "max_prefill_tokens",
                 "threads", "max_prompt", "max_output", "ceiling_context"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise BenchError(f"--{name.replace('_', '-')}: must be >= 1")
    for name in ("rate", "token_scale", "prompt_scale", "output_scale", "time_scale", "capacity", "overload"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise BenchError(f"--{name.replace('_', '-')}: must be > 0")
    if not 0 <= args.urgent_fraction <= 1:
        raise BenchError("--urgent-fraction: must be in [0, 1]")
    if args.url and not args.url.startswith(("http://", "https://")):
        raise BenchError("--url: must be an http(s) URL")
    _padding_settings(args.padding_settings)
    # Fail on missing data before loading the model (a few seconds) rather than after.
    if (args.workload == "trace" or args.scenario == "padding") and not args.synthetic_fallback:
        trace = Path(args.path) if args.path else (args.data_dir or default_data_dir()) / AZURE_CONV
        if not trace.is_file():
            raise BenchError(f"trace file {trace} is absent (the Azure LLM inference trace, CC-BY-4.0: "
                             "Azure/AzurePublicDataset data/AzureLLMInferenceTrace_conv.csv); pass "
                             "--synthetic-fallback to use a synthetic stand-in")


def write_outputs(bench: Bench, result: dict[str, Any]) -> Path:
    args = bench.args
    name = args.scenario or args.workload
    out = args.out or Path("bench-results") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    result["output_dir"] = str(out)
    report.write_json(result, out / "result.json")
    if args.json:
        report.write_json(result, args.json)
    runs = {label: run for label, run in bench.runs.items()}
    report.write_json({label: report.records_to_json(run.records) for label, run in runs.items()},
                      out / "requests.json")
    steps = {label: run.steps for label, run in runs.items() if run.steps}
    if steps:
        report.write_json(steps, out / "steps.json")
    if not args.no_plots:
        try:
            measured = {label: run.records for label, run in runs.items() if not label.startswith("capacity")}
            report.plot_latency_cdfs(measured, out / "latency_cdf.png", result.get("title", ""))
            if result.get("loads"):
                report.plot_vs_load(result["loads"], out / "vs_load.png")
            if args.scenario == "padding":
                report.plot_padding({k: v for k, v in steps.items() if not k.startswith("capacity")},
                                    out / "padding.png")
        except ImportError as error:
            bench.notes.append(f"plots skipped: {error}")
    markdown = report.markdown_report(result)
    (out / "report.md").write_text(markdown)
    print(markdown)
    _print_ratios(result)
    print(f"results: {out}/ (result.json, report.md, requests.json"
          f"{', steps.json' if steps else ''}{'' if args.no_plots else ', *.png'})")
    return out


def _print_ratios(result: dict[str, Any]) -> None:
    for name, r in (result.get("ratios_vs_baton") or {}).items():
        print(f"baton vs {name}: output tok/s x{_num(r.get('output_tokens_per_s'), '{:.2f}')}, "
              f"e2e p95 x{_num(r.get('e2e_p95_s'), '{:.2f}')} (baton/{name})")


def main(argv: list[str] | None = None) -> int:
    return run_bench(build_parser().parse_args(argv))


__all__ = ["add_bench_arguments", "run_bench", "build_parser", "main"]
