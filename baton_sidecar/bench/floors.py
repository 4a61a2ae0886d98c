"""The floors Baton is held to, as data: one record per floor, evaluated against a result.

Benchmarks, not tests: a run reports its floors (``result["floors"]``, the report's Floors
table) and never fails on them. A floor applies to a run of one of its ``kinds`` (a workload
or scenario name; empty: any) whose result holds a value at ``path``. A path is dict keys
joined by dots; a key with ``*`` matches every key it fits, one floor each, named with the
matched key as ``{0}`` (``{kind}`` is the run's kind). Floors that fan out so are listed key by
key (all of ``preempt_swap``, then all of ``preempt_recompute``), the others in table order.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Iterator

ARRIVALS = ("trace", "poisson", "prompts", "jsonl")
COMPARISONS = {"<=": operator.le, ">=": operator.ge}


@dataclass(frozen=True)
class Floor:
    name: str
    path: str  # where the measured value is in the result
    op: str  # "<=" or ">=": measured op limit
    limit: float
    shown: str  # the limit as printed in the target ("<= 0.333" for 1/3)
    kinds: tuple[str, ...] = ()

    def row(self, measured: float | None, matched: tuple[str, ...], kind: str) -> dict[str, Any]:
        met = None if measured is None else bool(COMPARISONS[self.op](measured, self.limit))
        return {"name": self.name.format(*matched, kind=kind), "measured": measured,
                "target": f"{self.op} {self.shown}", "met": met}


FLOORS = (
    Floor("offline: baton / hf_static output tok/s", "ratios_vs_baton.hf_static.output_tokens_per_s",
          ">=", 1.75, "1.75", ("offline",)),
    Floor("offline: baton / hf_cb output tok/s", "ratios_vs_baton.hf_cb.output_tokens_per_s",
          ">=", 1.2, "1.2", ("offline",)),
    # The scaled Azure conversation trace at ~80% of rtc capacity (and any run with arrivals).
    Floor("{kind}: baton e2e p95 / rtc e2e p95", "ratios_vs_baton.rtc.e2e_p95_s", "<=", 0.6, "0.6", ARRIVALS),
    Floor("{kind}: baton e2e p95 / hf_cb e2e p95", "ratios_vs_baton.hf_cb.e2e_p95_s", "<=", 0.8, "0.8", ARRIVALS),
    # int8 weights (a run with baton_int8 beside baton and hf_cb, both on float32).
    Floor("offline: baton_int8 / baton output tok/s", "ratios_vs_baton_int8.baton.output_tokens_per_s",
          ">=", 1.8, "1.8", ("offline",)),
    Floor("offline: baton_int8 / hf_cb output tok/s", "ratios_vs_baton_int8.hf_cb.output_tokens_per_s",
          ">=", 2.5, "2.5", ("offline",)),
    Floor("{kind}: baton_int8 e2e p95 / hf_cb e2e p95", "ratios_vs_baton_int8.hf_cb.e2e_p95_s", "<=", 0.5, "0.5",
          ARRIVALS),
    # llama.cpp's own server on the same GGUF, same threads (a run with llama_server beside baton_int8).
    Floor("offline: baton_int8 / llama_server output tok/s", "ratios_vs_baton_int8.llama_server.output_tokens_per_s",
          ">=", 1.0, "1.0", ("offline",)),
    Floor("{kind}: baton_int8 e2e p95 / llama_server e2e p95", "ratios_vs_baton_int8.llama_server.e2e_p95_s",
          "<=", 1.2, "1.2", ARRIVALS),
    # Server against server over loopback HTTP: baton-sidecar serve vs transformers serve (hf_cb's server).
    Floor("offline: baton_serve / hf_serve output tok/s", "ratios_vs_baton_serve.hf_serve.output_tokens_per_s",
          ">=", 1.2, "1.2", ("offline",)),
    Floor("{kind}: baton_serve e2e p95 / hf_serve e2e p95", "ratios_vs_baton_serve.hf_serve.e2e_p95_s",
          "<=", 0.8, "0.8", ARRIVALS),
    # Any run with baton and the ceiling.
    Floor("decode step at batch 16: ModelRunner.decode / bare forward", "decode_step_b16.decode_vs_bare",
          "<=", 1.10, "1.10"),
    Floor("decode step at batch 16: whole EngineCore.step / bare forward", "decode_step_b16.step_vs_bare",
          "<=", 1.10, "1.10"),
    # Preemption must get urgent requests out fast and cost little throughput.
    Floor("priority: {0} urgent TTFT p95 / fifo", "scenario.variants.preempt_*.urgent_ttft_p95_vs_fifo",
          "<=", 1 / 3, "0.333", ("priority",)),
    Floor("priority: {0} throughput cost vs fifo", "scenario.variants.preempt_*.throughput_cost_vs_fifo",
          "<=", 0.10, "0.10", ("priority",)),
    # A feature mix (JSON schemas, n = 3, penalties) must cost little against the same requests plain.
    Floor("features: mixed / plain output tok/s", "scenario.throughput_ratio", ">=", 0.85, "0.85", ("features",)),
    Floor("features: plain rows' TPOT p50, mixed run / plain run", "scenario.plain_rows_tpot_p50_ratio",
          "<=", 1.10, "1.10", ("features",)),
    # Short streams keep decoding while long prompts prefill, and the long prompts lose little TTFT
    # to it: each prefill policy under a time budget against its own short-only run and against
    # the token budget (baton_tokens, the engine before it).
    *(floor for name in ("baton_time", "baton_fused") for floor in (
        Floor(f"long-prompts: {name} short ITL p99 during long prefills / its short ITL p50 without long prompts",
              f"scenario.systems.{name}.short_itl_in_prefill_p99_vs_baseline_p50", "<=", 2.5, "2.5",
              ("long-prompts",)),
        Floor(f"long-prompts: {name} long TTFT p50 / baton_tokens'",
              f"scenario.systems.{name}.long_ttft_p50_vs_baton_tokens", "<=", 1.15, "1.15", ("long-prompts",)))),
)


def evaluate(result: dict[str, Any], kind: str, table: tuple[Floor, ...] = FLOORS) -> list[dict[str, Any]]:
    """``{name, measured, target, met}`` for each floor of ``table`` that applies to the run."""
    rows = []
    for position, floor in enumerate(table):
        if floor.kinds and kind not in floor.kinds:
            continue
        for match_index, (matched, value) in enumerate(_lookup(result, floor.path.split("."))):
            rows.append(((match_index, position), floor.row(value, matched, kind)))
    return [row for _, row in sorted(rows, key=lambda item: item[0])]


def _lookup(node: Any, keys: list[str], matched: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(keys matched by ``*``, value) for each place ``keys`` leads to in ``node``."""
    if not keys:
        yield matched, node
        return
    if not isinstance(node, dict):
        return
    key, rest = keys[0], keys[1:]
    if "*" in key:
        for name in [k for k in node if fnmatchcase(k, key)]:
            yield from _lookup(node[name], rest, (*matched, name))
    elif key in node:
        yield from _lookup(node[key], rest, matched)
