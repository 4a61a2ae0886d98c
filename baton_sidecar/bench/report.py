"""Writing results: JSON (stable keys, see docs/benchmarks.md), the Markdown report, PNG plots, a run's files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from .metrics import RequestRecord

# (header, summary key, format), in table order
TABLE_COLUMNS = (
    ("output tok/s", "output_tokens_per_s", "{:.1f}"), ("tok/CPU-s", "output_tokens_per_cpu_s", "{:.1f}"),
    ("req/s", "requests_per_s", "{:.3f}"), ("goodput req/s", "goodput_req_per_s", "{:.3f}"),
    ("TTFT p50 s", "ttft_p50_s", "{:.3f}"), ("TTFT p95 s", "ttft_p95_s", "{:.3f}"),
    ("TPOT p50 s", "tpot_p50_s", "{:.4f}"), ("ITL p95 s", "itl_p95_s", "{:.4f}"),
    ("E2E p50 s", "e2e_p50_s", "{:.2f}"), ("E2E p95 s", "e2e_p95_s", "{:.2f}"),
    ("E2E p99 s", "e2e_p99_s", "{:.2f}"), ("done", "completed", "{}"),
)


def fmt(value: Any, pattern: str = "{:.3f}") -> str:
    """``value`` formatted, or "-" when it is missing."""
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
        row = [name, *[fmt(summary.get(key), pattern) for _, key, pattern in TABLE_COLUMNS]]
        if base_tps:
            tps = summary.get("output_tokens_per_s")
            row.append(fmt(base_tps / tps if tps else None, "{:.2f}x"))
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
        measured = fmt(f.get("measured"), "{:.3f}")
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
            f"load average at start {fmt(host.get('load_avg_start'), '{:.2f}')}")


def workload_line(result: dict[str, Any]) -> str:
    return "Workload: " + ", ".join(f"{k}={_short(v)}" for k, v in result["workload"].items())


def systems_tables(result: dict[str, Any], heading: str = "##") -> list[str]:
    """The systems table, or one per offered load under ``heading`` titles; lines, blank-separated."""
    baseline = result.get("baseline", "baton")
    parts = []
    for load in result.get("loads", {}).values():
        parts.append(f"{heading} Offered load {load['load']} "
                     f"({fmt(load.get('offered_rate_req_per_s'), '{:.3f}')} req/s, "
                     f"time scale {fmt(load.get('time_scale'), '{:.3f}')})")
        parts.append("")
        parts.append(systems_table(load["systems"], baseline))
        parts.append("")
    if not result.get("loads"):
        parts.append(systems_table(result["systems"], baseline))
        parts.append("")
    asked = None if result.get("loads") else (result["workload"].get("output_tokens") or {}).get("total")
    modes = server_modes(result["systems"], asked)
    if modes:
        parts += [*modes, ""]
    return parts


def server_modes(systems: dict[str, dict[str, Any]], asked: int | None = None) -> list[str]:
    """One line per server system: the mode its probe settled (peer.py), what it refused and, at
    natural lengths, how many of the ``asked`` output tokens it produced."""
    lines = []
    for name, summary in systems.items():
        mode = (summary.get("config") or {}).get("mode")
        if not mode:
            continue
        refused = ", ".join(f"{field} {status}" for field, status in mode["probes"].items() if status != 200)
        lengths = {"ignore_eos": "exact lengths (ignore_eos)", "min_tokens": "exact lengths (min_tokens)",
                   "natural": "natural lengths (its own usage counts)"}[mode["length"]]
        if mode["length"] == "natural" and asked:
            lengths += f", {summary.get('output_tokens')} of the {asked} output tokens asked"
        lines.append(f"- `{name}`: {mode['prompt']} prompts through /v1/{'chat/' if mode['api'] == 'chat' else ''}"
                     f"completions, {lengths}" + (f"; refused: {refused}" if refused else "") + ".")
    return lines


def markdown_report(result: dict[str, Any]) -> str:
    """The whole report as Markdown (also what the CLI prints)."""
    parts = [f"# Baton benchmark: {result.get('title', result['workload'].get('name'))}", ""]
    parts += [machine_line(result), "", workload_line(result), ""]
    slo = result.get("slo") or {}
    parts += ["Goodput SLO: " + ", ".join(f"{k} <= {v}" for k, v in slo.items() if v is not None), ""]
    parts += systems_tables(result)
    for key, what in (("by_priority", "priority class"), ("by_feature", "feature"), ("by_kind", "kind of request")):
        for name, by_class in (result.get(key) or {}).items():
            parts += [f"### {name} by {what}", "", systems_table(by_class, None), ""]
    parts += engine_section(result) + ceiling_section(result) + roofline_section(result)
    if result.get("scenario"):
        scenario = json.dumps(result["scenario"], indent=1, default=_json_default)
        parts += ["## Scenario", "", "```json", scenario, "```", ""]
    if result.get("floors"):
        parts += ["## Floors", "", floors_table(result["floors"]), ""]
    parts += [f"- {note}" for note in result.get("notes", ())]
    return "\n".join(parts).rstrip() + "\n"


def engine_section(result: dict[str, Any]) -> list[str]:
    """The engine systems' step statistics (padding, time in decode, prefill and the rest)."""
    engine = {n: s["engine"] for n, s in result["systems"].items() if s.get("engine")}
    if not engine:
        return []
    parts = ["## Engine steps", "",
             "| system | steps | mean batch | padding (time-weighted) | padding (slot-weighted) | "
             "decode s | prefill s | other step s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in engine.items():
        parts.append(f"| {name} | {e['steps']} | {fmt(e['mean_batch_size'], '{:.1f}')} | "
                     f"{fmt(e['padding_ratio_time_weighted'])} | {fmt(e['padding_ratio_slot_weighted'])} | "
                     f"{e['decode_s']:.2f} | {e['prefill_s']:.2f} | {e['other_s']:.2f} |")
    return parts + [""]


def ceiling_section(result: dict[str, Any]) -> list[str]:
    """The bare-forward ceiling, the batch-16 decode step against it, and each engine's efficiency."""
    parts = []
    if result.get("ceiling"):
        parts += ["## Bare-forward ceiling", "", ceiling_table(result["ceiling"]), ""]
    if result.get("decode_step_b16"):
        c = result["decode_step_b16"]
        parts += [f"Decode step at batch {c['batch_size']}, context {c['context_len']}: bare forward "
                  f"{c['bare_forward_s']:.4f} s, engine ModelRunner.decode {c['engine_decode_s']:.4f} s "
                  f"({c['decode_vs_bare']:.3f}x), whole EngineCore.step {c['engine_step_s']:.4f} s "
                  f"({c['step_vs_bare']:.3f}x).", ""]
    for name, eff in (result.get("efficiency") or {}).items():
        if eff:
            parts += [f"Efficiency of {name} against the ceiling: "
                      f"decode {fmt(eff.get('decode_efficiency'), '{:.2f}')}, "
                      f"whole step {fmt(eff.get('step_efficiency'), '{:.2f}')}, "
                      f"wall {fmt(eff.get('wall_efficiency'), '{:.2f}')}, "
                      f"throughput / ceiling at batch {eff.get('largest_batch')}: "
                      f"{fmt(eff.get('throughput_vs_ceiling'), '{:.2f}')}", ""]
    return parts


def roofline_section(result: dict[str, Any], heading: str = "##") -> list[str]:
    """Each engine run's decode steps by batch size (and the bare forward's) against the peaks."""
    roof = result.get("roofline")
    if not roof:
        return []
    peaks, cost = roof["peaks"], roof["cost_model"]
    matmul = ", ".join(f"{d} {fmt(v, '{:.1f}')}" for d, v in peaks["matmul_gflop_per_s"].items())
    dtypes = ", ".join(f"{d} {b / 1e6:.1f} MB" for d, b in cost["weight_bytes_by_dtype"].items())
    parts = [f"{heading} Roofline", "",
             f"Measured peaks on {peaks['device']} ({peaks['threads']} torch threads): copy "
             f"{peaks['copy_gb_per_s']:.1f} GB/s (read + write), {peaks['matmul_n']}-square matmul GFLOP/s "
             f"{matmul}. Each decode step reads {cost['weight_bytes'] / 1e6:.1f} MB of weights ({dtypes}) "
             f"and does {2 * cost['matmul_params'] / 1e6:.1f} MFLOP of matmuls per row, plus attention "
             f"and K/V reads that grow with the context; FLOP/s are compared with the "
             f"{cost['compute_dtype']} peak.", "",
             "| run | batch | steps | context | decode p50 ms | weights GB/s | all GB/s | of copy | GFLOP/s | "
             "of matmul | FLOP/byte | bound | of roofline |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pct = "{:.0%}"
    for name, summary in roof["systems"].items():
        for label, b in summary["decode_by_batch"].items():
            parts.append(f"| {name} | {label} | {b['steps']} | {b['mean_context']:.0f} | "
                         f"{1000 * b['decode_p50_s']:.1f} | {b['weight_gb_per_s']:.1f} | {b['gb_per_s']:.1f} | "
                         f"{fmt(b['bandwidth_fraction'], pct)} | {b['gflop_per_s']:.1f} | "
                         f"{fmt(b['compute_fraction'], pct)} | {fmt(b['flop_per_byte'], '{:.1f}')} | "
                         f"{b['bound'] or '-'} | {fmt(b['roofline_fraction'], pct)} |")
    for batch, b in (roof.get("ceiling") or {}).items():
        context = result.get("ceiling", {}).get(batch, {}).get("context_len", "-")
        step_ms = 1000 * result.get("ceiling", {}).get(batch, {}).get("step_s", float("nan"))
        parts.append(f"| bare forward | {batch} | - | {context} | {step_ms:.1f} | - | {b['gb_per_s']:.1f} | "
                     f"{fmt(b['bandwidth_fraction'], pct)} | {b['gflop_per_s']:.1f} | "
                     f"{fmt(b['compute_fraction'], pct)} | {fmt(b['flop_per_byte'], '{:.1f}')} | "
                     f"{b['bound'] or '-'} | {fmt(b['roofline_fraction'], pct)} |")
    parts.append("")
    for name, summary in roof["systems"].items():
        p = summary.get("prefill")
        if p:
            parts += [f"Prefill of {name}: {p['tokens']} tokens in {p['seconds']:.2f} s, "
                      f"{p['gflop_per_s']:.1f} GFLOP/s of matmuls ({fmt(p['compute_fraction'], pct)} of the peak).", ""]
    return parts


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


def write_outputs(result: dict[str, Any], runs: dict[str, Any], out: Path, *, json_path: Path | None = None,
                  plots: bool = True, padding_plot: bool = False) -> Path:
    """Write a run's files into ``out`` (docs/benchmarks.md) and print its report.

    ``runs`` maps labels to the systems' runs (``records``, ``steps``); ``capacity...`` runs
    are kept out of the plots. A missing matplotlib skips the plots with a note.
    """
    out.mkdir(parents=True, exist_ok=True)
    result["output_dir"] = str(out)
    write_json(result, out / "result.json")
    if json_path:
        write_json(result, json_path)
    write_json({label: records_to_json(run.records) for label, run in runs.items()}, out / "requests.json")
    steps = {label: run.steps for label, run in runs.items() if run.steps}
    if steps:
        write_json(steps, out / "steps.json")
    if plots:
        _write_plots(result, runs, steps, out, padding_plot)
    markdown = markdown_report(result)
    (out / "report.md").write_text(markdown)
    print(markdown)
    for name, r in (result.get("ratios_vs_baton") or {}).items():
        print(f"baton vs {name}: output tok/s x{fmt(r.get('output_tokens_per_s'), '{:.2f}')}, "
              f"e2e p95 x{fmt(r.get('e2e_p95_s'), '{:.2f}')} (baton/{name})")
    print(f"results: {out}/ (result.json, report.md, requests.json"
          f"{', steps.json' if steps else ''}{', *.png' if plots else ''})")
    return out


def _write_plots(result: dict[str, Any], runs: dict[str, Any], steps: dict[str, Any], out: Path,
                 padding: bool) -> None:
    try:
        measured = {label: run.records for label, run in runs.items() if not label.startswith("capacity")}
        plot_latency_cdfs(measured, out / "latency_cdf.png", result.get("title", ""))
        if result.get("loads"):
            plot_vs_load(result["loads"], out / "vs_load.png")
        if padding:
            plot_padding({k: v for k, v in steps.items() if not k.startswith("capacity")}, out / "padding.png")
    except ImportError as error:
        result.setdefault("notes", []).append(f"plots skipped: {error}")


# --- plots --------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _axis(ax, xlabel: str, ylabel: str | None = None) -> None:
    ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def _save(plt, fig, path: Path, title: str | None = None) -> Path:
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
        _axis(ax, label, "fraction of requests")
    return _save(plt, fig, path, title or "latency CDFs")


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
        _axis(ax, "offered load (fraction of run-to-completion capacity)")
    return _save(plt, fig, path, title or "throughput and p95 latency vs offered load")


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
    _axis(ax, "time (s)", "padding ratio before decode")
    return _save(plt, fig, path)
