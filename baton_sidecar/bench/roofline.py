"""Roofline accounting: how far each decode step is from this machine's memory and compute limits.

Three parts, all outside the engine (they read the bench's step log afterwards):

- ``cost_model(model)``: bytes and FLOPs of one forward, from the model's config and the
  storage of its weights as loaded (an int8 weight counts 1 byte per element, bfloat16 2);
- ``measure_peaks(device, dtype)``: a STREAM-like copy (GB/s, read + write) and square
  matmuls (GFLOP/s), best of a few runs, about a second on a CPU;
- ``summarize(steps, cost, peaks)``: per decode batch-size bucket, the bytes and FLOPs of
  the steps over their decode-forward time, against those peaks.

Per decode step of ``rows`` rows attending ``context`` columns (``StepRecord.context``)::

    bytes = weight_bytes + 2 * layers * kv_heads * head_dim * context * rows * kv_element_size
    flops = rows * (2 * matmul_params + 4 * layers * heads * head_dim * context)

Every weight matrix is read once per forward whatever the rows; K and V are read once per row.
Prefill counts ``2 * matmul_params`` FLOPs per prompt token (its attention needs each prompt's
length, which the step log does not keep). docs/benchmarks.md explains what is left out.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..quantization import Int8Linear


@dataclass(frozen=True)
class CostModel:
    weight_bytes: int  # distinct weights one forward reads (tied matrices once, packed int8 as stored)
    matmul_params: int  # elements of the matmul weights: 2 FLOPs each per token
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    kv_element_size: int  # bytes per cached K or V element (the activations' dtype)
    weight_bytes_by_dtype: Mapping[str, int] = field(default_factory=dict)

    def kv_read_bytes(self, rows: int, context: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * context * rows * self.kv_element_size

    def decode_bytes(self, rows: int, context: int) -> int:
        return self.weight_bytes + self.kv_read_bytes(rows, context)

    def attention_flops(self, context: int) -> int:
        """One new token against ``context`` columns: QK^T and PV, 2 FLOPs per multiply-add each."""
        return 4 * self.layers * self.heads * self.head_dim * context

    def decode_flops(self, rows: int, context: int) -> int:
        return rows * (2 * self.matmul_params + self.attention_flops(context))

    def prefill_flops(self, tokens: int) -> int:
        return 2 * self.matmul_params * tokens

    @property
    def compute_dtype(self) -> str:
        """The dtype most weight bytes are stored in: picks the matmul peak to compare with."""
        by = self.weight_bytes_by_dtype
        return max(by, key=by.get) if by else "float32"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "weight_bytes_by_dtype": dict(self.weight_bytes_by_dtype),
                "compute_dtype": self.compute_dtype}


# --- the cost model ---------------------------------------------------------------------------

def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor occupies as stored: a wrapper subclass (torchao's quantized weights) is
    the sum of its inner tensors; a quantized ``qint8`` tensor is 1 byte per element."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _dtype_name(tensor: torch.Tensor) -> str:
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None:  # a subclass stores its data in the first inner tensor
        names, _ = tensor.__tensor_flatten__()
        return _dtype_name(getattr(tensor, names[0])) if names else str(tensor.dtype)
    return str(tensor.dtype).removeprefix("torch.").replace("qint8", "int8").replace("quint8", "uint8")


def weight_tensors(model: torch.nn.Module) -> Iterable[torch.Tensor]:
    """Every distinct weight one forward reads in full.

    Parameters (``parameters()`` yields a tied matrix once), the buffers of Baton's
    ``Int8Linear`` and the packed weights of ``torch.ao`` dynamic-quantized linears (not
    parameters: ``module.weight()`` unpacks them as ``qint8``). An input embedding that is not
    also the output head is left out: a step gathers only its rows' entries of it.
    """
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    table = getattr(embedding, "weight", None)
    skip = table if table is not None and getattr(output, "weight", None) is not table else None
    for parameter in model.parameters():
        if parameter is not skip:
            yield parameter
    for module in model.modules():
        if isinstance(module, Int8Linear):  # Baton's int8 weights are buffers: qweight, scales, bias
            yield from module.buffers(recurse=False)
        elif getattr(module, "_packed_params", None) is not None and callable(getattr(module, "weight", None)):
            yield module.weight()
            bias = module.bias() if callable(getattr(module, "bias", None)) else None
            if bias is not None:
                yield bias


def matmul_params(model: torch.nn.Module) -> int:
    """``in_features * out_features`` over every linear (plain or quantized; the head included)."""
    total = 0
    for module in model.modules():
        fan_in, fan_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if isinstance(fan_in, int) and isinstance(fan_out, int):
            total += fan_in * fan_out
    return total


def cost_model(model: torch.nn.Module) -> CostModel:
    """The model's ``CostModel`` from its config and its weights' storage as loaded."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    by_dtype: dict[str, int] = {}
    for tensor in weight_tensors(model):
        name = _dtype_name(tensor)
        by_dtype[name] = by_dtype.get(name, 0) + tensor_bytes(tensor)
    embedding = model.get_input_embeddings()
    return CostModel(weight_bytes=sum(by_dtype.values()), matmul_params=matmul_params(model),
                     layers=config.num_hidden_layers, heads=heads,
                     kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                     kv_element_size=embedding.weight.element_size(), weight_bytes_by_dtype=by_dtype)


# --- this machine's peaks ---------------------------------------------------------------------

def _best_s(fn, device: torch.device, repeats: int) -> float:
    """Shortest of ``repeats`` timed calls after one warm-up (first-touch page faults, kernel picks)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 5) -> float:
    """GB/s of ``dst.copy_(src)``, counting the bytes read and the bytes written."""
    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = _best_s(lambda: dst.copy_(src), device, repeats)
    return 2 * src.nbytes / seconds / 1e9


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float | None:
    """GFLOP/s of an ``n x n x n`` matmul (int8: ``torch._int_mm``); None where it does not run."""
    try:
        if dtype == torch.int8:
            a = torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device)
            b = torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device)
            fn = lambda: torch._int_mm(a, b)  # noqa: E731
        else:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            fn = lambda: a @ b  # noqa: E731
        return 2 * n**3 / _best_s(fn, device, repeats) / 1e9
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


def measure_peaks(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """``{copy_gb_per_s, matmul_gflop_per_s: {dtype: GFLOP/s}, matmul_n, threads}``: float32,
    the model's dtype, and int8. Runs on the bench's own torch threads, like the engine."""
    n = 8192 if device.type == "cuda" else 1024  # ~1 TFLOP on a GPU, 2 GFLOP on a CPU core
    start = time.perf_counter()
    dtypes = dict.fromkeys([torch.float32, dtype, torch.int8])
    peaks = {str(d).removeprefix("torch."): matmul_peak(device, d, n) for d in dtypes}
    return {"copy_gb_per_s": copy_bandwidth(device), "matmul_gflop_per_s": peaks, "matmul_n": n,
            "device": str(device), "threads": torch.get_num_threads(),
            "measure_s": time.perf_counter() - start}


# --- steps against the peaks ------------------------------------------------------------------

def bucket(rows: int) -> tuple[int, str]:
    """(upper bound, label) of the power-of-two bucket of ``rows``: 1, 2, 3-4, 5-8, 9-16, ..."""
    top = 1
    while top < rows:
        top *= 2
    return top, (str(top) if top <= 2 else f"{top // 2 + 1}-{top}")


def _against(cost: CostModel, peaks: Mapping[str, Any], nbytes: float, flops: float,
             seconds: float) -> dict[str, Any]:
    """Achieved rates over ``seconds``, their fractions of the peaks, and the roofline's bound.

    ``roofline_fraction`` = max(bytes / peak bandwidth, FLOPs / peak FLOP/s) / seconds: 1.0 is
    at the limit; ``bound`` says which of the two terms is the larger.
    """
    bandwidth = peaks.get("copy_gb_per_s")
    compute = (peaks.get("matmul_gflop_per_s") or {}).get(cost.compute_dtype)
    gb_s, gflop_s = nbytes / seconds / 1e9, flops / seconds / 1e9
    memory_s = nbytes / 1e9 / bandwidth if bandwidth else None
    compute_s = flops / 1e9 / compute if compute else None
    limits = [s for s in (memory_s, compute_s) if s is not None]
    return {"gb_per_s": gb_s, "gflop_per_s": gflop_s,
            "bandwidth_fraction": gb_s / bandwidth if bandwidth else None,
            "compute_fraction": gflop_s / compute if compute else None,
            "flop_per_byte": flops / nbytes if nbytes else None,
            "bound": None if not limits else ("memory" if (memory_s or 0) >= (compute_s or 0) else "compute"),
            "roofline_fraction": max(limits) / seconds if limits else None}


def summarize(steps: Sequence[Mapping[str, float]], cost: CostModel, peaks: Mapping[str, Any]) -> dict[str, Any]:
    """``{decode_by_batch: {label: ...}, prefill: ...}`` from ``systems.step_entry`` dicts.

    Per bucket, totals over its steps: bytes and FLOPs / the summed decode-forward time
    (``decode_s``), so a long step weighs more than a short one.
    """
    groups: dict[tuple[int, str], list[Mapping[str, float]]] = {}
    for s in steps:
        if s.get("rows", 0) > 0 and s.get("decode_s", 0) > 0:
            groups.setdefault(bucket(int(s["rows"])), []).append(s)
    by_batch = {}
    for (_, label), group in sorted(groups.items()):
        seconds = sum(s["decode_s"] for s in group)
        weights = cost.weight_bytes * len(group)
        nbytes = sum(cost.decode_bytes(int(s["rows"]), int(s["length"])) for s in group)
        flops = sum(cost.decode_flops(int(s["rows"]), int(s["length"])) for s in group)
        by_batch[label] = {"steps": len(group), "mean_rows": sum(s["rows"] for s in group) / len(group),
                           "mean_context": sum(s["length"] for s in group) / len(group),
                           "decode_p50_s": statistics.median(s["decode_s"] for s in group),
                           "decode_s": seconds, "weight_gb_per_s": weights / seconds / 1e9,
                           "kv_share_of_bytes": 1 - weights / nbytes,
                           **_against(cost, peaks, nbytes, flops, seconds)}
    out: dict[str, Any] = {"decode_by_batch": by_batch}
    prefill_s = sum(s.get("prefill_s", 0.0) for s in steps)
    tokens = int(sum(s.get("prefill_tokens", 0) for s in steps))
    if prefill_s > 0 and tokens:
        out["prefill"] = {"tokens": tokens, "seconds": prefill_s,
                          **_against(cost, peaks, 0, cost.prefill_flops(tokens), prefill_s)}
        out["prefill"].update(gb_per_s=None, bandwidth_fraction=None, flop_per_byte=None)
    return out


def ceiling_roofline(ceiling: Mapping[str, Mapping[str, float]], cost: CostModel,
                     peaks: Mapping[str, Any]) -> dict[str, Any]:
    """The bare forward's decode steps (``ceiling.<B>``) on the same roofline."""
    return {b: _against(cost, peaks, cost.decode_bytes(int(b), int(e["context_len"])),
                        cost.decode_flops(int(b), int(e["context_len"])), e["step_s"])
            for b, e in sorted(ceiling.items(), key=lambda kv: int(kv[0]))}
