"""``--scenario padding``: padding policies on the scaled Azure conversation trace (issue 3).

Each ``max_padding_ratio:bucketing`` setting is one engine variant, labelled like
``pad0.6_bucket``, on identical arrivals: ``--time-scale``, else ``--load`` (default 1.5,
the first value only) x the measured run-to-completion capacity.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

from ..inputs import BenchError, WorkloadOptions, build_workload, parse_loads, token_source
from ..runner import Plan, Runner
from ..workloads import with_time_scale

DEFAULT_SETTINGS = "1.0:off,0.6:on,0.3:on"
# At 0.8 of rtc capacity the trace keeps ~2 rows running: too few to pad. 1.5 keeps a batch.
DEFAULT_LOAD = "1.5"


def parse_settings(text: str) -> list[tuple[float, bool]]:
    """``--padding-settings``: ``RATIO:on|off`` items -> (max_padding_ratio, bucketing)."""
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


def label(value: float, bucketing: bool) -> str:
    shown = f"{value:.1f}" if round(value, 1) == value else f"{value:g}"
    return f"pad{shown}" + ("_bucket" if bucketing else "_nobucket")


def plan(runner: Runner, workload: WorkloadOptions, *, settings: list[tuple[float, bool]],
         capacity: float | None = None) -> Plan:
    """One variant per setting; ``capacity`` (req/s) None: measured with rtc (unless time-scaled)."""
    from ..systems import EngineSystem

    runner.load(["baton"])
    source = token_source(runner.tokenizer, workload, runner.notes)
    base = build_workload("trace", workload, runner.tokenizer, source, runner.notes)
    config = replace(runner.options.engine_config, batching="rebatch")
    policy = runner.options.policy
    by_label = {label(value, bucketing): (value, bucketing) for value, bucketing in settings}
    systems = {name: EngineSystem(name, runner.loaded, config, _with_padding(policy, value, bucketing))
               for name, (value, bucketing) in by_label.items()}
    common = dict(title="scenario: padding", kind="padding", systems=systems, baseline=next(iter(systems), None),
                  finish=partial(summarize, by_label))
    if workload.time_scale:
        return Plan(workload=with_time_scale(base, workload.time_scale), **common)
    load = parse_loads(workload.load, DEFAULT_LOAD)[0]
    return Plan(workload=base, loads=(load,), capacity=runner.rtc_capacity(base, capacity), **common)


def _with_padding(policy, value: float, bucketing: bool):
    return replace(policy, padding=replace(policy.padding, max_padding_ratio=value, bucketing=bucketing))


def summarize(settings: dict[str, tuple[float, bool]], result: dict[str, Any]) -> None:
    """``scenario``: each variant's padding ratios, throughput and latency."""
    variants = {}
    for name, summary in result["systems"].items():
        value, bucketing = settings[name]
        engine = summary.get("engine", {})
        variants[name] = {
            "max_padding_ratio": value, "bucketing": bucketing,
            "padding_ratio_time_weighted": engine.get("padding_ratio_time_weighted"),
            "padding_ratio_slot_weighted": engine.get("padding_ratio_slot_weighted"),
            "output_tokens_per_s": summary.get("output_tokens_per_s"),
            "e2e_p95_s": summary.get("e2e_p95_s"), "ttft_p95_s": summary.get("ttft_p95_s"),
            "mean_batch_size": engine.get("mean_batch_size")}
    result["scenario"] = {"name": "padding", "variants": variants}
