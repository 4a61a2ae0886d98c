"""What int8 costs in quality, against float32 on the same checkpoint.

    python -m baton_sidecar.bench.quality [--texts 200] [--prompts 32] [--new-tokens 32]

- Perplexity over held texts: the Arena-Hard reference answers (``$BATON_DATA_DIR`` or
  ``../shared/data``), each cut to ``--max-tokens``; one teacher-forced forward per text.
  None of them is used to calibrate int8 (that uses ``quantization.CALIBRATION``).
- Greedy agreement: the first ``--new-tokens`` greedy tokens of ``--prompts`` Arena-Hard
  questions (chat template), int8 against float32: the share of prompts whose tokens are all
  equal, and the mean share of tokens before the first difference.

Exits 1 when int8 perplexity is more than ``--floor`` (3%) above float32's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from ..config import EngineConfig
from ..model import LoadedModel, load_model
from .workloads import ARENA_ANSWERS, ARENA_QUESTIONS, default_data_dir


def _read(name: str, field, limit: int) -> list[str]:
    path = default_data_dir() / name
    if not path.is_file():
        sys.exit(f"quality: {path} is missing; set BATON_DATA_DIR to the folder holding the "
                 "Arena-Hard files (lmarena/arena-hard-auto data/arena-hard-v0.1)")
    with open(path) as handle:
        return [field(json.loads(line)) for line in handle if line.strip()][:limit]


@torch.inference_mode()
def perplexity(loaded: LoadedModel, texts: list[str], max_tokens: int) -> float:
    nll, count = 0.0, 0
    for text in texts:
        ids = loaded.tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens].to(loaded.device)  # [1, T]
        if ids.shape[1] < 2:
            continue
        logits = loaded.model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # [T-1, V]
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(nll / count)


@torch.inference_mode()
def greedy(loaded: LoadedModel, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=loaded.device)
        tokens = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, do_sample=False)
        out.append(tokens[0, len(prompt):].tolist())
    return out


def agreement(want: list[list[int]], got: list[list[int]]) -> tuple[float, float]:
    """(share of sequences equal throughout, mean share of tokens before the first difference)."""
    prefixes = []
    for a, b in zip(want, got):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefixes.append(same / max(len(a), 1))
    return sum(p == 1.0 for p in prefixes) / len(prefixes), sum(prefixes) / len(prefixes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m baton_sidecar.bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="transformers dir or .gguf (default: the embedded model)")
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--floor", type=float, default=0.03, help="allowed relative perplexity increase")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    texts = _read(ARENA_ANSWERS, lambda row: row["messages"][1]["content"]["answer"], args.texts)
    questions = _read(ARENA_QUESTIONS, lambda row: row["prompt"], args.prompts)
    result: dict = {"texts": len(texts), "max_tokens": args.max_tokens, "prompts": len(questions),
                    "new_tokens": args.new_tokens}
    runs = {}
    for quantization in ("none", "int8"):
        start = time.perf_counter()
        loaded = load_model(EngineConfig(model=args.model, device="cpu", quantization=quantization), progress=False)
        prompts = [loaded.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                        tokenize=True, return_dict=False) for q in questions]
        runs[quantization] = (perplexity(loaded, texts, args.max_tokens), greedy(loaded, prompts, args.new_tokens))
        result[f"{quantization}_seconds"] = round(time.perf_counter() - start, 1)
    (ppl_f32, tokens_f32), (ppl_int8, tokens_int8) = runs["none"], runs["int8"]
    exact, prefix = agreement(tokens_f32, tokens_int8)
    result |= {"perplexity_float32": round(ppl_f32, 4), "perplexity_int8": round(ppl_int8, 4),
               "perplexity_ratio": round(ppl_int8 / ppl_f32, 4), "greedy_exact": round(exact, 3),
               "greedy_prefix": round(prefix, 3)}
    print(json.dumps(result, indent=1))
    ok = ppl_int8 <= ppl_f32 * (1 + args.floor)
    print(f"int8 perplexity {ppl_int8:.3f} vs float32 {ppl_f32:.3f} ({100 * (ppl_int8 / ppl_f32 - 1):+.2f}%): "
          f"{'within' if ok else 'ABOVE'} the {100 * args.floor:.0f}% floor; greedy: {100 * exact:.0f}% of "
          f"prompts identical for {args.new_tokens} tokens, {100 * prefix:.0f}% of tokens before the first difference")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
