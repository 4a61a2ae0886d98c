"""``--scenario priority``: mixed-priority overload, urgent TTFT with preemption against FIFO (issue 3).

48 requests, a seeded ``urgent_fraction`` of them urgent (priority 0), the rest priority 10,
Poisson arrivals at ``overload`` x capacity, where capacity is the FIFO engine's on the same
requests all at t=0. Four engine variants run the identical arrivals (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..inputs import WorkloadOptions, build_workload, token_source
from ..metrics import ratio
from ..runner import CapacityRun, Plan, Runner
from ..workloads import all_at_once, assign_priorities, poisson_workload

MAX_BATCH_SIZE = 8  # the default here: a full batch, so that requests queue
NUM_REQUESTS = 48
OUTPUT_RANGE = (16, 64)
URGENT_CLASS, NORMAL_CLASS = "priority_0", "priority_10"
FIFO_PRIORITY = 10  # what fifo submits every request with
# label -> (preemption mode, whether requests keep their priorities)
VARIANTS = {
    "fifo": ("off", False),  # one priority for all, no preemption: arrival order
    "priority_no_preempt": ("off", True),  # urgent requests go first but wait for a free row
    "preempt_swap": ("swap", True),
    "preempt_recompute": ("recompute", True),
}


def plan(runner: Runner, workload: WorkloadOptions, *, urgent_fraction: float = 0.2, overload: float = 1.5,
         capacity: float | None = None) -> Plan:
    """The variants on identical arrivals; ``capacity`` (req/s) None: measured with fifo."""
    from ..systems import EngineSystem

    runner.load(["baton"])
    source = token_source(runner.tokenizer, workload, runner.notes)
    options = replace(workload, num_requests=workload.num_requests or NUM_REQUESTS,
                      output_range=workload.output_range or OUTPUT_RANGE)
    base = build_workload("offline", options, runner.tokenizer, source, runner.notes)
    arrivals = poisson_workload(source, 1.0, options.num_requests, options.prompt_range, options.output_range,
                                options.seed)
    config = replace(runner.options.engine_config, batching="rebatch")
    policy = runner.options.policy
    systems = {label: EngineSystem("baton", runner.loaded, config,
                                   replace(policy, preemption=replace(policy.preemption, mode=mode)),
                                   use_priorities=use_priorities, fixed_priority=FIFO_PRIORITY)
               for label, (mode, use_priorities) in VARIANTS.items()}
    measured = CapacityRun("capacity(fifo)", systems["fifo"],
                           all_at_once(assign_priorities(base, urgent_fraction, options.seed)),
                           "measured: baton, preemption off, priorities ignored, all requests at t=0",
                           keys=("requests_per_s", "output_tokens_per_s", "source"))
    return Plan(title="scenario: priority", kind="priority", systems=systems,
                workload=assign_priorities(arrivals, urgent_fraction, options.seed), loads=(overload,),
                capacity=capacity or measured, load_key="overload", baseline="fifo", finish=summarize)


def summarize(result: dict[str, Any]) -> None:
    """``scenario`` (each variant against fifo) and ``by_priority`` (every system's classes)."""
    systems = result["systems"]
    fifo = systems["fifo"]
    fifo_urgent = _class_ttft_p95(fifo, URGENT_CLASS)
    variants = {}
    for label, summary in systems.items():
        urgent = _class_ttft_p95(summary, URGENT_CLASS)
        tps, fifo_tps = summary.get("output_tokens_per_s"), fifo.get("output_tokens_per_s")
        variants[label] = {
            "urgent_ttft_p95_s": urgent, "urgent_ttft_p95_vs_fifo": ratio(urgent, fifo_urgent),
            "normal_ttft_p95_s": _class_ttft_p95(summary, NORMAL_CLASS),
            "output_tokens_per_s": tps, "throughput_cost_vs_fifo": 1 - tps / fifo_tps if tps and fifo_tps else None,
            "preemptions": summary.get("preemptions")}
    result["scenario"] = {"name": "priority", "urgent_class": URGENT_CLASS,
                          "fifo": "preemption off, every request submitted with priority 10 (arrival order)",
                          "variants": variants}
    result["by_priority"] = {label: s["by_priority"] for label, s in systems.items()}


def _class_ttft_p95(summary: dict[str, Any], name: str) -> float | None:
    return summary["by_priority"].get(name, {}).get("ttft_p95_s")
