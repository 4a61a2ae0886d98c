"""Running a plan: systems over a workload, repeats, the settle-load gate, the result's common keys.

A plan (``plans/``) says what runs: the systems, the requests, the offered loads and how the
capacity behind them is found. ``Runner.execute(plan)`` runs it and returns the result (keys
in docs/benchmarks.md): plan -> execute -> the plan's ``finish`` adds its own keys -> floors.
"""

from __future__ import annotations

import logging
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..config import EngineConfig, PolicyConfig
from . import floors
from .inputs import BenchError
from .metrics import SLO, ratio, summarize, summarize_by_priority, summarize_steps
from .report import fmt
from .workloads import Workload, all_at_once, time_scale_for_rate, with_time_scale

log = logging.getLogger("baton_sidecar.bench")

# Every --systems name: run in this process, or servers in other processes (``url`` is --url's;
# with servers alone only the tokenizer is loaded here).
IN_PROCESS_SYSTEMS = ("baton", "baton_int8", "rtc", "hf_static", "hf_cb", "sequential")
SERVER_SYSTEMS = ("url", "hf_serve", "llama_server", "baton_serve")
RTC_CAPACITY_KEYS = ("requests_per_s", "source", "output_tokens_per_s", "duration_s")


@dataclass(frozen=True)
class RunOptions:
    """How every system runs: engine settings and limits, the SLO, and the shared-machine controls."""

    engine_config: EngineConfig = field(default_factory=EngineConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    slo: SLO = field(default_factory=SLO)
    progress: bool = True
    threads: int | None = None  # torch intra-op threads; None: torch's choice
    repeat: int = 1
    settle_load: float | None = None  # wait before each system until the 1-minute load is <= this
    settle_timeout_s: float = 300.0
    hf_batch_size: int = 8
    url: str | None = None
    model_name: str | None = None
    http_api: str = "completions"  # how every server is loaded (peer.py): completions | chat
    http_prompt: str = "auto"  # auto | ids | text
    llama_server: str | None = None  # the llama-server binary (else $BATON_LLAMA_SERVER)
    llama_parallel: int = 16
    llama_slot_context: int | None = None  # tokens per llama_server slot; None: servers.SLOT_CONTEXT


@dataclass(frozen=True)
class CapacityRun:
    """Capacity measured by one run of ``system`` on ``workload`` (every request at t=0)."""

    label: str  # the run's label in requests.json and steps.json, "capacity(...)"
    system: Any
    workload: Workload
    source: str  # how it was measured, in words
    keys: tuple[str, ...] = RTC_CAPACITY_KEYS  # what result["capacity"] records, in this order


@dataclass(frozen=True)
class Plan:
    """What one invocation runs, decided before anything runs (but the capacity)."""

    title: str
    kind: str  # the workload or scenario: selects the floors
    systems: Mapping[str, Any]  # label -> system, run in this order (rotated with --repeat)
    workload: Workload  # the requests, at their own arrivals
    loads: tuple[float, ...] = ()  # offered rate = load x capacity, one run each; (): the workload's arrivals
    capacity: float | CapacityRun | None = None  # given (req/s) or measured; needed with loads
    load_key: str = "load"  # the workload description key that records the load
    baseline: str | None = "baton"
    header: Mapping[str, Any] = field(default_factory=dict)  # keys recorded before the runs' own
    finish: Callable[[dict[str, Any]], None] = lambda result: None  # the plan's own keys


class Runner:
    """One invocation's state: the loaded model, the runs kept for plots and files, the notes."""

    def __init__(self, options: RunOptions) -> None:
        self.options = options
        self.notes: list[str] = []
        self.loaded = None
        self.tokenizer = None
        self.runs: dict[str, Any] = {}  # label -> SystemRun (plots and raw records)
        self.loaded_int8 = None  # baton_int8's model, loaded when that system first runs

    def load(self, systems: Sequence[str]) -> None:
        """The model (the tokenizer alone when only servers run); once per runner."""
        import torch

        if self.tokenizer is not None:
            return
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        if any(s not in SERVER_SYSTEMS for s in systems):
            from ..model import load_model

            self.loaded = load_model(self.options.engine_config, progress=self.options.progress)
            self.tokenizer = self.loaded.tokenizer
        else:
            self.tokenizer = _load_tokenizer(self.options.engine_config)

    def system(self, name: str):
        """A system by its ``--systems`` name."""
        from .peer import OpenAIPeer
        from .systems import EngineSystem, build_system

        o = self.options
        if name == "url":
            return OpenAIPeer(o.url, self.tokenizer, o.model_name, api=o.http_api, prompt=o.http_prompt)
        if name in SERVER_SYSTEMS:
            return self._managed(name)
        if name == "baton_int8":  # Baton on int8 weights, beside the others on the configured ones
            config = replace(o.engine_config, batching="rebatch", quantization="int8")
            return EngineSystem(name, self._int8_model(), config, o.policy)
        return build_system(name, self.loaded, o.engine_config, o.policy, o.hf_batch_size)

    def _int8_model(self):
        """The same model with int8 weights (from the converted-model cache after the first time)."""
        from ..model import load_model

        if self.loaded_int8 is None:
            config = replace(self.options.engine_config, quantization="int8")
            self.loaded_int8 = load_model(config, progress=self.options.progress)
        return self.loaded_int8

    def _managed(self, name: str):
        """``hf_serve``, ``llama_server`` or ``baton_serve`` on the same model, threads, dtype and device."""
        from ..model import converted_gguf_dir, embedded_model_path, resolve_device
        from .servers import (SLOT_CONTEXT, ManagedPeer, baton_serve_launch, hf_serve_launch, llama_server_binary,
                              llama_server_launch)

        o = self.options
        source = Path(o.engine_config.model) if o.engine_config.model else embedded_model_path()
        device = str(resolve_device(o.engine_config.device))
        if name == "baton_serve":
            config = o.engine_config
            make = lambda port, scratch: baton_serve_launch(
                Path(config.model) if config.model else None, port, o.threads, config.dtype, device,
                config.quantization)
        elif name == "hf_serve":
            model_dir = converted_gguf_dir(source, progress=False) if source.suffix == ".gguf" else source
            make = lambda port, scratch: hf_serve_launch(model_dir, port, scratch, o.threads,
                                                         o.engine_config.dtype, device)
        else:
            binary = llama_server_binary(o.llama_server)
            if binary is None:
                raise BenchError("llama_server: name the binary with --llama-server PATH or $BATON_LLAMA_SERVER")
            if source.suffix != ".gguf":
                raise BenchError("llama_server: the model must be a .gguf file")
            make = lambda port, scratch: llama_server_launch(binary, source, port, o.threads, o.llama_parallel,
                                                             o.llama_slot_context or SLOT_CONTEXT,
                                                             gpu=device.startswith("cuda"))
        return ManagedPeer(name, make, self.tokenizer, api=o.http_api, prompt=o.http_prompt)

    def rtc_capacity(self, workload: Workload, given: float | None) -> float | CapacityRun:
        """``given`` (``--capacity``), else a run-to-completion run of ``workload`` all at t=0."""
        if given:
            return given
        if self.loaded is None:
            raise BenchError("--load needs --capacity (requests/s) when only servers are benchmarked")
        return CapacityRun("capacity(rtc)", self.system("rtc"), all_at_once(workload),
                           "measured: rtc, all requests at t=0")

    # --- running ----------------------------------------------------------------------------

    def execute(self, plan: Plan) -> dict[str, Any]:
        """Run every system of ``plan`` at each load; the result with the plan's keys and floors."""
        result = {**base_result(self, plan), **plan.header}
        points = [(None, plan.workload)]
        if plan.loads:
            capacity = self.measure_capacity(plan.capacity)
            result["capacity"] = capacity
            points = [(load, at_load(plan, load, capacity["requests_per_s"])) for load in plan.loads]
        several = len(points) > 1
        summaries = [self.run_rounds(plan.systems, workload, f"@{load}" if several else "")
                     for load, workload in points]
        result["workload"] = points[0][1].summary()
        result["systems"] = summaries[0]
        if several:
            result["loads"] = {str(load): {"load": load, "time_scale": w.description.get("time_scale"),
                                           "offered_rate_req_per_s": w.description.get("offered_rate_req_per_s"),
                                           "systems": s} for (load, w), s in zip(points, summaries)}
        plan.finish(result)
        result["floors"] = floors.evaluate(result, plan.kind)
        return result

    def measure_capacity(self, capacity: float | CapacityRun | None) -> dict[str, Any]:
        """``result["capacity"]``: the given requests/s, or what the capacity run measured."""
        if capacity is None:
            raise ValueError("a plan with loads needs a capacity")
        if not isinstance(capacity, CapacityRun):
            return {"requests_per_s": capacity, "source": "--capacity"}
        summary = self.run_system(capacity.label, capacity.system, capacity.workload)
        measured = {**summary, "source": capacity.source}
        return {key: measured[key] for key in capacity.keys}

    def run_rounds(self, systems: Mapping[str, Any], workload: Workload,
                   suffix: str = "") -> dict[str, dict[str, Any]]:
        """Every system ``repeat`` times, the order rotated each round; keep each one's median run.

        Rotation spreads slow and fast periods of a shared machine over all systems; the kept
        run is the one with the median output tokens/s (``repeats`` lists them all).
        """
        repeat = self.options.repeat
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

    def run_system(self, label: str, system, workload: Workload) -> dict[str, Any]:
        """Run one system on one workload; return its summary (and keep the run for plots)."""
        from tqdm import tqdm

        slo = self.options.slo
        waited = self.settle()
        with tqdm(total=workload.total_output_tokens, desc=f"{label:>14}", unit="tok", file=sys.stderr,
                  disable=not self.options.progress, dynamic_ncols=True, leave=True) as bar:
            run = system.run(workload, bar.update)
        self.runs[label] = run
        summary = summarize(run.records, slo)
        summary.update(cpu_s=run.cpu_s, wall_s=run.wall_s, load_avg_before=run.load_avg_before,
                       load_avg_after=run.load_avg_after, settle_wait_s=waited, config=run.info)
        # Less sensitive to other processes on a shared CPU than wall-clock throughput.
        # (None for a remote server: this process's CPU time is only the load generator's.)
        local = getattr(system, "local", True)
        summary["output_tokens_per_cpu_s"] = ratio(summary["output_tokens"], run.cpu_s) if local else None
        if run.steps:
            summary["engine"] = summarize_steps(run.steps)
        if any(r.priority is not None for r in run.records):
            summary["by_priority"] = summarize_by_priority(run.records, slo)
        log.info("%s: %s output tok/s, e2e p95 %s s", label, fmt(summary.get("output_tokens_per_s")),
                 fmt(summary.get("e2e_p95_s")))
        return summary

    def settle(self) -> float:
        """With ``settle_load`` X: wait until the 1-minute load average is <= X (bounded wait).

        Load from other processes on a shared machine moves wall-clock numbers far more than
        anything under test; starting every system in similar conditions keeps them comparable.
        """
        limit, timeout = self.options.settle_load, self.options.settle_timeout_s
        if limit is None or not hasattr(os, "getloadavg"):
            return 0.0
        start = time.monotonic()
        while os.getloadavg()[0] > limit and time.monotonic() < start + timeout:
            time.sleep(5)
        if os.getloadavg()[0] > limit:
            self.notes.append(f"load average stayed above {limit} for {timeout:.0f} s; a system started anyway")
        return time.monotonic() - start


def at_load(plan: Plan, load: float, capacity_req_per_s: float) -> Workload:
    """The plan's requests with arrivals rescaled to a mean rate of ``load`` x capacity."""
    rate = load * capacity_req_per_s
    factor = time_scale_for_rate(plan.workload, rate)
    return with_time_scale(plan.workload, factor, **{plan.load_key: load, "offered_rate_req_per_s": rate})


# --- the result's common keys ----------------------------------------------------------------------

def base_result(runner: Runner, plan: Plan) -> dict[str, Any]:
    """Run identity, machine, policy, workload, SLO: the keys every result has before its runs."""
    import torch
    import transformers

    loaded, options = runner.loaded, runner.options
    device = str(loaded.device) if loaded else None
    limits = options.policy.limits
    return {
        "schema_version": 1,
        "title": plan.title,
        "started_at": datetime.now().isoformat(timespec="seconds"),
        "argv": list(sys.argv),
        "command": command_line(sys.argv),
        "model": loaded.name if loaded else options.model_name,
        "device": device,
        "dtype": options.engine_config.dtype,
        "host": {"platform": platform.platform(), "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
                 "gpu": torch.cuda.get_device_name(device) if device and device.startswith("cuda") else None,
                 "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                 "transformers": transformers.__version__,
                 "load_avg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "policy": {"max_batch_size": limits.max_batch_size, "max_kv_tokens": limits.max_kv_tokens,
                   "max_prefill_tokens": limits.max_prefill_tokens},
        "workload": plan.workload.summary(),
        "slo": options.slo.as_dict(),
        "baseline": plan.baseline,
        "systems": {},
        "notes": runner.notes,
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


def _load_tokenizer(config: EngineConfig):
    """The tokenizer alone (servers only: the model's weights are not needed here)."""
    from transformers import AutoTokenizer

    from ..model import converted_gguf_dir, embedded_model_path

    source = Path(config.model) if config.model else embedded_model_path()
    if source.suffix == ".gguf":
        source = converted_gguf_dir(source)
    return AutoTokenizer.from_pretrained(source)
