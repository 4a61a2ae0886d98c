"""What a prompt chunk costs a decode step: fused into the decode forward, or in a forward of its own.

    python -m baton_sidecar.bench.fusion --threads 1 [--rows 1,4,16] [--chunks 0,16,32,64,128]
                                         [--starts 0,1024] [--context 200] [--out DIR]

For each batch of ``rows`` decode rows (prompts of ``context`` tokens) and each chunk of
``chunk`` prompt tokens after ``start`` already prefilled, the best of ``--repeat`` times of:

- ``fused``: ``ModelRunner.run_packed([chunk], decode=True)``, one packed forward;
- ``separate``: ``ModelRunner.decode()`` then ``run_packed([chunk], decode=False)``.

Chunk 0 is the plain decode step. The marginal cost of a chunk is its time less that step's.
Side by side in one process, so the ratios hold on a noisy machine; absolute times do not.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..config import EngineConfig
from ..engine.runner import ModelRunner, PromptPart
from ..model import LoadedModel, load_model


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _random_tokens(loaded: LoadedModel, count: int) -> list[int]:
    return torch.randint(2, min(int(loaded.model.config.vocab_size), 1000), (count,)).tolist()


def _batch(loaded: LoadedModel, rows: int, context: int) -> ModelRunner:
    runner = ModelRunner(loaded)
    prompts = [_random_tokens(loaded, context) for _ in range(rows)]
    prefilled = runner.prefill([f"row{i}" for i in range(rows)], prompts)
    runner.embed(prefilled, list(range(rows)), [5] * rows)
    return runner


def measure(loaded: LoadedModel, rows: int, start: int, chunks: list[int], context: int,
            repeat: int) -> list[dict]:
    """Each chunk size after the same ``start`` prefilled tokens (re-run in place: the prompt's
    filled count is set back before each attempt), fused and separate, best of ``repeat``."""
    runner = _batch(loaded, rows, context)
    total = start + max(chunks)
    tokens = _random_tokens(loaded, total)
    if start:
        runner.run_packed([PromptPart("p", tokens[:start], 0, total, total, last=False)], decode=False)
    results = []
    for chunk in chunks:
        best = {"fused": float("inf"), "separate": float("inf")}
        for _ in range(repeat):
            for how in best:
                part = PromptPart("p", tokens[start: start + chunk], start, total, total, last=False)
                if "p" in runner.prompts:
                    runner.prompts["p"].filled = start
                begin = time.perf_counter()
                if not chunk:
                    runner.decode()
                elif how == "fused":
                    runner.run_packed([part], decode=True)
                else:
                    runner.decode()
                    runner.run_packed([part], decode=False)
                best[how] = min(best[how], time.perf_counter() - begin)
        results.append({"rows": rows, "chunk": chunk, "start": start,
                        "fused_s": best["fused"], "separate_s": best["separate"]})
    return results


def table(results: list[dict]) -> str:
    """Markdown: per (rows, start), each chunk's fused and separate ms and the marginal cost."""
    plain = {(r["rows"], r["start"]): r["fused_s"] for r in results if r["chunk"] == 0}  # the decode step
    lines = ["| rows | start | chunk | fused ms | separate ms | fused / separate | chunk's extra ms, fused "
             "| ... separate |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["chunk"] == 0:
            continue
        base = plain[(r["rows"], r["start"])]
        lines.append(f"| {r['rows']} | {r['start']} | {r['chunk']} | {1000 * r['fused_s']:.1f} | "
                     f"{1000 * r['separate_s']:.1f} | {r['fused_s'] / r['separate_s']:.2f} | "
                     f"{1000 * (r['fused_s'] - base):.1f} | {1000 * (r['separate_s'] - base):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local transformers dir or .gguf (default: the embedded model)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--chunks", default="0,16,32,64,128")
    parser.add_argument("--starts", default="0,1024")
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(EngineConfig(model=args.model), progress=False)
    results = [entry for rows in _ints(args.rows) for start in _ints(args.starts)
               for entry in measure(loaded, rows, start, _ints(args.chunks), args.context, args.repeat)]
    text = table(results)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fusion.json").write_text(json.dumps({"threads": torch.get_num_threads(),
                                                          "results": results}, indent=1))
        (args.out / "fusion.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
