"""Decode-batch row padding: run a small batch at the row count the matmul kernels like best.

On CPU, BLAS runs a matmul with very few rows as one matrix-vector product per row, so
each row streams the whole weight matrix again: measured on a 2-core x86 machine with the
default model's output projection (49152 x 576, fp32), 1 row 11 ms, 2 rows 24 ms, 3 rows
36 ms, but 4 rows 18 ms. A decode step at 2 or 3 rows is then cheaper with dummy rows
added (the cache gives them their own masked slots; their logits are dropped). This is
the CPU counterpart of padding a GPU batch to a captured graph size.

The table is measured once per process, weight shape and thread count, on the model's
own output projection (the largest matmul of a decode step); on CUDA it is empty.
"""

from __future__ import annotations

import time

import torch

MAX_PADDED_ROWS = 8  # beyond this every BLAS we know is in its matrix-matrix regime
MIN_SAVING = 0.2  # pad only when the padded matmul is at least 20% faster

_cache: dict[tuple, dict[int, int]] = {}


def padded_rows_table(times_by_rows: dict[int, float]) -> dict[int, int]:
    """``{rows: padded_rows}`` for the row counts worth padding, from measured matmul times."""
    table = {}
    for rows in sorted(times_by_rows):
        best = min((r for r in times_by_rows if r >= rows), key=lambda r: (times_by_rows[r], r))
        if best != rows and times_by_rows[best] <= (1.0 - MIN_SAVING) * times_by_rows[rows]:
            table[rows] = best
    return table


def _time_matmul(head: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    head(x)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        head(x)
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def calibrate(model: torch.nn.Module, device: torch.device, repeats: int = 3) -> dict[int, int]:
    """Measure the model's output projection at 1..MAX_PADDED_ROWS rows; CPU only."""
    if device.type != "cpu":
        return {}
    head = model.get_output_embeddings()
    width = getattr(head, "in_features", None)
    if width is None:
        return {}
    # The head module itself, float or int8 (quantization.Int8Linear): each has its own kernel.
    dtype = next(model.parameters()).dtype
    key = (type(head).__name__, width, head.out_features, dtype, torch.get_num_threads())
    if key not in _cache:
        times = {rows: _time_matmul(head, torch.randn(rows, width, dtype=dtype, device=device), repeats)
                 for rows in range(1, MAX_PADDED_ROWS + 1)}
        _cache[key] = padded_rows_table(times)
    return dict(_cache[key])
