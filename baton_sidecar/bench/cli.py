"""``baton-sidecar bench``: compare Baton with run-to-completion and transformers baselines.

Usage (see docs/benchmarks.md)::

    python -m baton_sidecar.bench                               # offline: 32 requests at once
    python -m baton_sidecar.bench trace ../shared/data/AzureLLMInferenceTrace_conv_2023.csv --load 0.8
    python -m baton_sidecar.bench --scenario priority
    python -m baton_sidecar.bench --scenario padding
    python -m baton_sidecar.bench --scenario features
    python -m baton_sidecar.bench --scenario long-prompts --threads 1
    python -m baton_sidecar.bench poisson --url http://127.0.0.1:8080 --capacity 1.5 --load 0.8
    python -m baton_sidecar.bench --systems baton,hf_serve --http-api chat
    python -m baton_sidecar.bench --systems baton,llama_server --llama-server ~/llama.cpp/build/bin/llama-server

``add_bench_arguments`` fills a parser; ``run_bench(args)`` checks the arguments, gets a plan
from the plan module of the workload or scenario (``plans/``), runs it (``runner``) and
writes the report (``report``); it returns an exit code (0 ok, 2 bad arguments or missing data).
This module reads ``args``; nothing past it sees the namespace.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime
from pathlib import Path

from ..config import QUANTIZATIONS, EngineConfig, Limits, PolicyConfig
from . import report
from .inputs import BenchError, WorkloadOptions, check_trace
from .metrics import SLO
from .plans import compare, features, long_prompts, padding, priority
from .runner import Plan, RunOptions, Runner
from .servers import llama_server_binary
from .workloads import WorkloadError, default_data_dir, parse_range

WORKLOADS = ("offline", "poisson", "trace", "prompts", "jsonl")
SCENARIOS = ("priority", "padding", "features", "long-prompts")
POSITIVE_INTS = ("num_requests", "hf_batch_size", "llama_parallel", "repeat", "max_batch_size", "max_kv_tokens",
                 "max_prefill_tokens", "threads", "max_prompt", "max_output", "ceiling_context")
POSITIVE_FLOATS = ("rate", "token_scale", "prompt_scale", "output_scale", "time_scale", "capacity", "overload",
                   "duration", "short_rate", "long_interval", "max_step_ms")


# --- arguments ------------------------------------------------------------------------------------

def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workload", nargs="?", default="offline", choices=WORKLOADS,
                        help="offline (default): all requests at t=0; poisson: random arrivals; trace FILE: "
                             "Azure LLM trace CSV; prompts [QUESTIONS]: Arena-Hard prompts with real answer "
                             "lengths; jsonl FILE: generic request file")
    parser.add_argument("path", nargs="?", help="the trace CSV, the JSONL file, or the Arena-Hard question file")
    for add_group in (_systems_arguments, _workload_arguments, _scenario_arguments, _engine_arguments,
                      _slo_arguments, _ceiling_arguments, _output_arguments):
        add_group(parser)


def _systems_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("systems")
    g.add_argument("--systems", help="comma-separated: baton, baton_int8, rtc, hf_static, hf_cb, sequential, "
                                     "hf_serve, llama_server, baton_serve (default: baton,rtc,hf_static,hf_cb "
                                     "offline; baton,rtc,hf_cb with arrivals); long-prompts scenario: some "
                                     "of baton_tokens, baton_time, baton_fused, hf_cb, llama_server")
    g.add_argument("--url", help="also (or, without --systems, only) load an OpenAI-compatible server at URL, "
                                 "streamed, in the mode a probe settles (docs/benchmarks.md)")
    g.add_argument("--model-name", help="model name to send with --url (default: the first of /v1/models)")
    g.add_argument("--http-api", choices=("completions", "chat"), default="completions",
                   help="servers (--url, hf_serve, llama_server): /v1/completions or /v1/chat/completions")
    g.add_argument("--http-prompt", choices=("auto", "ids", "text"), default="auto",
                   help="servers: prompts as token ids (auto: when the server takes them) or decoded text")
    g.add_argument("--llama-server", metavar="PATH",
                   help="llama.cpp's llama-server binary for the llama_server system (default $BATON_LLAMA_SERVER)")
    g.add_argument("--llama-parallel", type=int, default=16, help="llama_server slots (--parallel, default 16)")
    g.add_argument("--hf-batch-size", type=int, default=8, help="hf_static batch size (default 8)")
    g.add_argument("--repeat", type=int, default=1,
                   help="run every system N times, rotating the order, and keep each one's median run")


def _workload_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--num-requests", "-n", type=int, help="requests (default 32; trace and scenarios 48)")
    g.add_argument("--prompt-len", default="10:130", help="prompt tokens LO:HI for offline/poisson (default 10:130)")
    g.add_argument("--output-len", help="output tokens LO:HI for offline/poisson (default 8:256; priority "
                                        "scenario 16:64, features scenario 16:128)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--rate", type=float, help="poisson/prompts arrival rate, requests/s (instead of --load); "
                                              "features scenario: Poisson arrivals instead of all at t=0")
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


def _scenario_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("scenarios")
    g.add_argument("--scenario", choices=SCENARIOS,
                   help="priority: mixed-priority overload, preemption vs FIFO; padding: three padding "
                        "policies on the scaled Azure conversation trace; features: JSON schemas, n=3 and "
                        "penalties mixed in, against the same requests plain; long-prompts: short "
                        "interactive streams while long prompts prefill, against the short streams alone")
    g.add_argument("--urgent-fraction", type=float, default=0.2, help="priority scenario: urgent share (0.2)")
    g.add_argument("--overload", type=float, default=1.5,
                   help="priority scenario: offered rate / measured capacity (default 1.5)")
    g.add_argument("--padding-settings", default=padding.DEFAULT_SETTINGS,
                   help=f"padding scenario: RATIO:on|off (bucketing) list (default {padding.DEFAULT_SETTINGS})")
    mix = long_prompts.Mix()
    g.add_argument("--duration", type=float, default=mix.duration_s,
                   help="long-prompts scenario: seconds of short arrivals (long ones stop "
                        f"{mix.long_tail_s:g} s earlier)")
    g.add_argument("--short-rate", type=float, default=mix.short_rate,
                   help="long-prompts scenario: short requests per second, Poisson")
    g.add_argument("--short-prompt-len", default=_range_text(mix.short_prompt),
                   help="long-prompts scenario: short prompt tokens LO:HI")
    g.add_argument("--short-output-len", default=_range_text(mix.short_output),
                   help="long-prompts scenario: short output tokens LO:HI")
    g.add_argument("--long-interval", type=float, default=mix.long_interval_s,
                   help="long-prompts scenario: mean seconds between long prompts, Poisson")
    g.add_argument("--long-prompt-len", default=_range_text(mix.long_prompt),
                   help="long-prompts scenario: long prompt tokens LO:HI")
    g.add_argument("--long-output-len", default=_range_text(mix.long_output),
                   help="long-prompts scenario: long output tokens LO:HI")


def _range_text(lo_hi: tuple[int, int]) -> str:
    return f"{lo_hi[0]}:{lo_hi[1]}" if lo_hi[0] != lo_hi[1] else str(lo_hi[0])


def _engine_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine and model")
    g.add_argument("--model", help="local transformers dir or .gguf (default: the embedded SmolLM2-135M)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    g.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16 | auto")
    g.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help="in-process Baton engines: none | int8 (CPU only; default none)")
    g.add_argument("--max-batch-size", type=int, help="engine and hf_cb batch limit (default 32; priority "
                                                      "scenario 8)")
    g.add_argument("--max-kv-tokens", type=int, help="engine KV-token budget (default 65536)")
    g.add_argument("--max-prefill-tokens", type=int, help="engine prefill tokens per step at most (default 512)")
    g.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    g.add_argument("--max-step-ms", type=float,
                   help="engine step-time target of the time prefill budget, ms (default: the interactive "
                        "SLA class's tpot_ms)")
    g.add_argument("--settle-load", type=float,
                   help="before each system, wait until the 1-minute load average is at most this")
    g.add_argument("--settle-timeout", type=float, default=300.0,
                   help="longest wait for --settle-load, seconds (default 300)")


def _slo_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("goodput SLO")
    g.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT objective, s (default 2.0; 0 = none)")
    g.add_argument("--slo-tpot", type=float, default=0.5, help="TPOT objective, s (default 0.5; 0 = none)")
    g.add_argument("--slo-e2e", type=float, default=0.0, help="end-to-end objective, s (default none)")


def _ceiling_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ceiling")
    g.add_argument("--no-ceiling", action="store_true", help="skip the bare-forward ceiling measurements")
    g.add_argument("--ceiling-context", type=int,
                   help="context length for the ceiling (default: baton's mean decode context)")
    g.add_argument("--no-roofline", action="store_true",
                   help="skip the roofline (this machine's copy bandwidth and matmul peaks, about 1 s on a CPU)")


def _output_arguments(parser: argparse.ArgumentParser) -> None:
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


def validate(args: argparse.Namespace) -> None:
    """Reject bad arguments before anything loads; ``BenchError`` names the option."""
    if args.scenario and args.workload not in ("offline", "trace"):
        raise BenchError("--scenario runs its own workload; leave the workload argument out")
    if args.path is not None and args.workload not in ("trace", "jsonl", "prompts"):
        raise BenchError(f"{args.workload} takes no FILE argument")
    for name in POSITIVE_INTS:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise BenchError(f"--{name.replace('_', '-')}: must be >= 1")
    for name in POSITIVE_FLOATS:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise BenchError(f"--{name.replace('_', '-')}: must be > 0")
    if not 0 <= args.urgent_fraction <= 1:
        raise BenchError("--urgent-fraction: must be in [0, 1]")
    if args.url and not args.url.startswith(("http://", "https://")):
        raise BenchError("--url: must be an http(s) URL")
    if "llama_server" in (args.systems or "").split(",") and llama_server_binary(args.llama_server) is None:
        raise BenchError("llama_server: name the binary with --llama-server PATH or $BATON_LLAMA_SERVER")
    padding.parse_settings(args.padding_settings)


# --- options: what each part takes from the arguments ----------------------------------------------

def workload_options(args: argparse.Namespace) -> WorkloadOptions:
    return WorkloadOptions(
        num_requests=args.num_requests, prompt_range=parse_range(args.prompt_len, "--prompt-len"),
        output_range=parse_range(args.output_len, "--output-len") if args.output_len else None,
        seed=args.seed, rate=args.rate, token_scale=args.token_scale, prompt_scale=args.prompt_scale,
        output_scale=args.output_scale, max_prompt=args.max_prompt, max_output=args.max_output,
        trace_start_s=args.trace_start, time_scale=args.time_scale, load=args.load, path=args.path,
        data_dir=args.data_dir or default_data_dir(), synthetic_fallback=args.synthetic_fallback)


def mix_options(args: argparse.Namespace) -> long_prompts.Mix:
    """The long-prompts scenario's two streams."""
    return long_prompts.Mix(
        duration_s=args.duration, short_rate=args.short_rate,
        short_prompt=parse_range(args.short_prompt_len, "--short-prompt-len"),
        short_output=parse_range(args.short_output_len, "--short-output-len"), long_interval_s=args.long_interval,
        long_prompt=parse_range(args.long_prompt_len, "--long-prompt-len"),
        long_output=parse_range(args.long_output_len, "--long-output-len"))


def run_options(args: argparse.Namespace) -> RunOptions:
    defaults = Limits()
    batch = priority.MAX_BATCH_SIZE if args.scenario == "priority" else 32
    limits = Limits(max_batch_size=args.max_batch_size or batch,
                    max_kv_tokens=args.max_kv_tokens or defaults.max_kv_tokens, max_queue=defaults.max_queue,
                    max_prefill_tokens=args.max_prefill_tokens or defaults.max_prefill_tokens)
    return RunOptions(
        engine_config=EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                   quantization=args.quantization),
        policy=PolicyConfig(limits=limits, max_step_ms=args.max_step_ms),
        slo=SLO(args.slo_ttft or None, args.slo_tpot or None, args.slo_e2e or None),
        progress=not args.no_progress, threads=args.threads, repeat=args.repeat, settle_load=args.settle_load,
        settle_timeout_s=args.settle_timeout, hf_batch_size=args.hf_batch_size, url=args.url,
        model_name=args.model_name, http_api=args.http_api, http_prompt=args.http_prompt,
        llama_server=args.llama_server, llama_parallel=args.llama_parallel,
        llama_slot_context=long_prompts.slot_context(mix_options(args)) if args.scenario == "long-prompts" else None)


def make_plan(args: argparse.Namespace, runner: Runner) -> Plan:
    """The plan of the scenario, or of the workload; loads the model on ``runner``."""
    workload = workload_options(args)
    if args.workload == "trace" or args.scenario == "padding":
        check_trace(workload)  # before loading the model (a few seconds) rather than after
    if args.scenario == "priority":
        return priority.plan(runner, workload, urgent_fraction=args.urgent_fraction, overload=args.overload,
                             capacity=args.capacity)
    if args.scenario == "padding":
        return padding.plan(runner, workload, settings=padding.parse_settings(args.padding_settings),
                            capacity=args.capacity)
    if args.scenario == "features":
        return features.plan(runner, workload)
    if args.scenario == "long-prompts":
        return long_prompts.plan(runner, workload, mix_options(args), systems=args.systems)
    return compare.plan(runner, args.workload, workload, systems=args.systems, capacity=args.capacity,
                        ceiling=not args.no_ceiling, ceiling_context=args.ceiling_context,
                        roofline=not args.no_roofline)


# --- entry point -------------------------------------------------------------------------------

def run_bench(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        validate(args)
        runner = Runner(run_options(args))
        result = runner.execute(make_plan(args, runner))
    except (BenchError, WorkloadError, ValueError) as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    out = args.out or Path("bench-results") / f"{args.scenario or args.workload}-{datetime.now():%Y%m%d-%H%M%S}"
    report.write_outputs(result, runner.runs, out, json_path=args.json, plots=not args.no_plots,
                         padding_plot=args.scenario == "padding")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_bench(build_parser().parse_args(argv))


__all__ = ["add_bench_arguments", "build_parser", "make_plan", "run_bench", "main"]
