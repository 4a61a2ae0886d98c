"""Rewrite the README's generated "Performance" text from bench results (what ``make bench`` ends with).

    python -m baton_sidecar.bench.readme bench-out/offline/result.json bench-out/trace/result.json \\
        --readme README.md

Only the text between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` changes. Each result
gets the report's systems table, its floors, the machine, the date and the command that produced
it; its plots are copied to ``--img-dir`` (default ``docs/img`` next to the README) as
``bench-<title>.png`` and ``bench-<title>-vs-load.png`` and linked. The output depends only on
the inputs, so a second run changes nothing. Missing or misplaced markers: exit 2, nothing
written (no README, no plots).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from . import report

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"
# (file in the run's output directory, suffix of the committed copy, what it shows)
PLOTS = (("latency_cdf.png", "", "TTFT and end-to-end latency CDFs"),
         ("vs_load.png", "-vs-load", "throughput and p95 latency vs offered load"))
GPU_ARGS = "--device cuda --dtype bfloat16 -n 256"
# What `make bench` runs (the Makefile adds llama_server when BATON_LLAMA_SERVER names a binary).
OFFLINE_SYSTEMS = "baton,baton_int8,rtc,hf_static,hf_cb,hf_serve,baton_serve"
TRACE_SYSTEMS = "baton,baton_int8,rtc,hf_cb,hf_serve,baton_serve"
CPU_ONLY = "baton_int8,"  # int8 weights run on CPUs only: left out of the GPU command lines


class ReadmeError(Exception):
    """Printed as ``bench readme: ...``, exit code 2."""


def replace_section(text: str, body: str) -> str:
    """``text`` with everything between the two markers replaced by ``body``."""
    starts, ends = text.count(START), text.count(END)
    if starts != 1 or ends != 1:
        raise ReadmeError(f"expected one {START} and one {END}, found {starts} and {ends}")
    i, j = text.index(START) + len(START), text.index(END)
    if j < i:
        raise ReadmeError(f"{END} comes before {START}")
    body = body.strip("\n")
    return f"{text[:i]}\n{body}\n{text[j:]}" if body else f"{text[:i]}\n{text[j:]}"


def load_result(path: Path) -> dict[str, Any]:
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ReadmeError(f"cannot read {path}: {error}") from None
    if not isinstance(result, dict) or "systems" not in result or "workload" not in result:
        raise ReadmeError(f"{path} is not a bench result (no 'systems' or 'workload')")
    return result


def plot_copies(result: dict[str, Any], json_path: Path, img_dir: Path, slug: str) -> list[tuple[Path, Path, str]]:
    """(source, committed copy, caption) for each plot the run wrote.

    Plots are looked for next to the JSON (``--out``'s ``result.json``), then in the recorded
    ``output_dir`` (relative to where the bench ran, normally the repository root).
    """
    dirs = [json_path.parent] + ([Path(result["output_dir"])] if result.get("output_dir") else [])
    copies = []
    for name, suffix, caption in PLOTS:
        source = next((d / name for d in dirs if (d / name).is_file()), None)
        if source is not None:
            copies.append((source, img_dir / f"bench-{slug}{suffix}.png", caption))
    return copies


def result_section(result: dict[str, Any], images: Sequence[tuple[str, str]]) -> str:
    """One result as Markdown: ``images`` are (link relative to the README, caption)."""
    title = str(result.get("title") or result["workload"].get("name"))
    parts = [f"### {title[:1].upper()}{title[1:]}", ""]
    started = str(result.get("started_at") or "date not recorded").replace("T", " ")
    parts += [f"Run {started}: {report.machine_line(result)}.", ""]
    command = result.get("command") or "(command not recorded in this result)"
    parts += ["```sh", command, "```", ""]
    parts += [report.workload_line(result), ""]
    capacity = result.get("capacity")
    if capacity:
        parts += [f"Capacity {capacity['requests_per_s']:.3f} req/s ({capacity.get('source')}).", ""]
    parts += report.systems_tables(result, heading="####")
    floors = result.get("floors") or []
    if floors:
        met = sum(1 for f in floors if f.get("met"))
        parts += [f"Floors met: {met} of {len(floors)} (measured ratio against target).", ""]
        parts += [report.floors_table(floors), ""]
    parts += report.roofline_section(result, heading="####")
    for link, caption in images:
        parts += [f"![{title}: {caption}]({link})", ""]
    parts += [f"- {note}" for note in result.get("notes") or ()]
    return "\n".join(parts).rstrip("\n")


def gpu_paragraph(measured: bool = False) -> str:
    """How to get the GPU figures; ``measured``: a result above ran on CUDA."""
    status = ("The results above include a CUDA run." if measured else
              "**GPU figures: not yet measured.** Every number above is from a CPU.")
    return "\n".join([
        "### On a GPU",
        "",
        status,
        "`scripts/gpu-check.sh` runs the one-shot check (CUDA parity, both workloads in bfloat16",
        "beside `hf_cb`, the decode step against the bare forward at batch 64) in under 8 minutes.",
        "",
        f'`make bench BENCH_INT8= BENCH_ARGS="{GPU_ARGS}"` runs the same two workloads on CUDA',
        "in bfloat16 with 256 requests each and torch's own thread count (no `--threads`), then",
        "rewrites this section:",
        "",
        "```sh",
        f"baton-sidecar bench offline --systems {OFFLINE_SYSTEMS.replace(CPU_ONLY, '')} {GPU_ARGS} "
        "--out bench-out/offline",
        f"baton-sidecar bench trace --load 0.8 --systems {TRACE_SYSTEMS.replace(CPU_ONLY, '')} {GPU_ARGS} "
        "--out bench-out/trace",
        "python -m baton_sidecar.bench.readme bench-out/offline/result.json bench-out/trace/result.json "
        "--readme README.md",
        "```",
        "",
        "Larger models and batch limits: [docs/benchmarks.md](docs/benchmarks.md#on-a-gpu).",
    ])


def render(results: Sequence[dict[str, Any]], images: Sequence[Sequence[tuple[str, str]]]) -> str:
    parts = ["<!-- Written by `make bench` (python -m baton_sidecar.bench.readme); edits here are overwritten. -->",
             "",
             "Every system runs the identical requests, one after another, so the ratios matter more",
             "than the absolute numbers. The in-process systems share the bench's process; `baton_serve`",
             "(`baton-sidecar serve`), `hf_serve` (`transformers serve --continuous-batching`) and",
             "`llama_server` (llama.cpp) are servers the bench starts on loopback with the same model and",
             "threads, loaded over HTTP: `baton_serve` against `hf_serve` is server against server. Regenerate with",
             "`make bench`; details in [docs/benchmarks.md](docs/benchmarks.md).",
             ""]
    for result, result_images in zip(results, images):
        parts += [result_section(result, result_images), ""]
    parts.append(gpu_paragraph(any(str(r.get("device") or "").startswith("cuda") for r in results)))
    return "\n".join(parts)


def update_readme(readme: Path, json_paths: Sequence[Path], img_dir: Path | None = None) -> bool:
    """Rewrite ``readme``'s section from ``json_paths``; True if the README changed."""
    try:
        text = readme.read_text()
    except OSError as error:
        raise ReadmeError(f"cannot read {readme}: {error}") from None
    replace_section(text, "")  # bad markers are reported before bad results
    if not json_paths:
        raise ReadmeError("no result JSON given")
    img_dir = img_dir if img_dir is not None else readme.parent / "docs" / "img"
    results = [load_result(p) for p in json_paths]
    slugs: list[str] = []
    copies = []
    for path, result in zip(json_paths, results):
        slug = re.sub(r"[^a-z0-9]+", "-", str(result.get("title") or "result").lower()).strip("-") or "result"
        slug = slug if slug not in slugs else f"{slug}-{len(slugs) + 1}"
        slugs.append(slug)
        copies.append(plot_copies(result, path, img_dir, slug))
    images = [[(Path(os.path.relpath(target, readme.parent)).as_posix(), caption)
               for _, target, caption in result_copies] for result_copies in copies]
    new = replace_section(text, render(results, images))
    for result_copies in copies:
        for source, target, _ in result_copies:
            _copy_if_changed(source, target)
    if new == text:
        return False
    readme.write_text(new)
    return True


def _copy_if_changed(source: Path, target: Path) -> None:
    data = source.read_bytes()
    if not target.is_file() or target.read_bytes() != data:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m baton_sidecar.bench.readme",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="result.json files, in the order to show them")
    parser.add_argument("--readme", type=Path, default=Path("README.md"), help="the README to rewrite")
    parser.add_argument("--img-dir", type=Path, help="where plots are copied (default: docs/img next to the README)")
    args = parser.parse_args(argv)
    try:
        changed = update_readme(args.readme, args.results, args.img_dir)
    except ReadmeError as error:
        print(f"bench readme: {error}", file=sys.stderr)
        return 2
    print(f"{args.readme}: {'rewritten' if changed else 'unchanged'} between {START} and {END}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
