"""Writing results: JSON (stable keys, see docs/benchmarks.md), a Markdown table, PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from .metrics import RequestRecord

TABLE_COLUMNS = (
    ("output tok/s", "output_tokens_per_s", "{:.1f}"),
    ("tok/CPU-s", "output_tokens_per_cpu_s", "{:.1f}"),
    ("req/s", "requests_per_s", "{:.3f}"),
    ("goodput req/s", "goodput_req_per_s", "{:.3f}"),
    ("TTFT p50 s", "ttft_p50_s", "{:.3f}"),
    ("TTFT p95 s", "ttft_p95_s", "{:.3f}"),
    ("TPOT p50 s", "tpot_p50_s", "{:.4f}"),
    ("ITL p95 s", "itl_p95_s", "{:.4f}"),
    ("E2E p50 s", "e2e_p50_s", "{:.2f}"),
    ("E2E p95 s", "e2e_p95_s", "{:.2f}"),
    ("E2E p99 s", "e2e_p99_s", "{:.2f}"),
    ("done", "completed", "{}"),
)


def _fmt(value: Any, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return pattern.format(value)


def systems_table(systems: dict[str, dict[str, Any]], baseline: str | None = "baton") -> str:
    """A Markdown table, one row per system, with throughput relative to ``baseline``."""
    header = ["system", *[c[0] for c in TABLE_COLUMNS]]
    base_tps = systems.get(baseline, {}).get("output_tokens_per_s") if baseline else None
    if base_tps:
        header.append(f"{baseline} speed-up")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, summary in systems.items():
        row = [name, *[_fmt(summary.get(key), fmt) for _, key, fmt in TABLE_COLUMNS]]
        if base_tps:
            tps = summary.get("output_tokens_per_s")
            row.append(_fmt(base_tps / tps if tps else None, "{:.2f}x"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def ceiling_table(ceiling: dict[str, dict[str, float]]) -> str:
    lines = ["| batch | bare step s | bare tok/s | context |", "|---|---|---|---|"]
    for batch, entry in sorted(ceiling.items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {batch} | {entry['step_s']:.4f} | {entry['tokens_per_s']:.1f} | {entry['context_len']} |")
    return "\n".join(lines)


def floors_table(floors: Sequence[dict[str, Any]]) -> str:
    lines = ["| floor | measured | target | met |", "|---|---|---|---|"]
    for f in floors:
        measured = _fmt(f.get("measured"), "{:.3f}")
        met = "-" if f.get("met") is None else ("yes" if f["met"] else "NO")
        lines.append(f"| {f['name']} | {measured} | {f['target']} | {met} |")
    return "\n".join(lines)


def machine_line(result: dict[str, Any]) -> str:
    """Model, device, dtype and the host (CPU model and count, torch threads, load average)."""
    host = result.get("host", {})
    gpu = f" ({host['gpu']})" if host.get("gpu") else ""
    cpu = f"{host['cpu_model']}, " if host.get("cpu_model") else ""
    return (f"model `{result.get('model')}` on {result.get('device')}{gpu} ({result.get('dtype')}); "
            f"{cpu}{host.get('cpu_count')} CPUs, torch threads {host.get('torch_threads')}; "
            f"load average at start {_fmt(host.get('load_avg_start'), '{:.2f}')}")


def workload_line(result: dict[str, Any]) -> str:
    return "Workload: " + ", ".join(f"{k}={_short(v)}" for k, v in result["workload"].items())


def systems_tables(result: dict[str, Any], heading: str = "##") -> list[str]:
    """The systems table, or one per offered load under ``heading`` titles; lines, blank-separated."""
    baseline = result.get("baseline", "baton")
    parts = []
    for load in result.get("loads", {}).values():
        parts.append(f"{heading} Offered load {load['load']} "
                     f"({_fmt(load.get('offered_rate_req_per_s'), '{:.3f}')} req/s, "
                     f"time scale {_fmt(load.get('time_scale'), '{:.3f}')})")
        parts.append("")
        parts.append(systems_table(load["systems"], baseline))
        parts.append("")
    if not result.get("loads"):
        parts.append(systems_table(result["systems"], baseline))
        parts.append("")
    return parts


def markdown_report(result: dict[str, Any]) -> str:
    """The whole report as Markdown (also what the CLI prints)."""
    parts = [f"# Baton benchmark: {result.get('title', result['workload'].get('name'))}", ""]
    parts.append(machine_line(result))
    parts.append("")
    parts.append(workload_line(result))
    parts.append("")
    slo = result.get("slo") or {}
    parts.append("Goodput SLO: " + ", ".join(f"{k} <= {v}" for k, v in slo.items() if v is not None))
    parts.append("")
    parts.extend(systems_tables(result))
    for name, by_class in (result.get("by_priority") or {}).items():
        parts.append(f"### {name} by priority class")
        parts.append("")
        parts.append(systems_table(by_class, None))
        parts.append("")
    engine = {n: s["engine"] for n, s in result["systems"].items() if s.get("engine")}
    if engine:
        parts.append("## Engine steps")
        parts.append("")
        parts.append("| system | steps | mean batch | padding (time-weighted) | padding (slot-weighted) | "
                     "decode s | prefill s | other step s |")
        parts.append("|---|---|---|---|---|---|---|---|")
        for name, e in engine.items():
            parts.append(f"| {name} | {e['steps']} | {_fmt(e['mean_batch_size'], '{:.1f}')} | "
                         f"{_fmt(e['padding_ratio_time_weighted'], '{:.3f}')} | "
                         f"{_fmt(e['padding_ratio_slot_weighted'], '{:.3f}')} | {e['decode_s']:.2f} | "
                         f"{e['prefill_s']:.2f} | {e['other_s']:.2f} |")
        parts.append("")
    if result.get("ceiling"):
        parts.append("## Bare-forward ceiling")
        parts.append("")
        parts.append(ceiling_table(result["ceiling"]))
        parts.append("")
    if result.get("decode_step_b16"):
        c = result["decode_step_b16"]
        parts.append(f"Decode step at batch {c['batch_size']}, context {c['context_len']}: bare forward "
                     f"{c['bare_forward_s']:.4f} s, engine ModelRunner.decode {c['engine_decode_s']:.4f} s "
                     f"({c['decode_vs_bare']:.3f}x), whole EngineCore.step {c['engine_step_s']:.4f} s "
                     f"({c['step_vs_bare']:.3f}x).")
        parts.append("")
    for name, eff in (result.get("efficiency") or {}).items():
        if eff:
            parts.append(f"Efficiency of {name} against the ceiling: decode {_fmt(eff.get('decode_efficiency'), '{:.2f}')}, "
                         f"whole step {_fmt(eff.get('step_efficiency'), '{:.2f}')}, wall {_fmt(eff.get('wall_efficiency'), '{:.2f}')}, "
                         f"throughput / ceiling at batch {eff.get('largest_batch')}: "
                         f"{_fmt(eff.get('throughput_vs_ceiling'), '{:.2f}')}")
            parts.append("")
    if result.get("scenario"):
        parts.append("## Scenario")
        parts.append("")
        parts.append("```json")
        parts.append(json.dumps(result["scenario"], indent=1, default=_json_default))
        parts.append("```")
        parts.append("")
    if result.get("floors"):
        parts.append("## Floors")
        parts.append("")
        parts.append(floors_table(result["floors"]))
        parts.append("")
    for note in result.get("notes", ()):
        parts.append(f"- {note}")
    return "\n".join(parts).rstrip() + "\n"


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=_json_default, allow_nan=False) + "\n")


def records_to_json(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """Per-request rows for ``requests.json`` (raw data behind every percentile)."""
    return [{"index": r.index, "priority": r.priority, "prompt_tokens": r.prompt_tokens,
             "max_tokens": r.max_tokens, "output_tokens": r.output_tokens, "submitted_s": r.submitted_s,
             "ttft_s": r.ttft_s, "tpot_s": r.tpot_s, "e2e_s": r.e2e_s, "error": r.error,
             "preemptions": r.num_preemptions} for r in records]


# --- plots --------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdfs(runs: dict[str, Sequence[RequestRecord]], path: Path, title: str = "") -> Path:
    """TTFT and E2E latency CDFs, one line per system."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in ((axes[0], "ttft_s", "TTFT (s)"), (axes[1], "e2e_s", "end-to-end latency (s)")):
        for name, records in runs.items():
            values = sorted(v for r in records if r.ok and (v := getattr(r, metric)) is not None)
            if not values:
                continue
            ys = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(values, ys, where="post", label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "latency CDFs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_vs_load(loads: dict[str, dict[str, Any]], path: Path, title: str = "") -> Path:
    """Output throughput and p95 end-to-end latency against offered load, one line per system."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({n for entry in loads.values() for n in entry["systems"]})
    points = sorted(loads.values(), key=lambda e: e["load"])
    for name in names:
        xs = [p["load"] for p in points if name in p["systems"]]
        tps = [p["systems"][name].get("output_tokens_per_s") for p in points if name in p["systems"]]
        p95 = [p["systems"][name].get("e2e_p95_s") for p in points if name in p["systems"]]
        axes[0].plot(xs, [v if v is not None else float("nan") for v in tps], marker="o", label=name)
        axes[1].plot(xs, [v if v is not None else float("nan") for v in p95], marker="o", label=name)
    axes[0].set_ylabel("output tokens/s")
    axes[1].set_ylabel("p95 end-to-end latency (s)")
    for ax in axes:
        ax.set_xlabel("offered load (fraction of run-to-completion capacity)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "throughput and p95 latency vs offered load")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_padding(step_logs: dict[str, Sequence[dict[str, float]]], path: Path) -> Path:
    """Padding ratio of the running batch at each decode step, per policy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, steps in step_logs.items():
        decode = [s for s in steps if s.get("rows", 0) > 0]
        if not decode:
            continue
        t0 = decode[0]["t"]
        ax.plot([s["t"] - t0 for s in decode], [s["padding_ratio"] for s in decode], label=name, lw=0.8)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("padding ratio before decode")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
