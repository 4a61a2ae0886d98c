"""The bare-forward ceiling: what one decode step of the model alone costs.

``measure_ceiling`` times one decode forward (plus the greedy pick) of the bare
``transformers`` model at each batch size, on a ``DynamicCache`` holding ``context``
tokens per row (random K/V: attention costs the same whatever the values, and no
prefill has to run). Throughput at batch ``B`` is ``B / step time``: no engine can
decode faster on this machine with this model and attention implementation.

``compare_decode_step`` puts Baton's engine next to it at one batch size and context:
``EngineCore`` with ``B`` equal-length prompts (no padding), timing ``core.step()``
and the ``ModelRunner.decode()`` inside it (from the core's ``StepRecord``), interleaved with bare forwards at the same
context length so that CPU contention hits both alike. Medians are reported.

    python -m baton_sidecar.bench.ceiling --batch 64 --device cuda --dtype bfloat16

prints that comparison as one JSON object (``scripts/gpu-check.sh`` runs it).
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any, Sequence

import torch
from transformers import DynamicCache

from ..config import EngineConfig, Limits, PolicyConfig
from ..model import LoadedModel
from .workloads import TokenSource

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _shape(model) -> tuple[int, int, int]:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, head_dim


def synthetic_cache(loaded: LoadedModel, batch: int, context: int, seed: int = 0) -> DynamicCache:
    """A ``DynamicCache`` with ``context`` random K/V columns per row, on the model's device and dtype."""
    model = loaded.model
    layers, kv_heads, head_dim = _shape(model)
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    cache = DynamicCache(config=model.config)
    for layer in range(layers):
        k = torch.randn(batch, kv_heads, context, head_dim, generator=generator).to(loaded.device, dtype)
        v = torch.randn(batch, kv_heads, context, head_dim, generator=generator).to(loaded.device, dtype)
        cache.update(k, v, layer)
    return cache


class BareDecoder:
    """Bare decode steps at a fixed batch and context (the cache is cropped back after each)."""

    def __init__(self, loaded: LoadedModel, batch: int, context: int) -> None:
        self.loaded = loaded
        self.context = context
        self.cache = synthetic_cache(loaded, batch, context)
        vocab = loaded.model.config.vocab_size
        self.input_ids = torch.randint(min(100, vocab // 2), vocab, (batch, 1)).to(loaded.device)
        self.position_ids = torch.full((batch, 1), context, dtype=torch.long).to(loaded.device)

    @torch.inference_mode()
    def step_s(self) -> float:
        device = self.loaded.device
        _sync(device)
        start = time.perf_counter()
        out = self.loaded.model(input_ids=self.input_ids, position_ids=self.position_ids,
                                past_key_values=self.cache, use_cache=True)
        out.logits[:, -1, :].argmax(dim=-1).tolist()  # the greedy pick, as any decode step does
        _sync(device)
        elapsed = time.perf_counter() - start
        self.cache.crop(-1)  # drop the column this step appended: the context stays fixed
        return elapsed


def measure_ceiling(loaded: LoadedModel, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, context: int = 192,
                    steps: int = 5, warmup: int = 2, progress=None) -> dict[str, dict[str, float]]:
    """``{str(B): {step_s, tokens_per_s, context_len, samples}}`` for each batch size."""
    out: dict[str, dict[str, float]] = {}
    for batch in sorted(set(int(b) for b in batch_sizes if b >= 1)):
        decoder = BareDecoder(loaded, batch, context)
        for _ in range(warmup):
            decoder.step_s()
        times = [decoder.step_s() for _ in range(steps)]
        median = statistics.median(times)
        out[str(batch)] = {"step_s": median, "tokens_per_s": batch / median, "context_len": context,
                           "samples": steps}
        if progress is not None:
            progress(1)
    return out


def ceiling_batch_sizes(seen: Sequence[int]) -> list[int]:
    """Powers of two up to the largest batch seen, plus that largest (at least 1 and 16)."""
    largest = max([1, *seen])
    sizes = {1, 16, largest}
    b = 2
    while b < largest:
        sizes.add(b)
        b *= 2
    return sorted(sizes)


def interpolate_step_s(ceiling: dict[str, dict[str, float]], batch: int) -> float:
    """Bare step time at ``batch`` by linear interpolation between measured batch sizes."""
    points = sorted((int(b), v["step_s"]) for b, v in ceiling.items())
    if not points:
        raise ValueError("empty ceiling")
    if batch <= points[0][0]:
        return points[0][1] * batch / points[0][0] if batch < points[0][0] else points[0][1]
    for (b0, s0), (b1, s1) in zip(points, points[1:]):
        if b0 <= batch <= b1:
            return s0 + (s1 - s0) * (batch - b0) / (b1 - b0)
    b_last, s_last = points[-1]
    return s_last * batch / b_last  # beyond the largest measured: proportional


def efficiency(steps: Sequence[dict[str, float]], ceiling: dict[str, dict[str, float]],
               makespan_s: float, output_tokens_per_s: float | None) -> dict[str, Any]:
    """How close an engine run came to the bare forward.

    ``decode_efficiency`` = bare time for the same decode steps (same batch sizes) / the
    engine's decode-forward time; ``step_efficiency`` = the same bare time / the engine's
    whole step time (scheduling, prefill, sampling, shaping included);
    ``wall_efficiency`` = bare time / the run's makespan (idle and load-generator time
    included). ``throughput_vs_ceiling`` = output tokens/s / bare tokens/s at the largest
    batch the run reached.
    """
    decode_steps = [s for s in steps if s.get("rows", 0) > 0]
    if not decode_steps or not ceiling:
        return {}
    ideal = sum(interpolate_step_s(ceiling, int(s["rows"])) for s in decode_steps)
    decode = sum(s["decode_s"] for s in decode_steps)
    step_total = sum(s["step_s"] for s in steps)
    largest = max(int(s["rows"]) for s in decode_steps)
    ceiling_tps = largest / interpolate_step_s(ceiling, largest)
    return {
        "decode_steps": len(decode_steps),
        "bare_decode_s": ideal,
        "engine_decode_s": decode,
        "engine_step_s": step_total,
        "engine_prefill_s": sum(s.get("prefill_s", 0.0) for s in steps),
        "makespan_s": makespan_s,
        "decode_efficiency": ideal / decode if decode else None,
        "step_efficiency": ideal / step_total if step_total else None,
        "wall_efficiency": ideal / makespan_s if makespan_s else None,
        "largest_batch": largest,
        "ceiling_tokens_per_s_at_largest_batch": ceiling_tps,
        "throughput_vs_ceiling": (output_tokens_per_s / ceiling_tps) if output_tokens_per_s else None,
    }


def compare_decode_step(loaded: LoadedModel, source: TokenSource, batch: int = 16, context: int = 128,
                        steps: int = 8, warmup: int = 2, seed: int = 0) -> dict[str, Any]:
    """One engine decode step at ``batch`` vs the bare forward at ``batch``, same context length."""
    from ..engine.core import EngineCore
    from ..engine.request import Request, SamplingParams
    from ..engine.step import StepRecord

    limits = Limits(max_batch_size=max(batch, Limits().max_batch_size))  # every row in one batch
    core = EngineCore(loaded, EngineConfig(), PolicyConfig(limits=limits))
    log: list[StepRecord] = []
    core.step_observer = log.append
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=warmup + steps + 8, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        core.add(Request(f"ceiling-{i}", list(source.take(context, rng)), params, params.max_tokens))
    while core.runner.num_rows < batch:  # prefill (and first decode) of all rows
        core.step()
    bare = BareDecoder(loaded, batch, core.runner.cache.length + (warmup + steps) // 2)
    engine_steps, engine_decodes, bare_steps, lengths = [], [], [], []
    for i in range(warmup + steps):
        core.step()
        bare_s = bare.step_s()
        if i >= warmup:
            engine_steps.append(log[-1].step_s)
            engine_decodes.append(log[-1].decode_s)
            lengths.append(log[-1].context)
            bare_steps.append(bare_s)
    bare_med = statistics.median(bare_steps)
    decode_med = statistics.median(engine_decodes)
    step_med = statistics.median(engine_steps)
    return {
        "batch_size": batch,
        "context_len": bare.context,
        "engine_context_len": [min(lengths), max(lengths)],
        "samples": steps,
        "bare_forward_s": bare_med,
        "engine_decode_s": decode_med,
        "engine_step_s": step_med,
        "decode_vs_bare": decode_med / bare_med,
        "step_vs_bare": step_med / bare_med,
        "decode_within_10pct": decode_med <= 1.10 * bare_med,
        "step_within_10pct": step_med <= 1.10 * bare_med,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """The engine's decode step against the bare forward at one batch size, as JSON on stdout."""
    import argparse
    import json

    from ..model import load_model
    from .inputs import WorkloadOptions, token_source

    parser = argparse.ArgumentParser(prog="python -m baton_sidecar.bench.ceiling", description=main.__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", help="local transformers dir or .gguf (default: the embedded model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(EngineConfig(model=args.model, device=args.device, dtype=args.dtype), progress=False)
    notes: list[str] = []
    source = token_source(loaded.tokenizer, WorkloadOptions(synthetic_fallback=True), notes)
    result = compare_decode_step(loaded, source, batch=args.batch, context=args.context, steps=args.steps)
    print(json.dumps({**result, "device": str(loaded.device), "dtype": args.dtype, "notes": notes}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
