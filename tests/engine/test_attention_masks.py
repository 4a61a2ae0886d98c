"""Sliding-window bands and eager masks, against transformers' own mask functions."""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import and_masks, causal_mask_function, sliding_window_overlay

from baton_sidecar.attention_masks import additive, positional_band, sliding_band, windowed


def transformers_window(window: int, queries: int, keys: int) -> torch.Tensor:
    """transformers' rule for queries at the last ``queries`` of ``keys`` positions."""
    visible = and_masks(causal_mask_function, sliding_window_overlay(window))
    first = keys - queries
    q_idx = torch.arange(queries)[:, None] + first
    k_idx = torch.arange(keys)[None, :]
    return visible(torch.tensor(0), torch.tensor(0), q_idx, k_idx).expand(queries, keys)


@pytest.mark.parametrize("window, queries, keys", [(4, 1, 10), (4, 10, 10), (3, 5, 12), (8, 1, 8), (1, 3, 3)])
def test_the_band_is_transformers_sliding_window(window, queries, keys):
    assert torch.equal(sliding_band(window, queries, keys, torch.device("cpu")), transformers_window(window, queries, keys))
    start = keys - queries  # a prompt's own keys: column k is position k
    assert torch.equal(positional_band(window, start, queries, keys, torch.device("cpu"))[0, 0],
                       transformers_window(window, queries, keys))


def test_windowed_keeps_the_row_mask_and_adds_the_band():
    rows = torch.tensor([[False, False, True, True, True, True], [True] * 6])[:, None, None, :]  # [2, 1, 1, 6]
    out = windowed(rows, 3, 1, 6, torch.device("cpu"))
    assert out[:, 0, 0].tolist() == [[False, False, False, True, True, True], [False, False, False, True, True, True]]
    assert windowed(rows, 6, 1, 6, torch.device("cpu")) is rows  # a window that cannot bind changes nothing
    assert windowed(rows, None, 1, 6, torch.device("cpu")) is rows
    causal = windowed(None, 2, 3, 3, torch.device("cpu"))[0, 0]  # None means causal
    assert causal.tolist() == [[True, False, False], [True, True, False], [False, True, True]]
    floats = additive(rows, torch.float32)
    again = windowed(floats, 3, 1, 6, torch.device("cpu"))
    assert torch.equal(again == 0, out)


def test_additive_is_zero_where_visible_and_minimum_elsewhere():
    mask = torch.tensor([[True, False]])
    out = additive(mask, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out[0, 0] == 0 and out[0, 1] == torch.finfo(torch.bfloat16).min
    assert additive(None, torch.float32) is None
