"""Masks Baton's attention adds to what the model gives it: sliding windows, and eager's form.

Sliding-window layers (Mistral, Qwen2 with ``use_sliding_window``, Gemma 2/3's alternating
layers) let a query see only the last ``window`` positions, itself included: key ``k`` is
visible to the query at position ``q`` iff ``q - window < k <= q`` (transformers' rule).

The running batch is left-padded: every row's newest token sits in the same last column and
each row's tokens are contiguous, so a column's distance from the query is the same for every
row. A window is therefore one band over columns, shared by all rows; it is ANDed with the
row mask (padding, dummy rows). Masks transformers built already hold the band: ANDing it
again changes nothing.
"""

from __future__ import annotations

import torch


def sliding_band(window: int, queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """``[queries, keys]`` bool for queries in the last ``queries`` of ``keys`` columns.

    Query ``i`` sits at column ``keys - queries + i``; it sees the ``window`` columns ending there.
    """
    query_cols = torch.arange(queries, device=device)[:, None] + (keys - queries)
    key_cols = torch.arange(keys, device=device)[None, :]
    return (key_cols > query_cols - window) & (key_cols <= query_cols)


def positional_band(window: int | None, start: int, queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """``[1, 1, queries, keys]`` bool over a prompt's own keys (key ``k`` is position ``k``):
    query ``i`` is position ``start + i`` and sees keys ``<= start + i``, within ``window`` if any."""
    query_pos = torch.arange(queries, device=device)[:, None] + start
    key_pos = torch.arange(keys, device=device)[None, :]
    visible = key_pos <= query_pos
    if window:
        visible &= key_pos > query_pos - window
    return visible[None, None]


def windowed(mask: torch.Tensor | None, window: int | None, queries: int, keys: int,
             device: torch.device) -> torch.Tensor | None:
    """``mask`` (``[B, 1, Q, K']``, bool or additive float, or None = causal) with the window applied.

    Unchanged where the window cannot bind (at most ``window`` keys).
    """
    if not window or keys <= window:
        return mask
    band = sliding_band(window, queries, keys, device)[None, None]
    if mask is None:
        return band
    mask = mask[..., :keys]
    if mask.dtype == torch.bool:
        return mask & band
    return mask.masked_fill(~band, torch.finfo(mask.dtype).min)


def additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask as eager attention adds it to the scores: 0 where visible, the dtype's minimum elsewhere."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
