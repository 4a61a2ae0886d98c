"""Every system on the identical requests, at the workload's own arrivals or at offered loads.

The offline, poisson, trace, prompts and jsonl workloads are this one plan; they differ in the
requests and in the defaults (the systems; ``--load`` 0.8 for trace and poisson). Its finish
adds the bare-forward ceiling (when baton runs), the roofline of every engine run and baton's
ratio to every other system.
"""

from __future__ import annotations

import sys
from typing import Any

from ..inputs import BenchError, WorkloadOptions, build_workload, parse_loads, token_source
from ..metrics import makespan_s, ratio
from ..runner import IN_PROCESS_SYSTEMS, SERVER_SYSTEMS, Plan, Runner
from ..workloads import TokenSource, Workload, with_time_scale

DEFAULT_SYSTEMS = {"offline": "baton,rtc,hf_static,hf_cb", "prompts": "baton,rtc,hf_static,hf_cb"}
DEFAULT_ARRIVAL_SYSTEMS = "baton,rtc,hf_cb"
KNOWN_SYSTEMS = (*IN_PROCESS_SYSTEMS, *(s for s in SERVER_SYSTEMS if s != "url"))  # url comes from --url
# baton / other: throughput > 1 and latency < 1 favour baton.
RATIO_KEYS = ("output_tokens_per_s", "requests_per_s", "ttft_p95_s", "e2e_p50_s", "e2e_p95_s", "e2e_p99_s")


def plan(runner: Runner, kind: str, workload: WorkloadOptions, *, systems: str | None = None,
         capacity: float | None = None, ceiling: bool = True, ceiling_context: int | None = None,
         roofline: bool = True) -> Plan:
    """``systems`` as ``--systems`` (None: the kind's default); ``ceiling_context`` None: measured."""
    names = parse_systems(systems, runner.options.url, DEFAULT_SYSTEMS.get(kind, DEFAULT_ARRIVAL_SYSTEMS))
    runner.load(names)
    source = token_source(runner.tokenizer, workload, runner.notes) if kind in ("offline", "poisson", "trace") \
        else None
    base = build_workload(kind, workload, runner.tokenizer, source, runner.notes)
    loads = _loads(kind, workload, base)
    if workload.time_scale:
        base, loads = with_time_scale(base, workload.time_scale), None

    def finish(result: dict[str, Any]) -> None:
        if "baton" in names and runner.loaded is not None and ceiling:
            add_ceiling(runner, result, source or token_source(runner.tokenizer, workload, runner.notes),
                        ceiling_context)
        if roofline and runner.loaded is not None:
            add_roofline(runner, result)
        result["ratios_vs_baton"] = ratios(result["systems"])
        for reference in ("baton_int8", "baton_serve"):  # int8 weights; Baton over HTTP
            if reference in result["systems"]:
                result[f"ratios_vs_{reference}"] = ratios(result["systems"], reference)

    return Plan(title=kind, kind=kind, systems={name: runner.system(name) for name in names}, workload=base,
                loads=tuple(loads or ()), capacity=runner.rtc_capacity(base, capacity) if loads else None,
                header={"systems_order": names}, finish=finish)


def _loads(kind: str, workload: WorkloadOptions, base: Workload) -> list[float] | None:
    """The offered loads: ``--load``, else 0.8 for trace and poisson at their own rate and scale."""
    has_arrivals = kind in ("poisson", "trace") or (kind == "prompts" and bool(workload.rate)) or (
        kind == "jsonl" and base.span_s > 0)
    default = "0.8" if kind in ("trace", "poisson") and not workload.rate and not workload.time_scale else None
    return parse_loads(workload.load, default) if has_arrivals or workload.load else None


def parse_systems(text: str | None, url: str | None, default: str) -> list[str]:
    """``--systems`` (``default`` without it; nothing local with ``--url`` alone), plus ``url``."""
    if text:
        names = [s.strip() for s in text.split(",") if s.strip()]
    elif url:
        names = []
    else:
        names = default.split(",")
    if url:
        names.append("url")
    if not names:
        raise BenchError("no systems to run")
    unknown = [n for n in names if n not in (*KNOWN_SYSTEMS, "url")]
    if unknown:
        raise BenchError(f"--systems: unknown system {unknown[0]!r}; known: {', '.join(sorted(KNOWN_SYSTEMS))}")
    if len(set(names)) != len(names):
        raise BenchError("--systems: a system is listed twice")
    return names


def ratios(systems: dict[str, dict[str, Any]], reference: str = "baton") -> dict[str, dict[str, float | None]]:
    """``reference`` (Baton) divided by each other system, metric by metric (``RATIO_KEYS``)."""
    ref = systems.get(reference)
    if not ref:
        return {}
    return {name: {key: ratio(ref.get(key), s.get(key)) for key in RATIO_KEYS}
            for name, s in systems.items() if name != reference}


def add_ceiling(runner: Runner, result: dict[str, Any], source: TokenSource, context: int | None) -> None:
    """``ceiling``, ``decode_step_b16`` and ``efficiency``: the engine runs against the bare forward.

    Batch sizes: those the engine runs reached (``ceiling_batch_sizes``); context: ``context``,
    else the engine's mean decode context.
    """
    from tqdm import tqdm

    from ..ceiling import ceiling_batch_sizes, compare_decode_step, efficiency, measure_ceiling

    # The bare forward runs the configured weights: baton_int8 is not held against it.
    engine_runs = {n: r for n, r in runner.runs.items()
                   if r.steps and not n.startswith("capacity") and n != "baton_int8"}
    steps = [s for r in engine_runs.values() for s in r.steps if s.get("rows", 0) > 0]
    context = context or (int(sum(s["length"] for s in steps) / len(steps)) if steps else 192)
    sizes = ceiling_batch_sizes(sorted({int(s["rows"]) for s in steps}))
    with tqdm(total=len(sizes) + 1, desc="       ceiling", unit="pt", file=sys.stderr,
              disable=not runner.options.progress) as bar:
        result["ceiling"] = measure_ceiling(runner.loaded, sizes, context=context, progress=bar.update)
        result["decode_step_b16"] = compare_decode_step(runner.loaded, source, batch=16, context=128)
        bar.update(1)
    result["efficiency"] = {}
    for name, run in engine_runs.items():
        summary = result["systems"].get(name)
        if summary is not None:
            result["efficiency"][name] = efficiency(run.steps, result["ceiling"], makespan_s(run.records),
                                                    summary.get("output_tokens_per_s"))


def add_roofline(runner: Runner, result: dict[str, Any]) -> None:
    """``roofline``: this machine's peaks, the model's cost model, and every engine run (and the
    bare ceiling, when measured) against them (``roofline.py``). Nothing without engine steps."""
    from .. import roofline

    engine_runs = {n: r for n, r in runner.runs.items() if r.steps and not n.startswith("capacity")}
    if not engine_runs:
        return
    loaded = runner.loaded
    cost = roofline.cost_model(loaded.model)
    peaks = roofline.measure_peaks(loaded.device, loaded.model.get_input_embeddings().weight.dtype)
    # Each run against its own weights: baton_int8 reads int8 ones (its own cost model).
    costs = {n: roofline.cost_model(runner.loaded_int8.model) if n == "baton_int8" else cost for n in engine_runs}
    result["roofline"] = {"peaks": peaks, "cost_model": cost.as_dict(),
                          "systems": {n: roofline.summarize(r.steps, costs[n], peaks) for n, r in engine_runs.items()}}
    if result.get("ceiling"):
        result["roofline"]["ceiling"] = roofline.ceiling_roofline(result["ceiling"], cost, peaks)
