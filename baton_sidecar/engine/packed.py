"""One forward pass over a step's decode rows and prompt segments, packed as one sequence.

A packed step runs ``[1, N]`` tokens: first one token per decode row of the batch, then each
prompt segment's tokens (a whole prompt, or one chunk of a long one)::

    packed:   | r0 | r1 | ... | rB-1 | seg 0: C0 tokens | seg 1: C1 tokens | ...
    position:  p_r0 ...        p_rB-1  s0 .. s0+C0-1     s1 .. s1+C1-1

Linear layers see all ``N`` tokens at once, so the weights are read once per step whatever
mixes in it (on a CPU at small batch a decode step is bound by that read, and a prompt chunk
riding along costs little more). Rotary embeddings take per-token positions. Attention is
the one part that must keep rows apart: ``PackedCache`` routes each layer's new K/V (the
decode rows' into the batch cache, each segment's into its prompt's own ``PromptKV``) and
``attend`` computes each part against its own keys:

- decode rows: as a plain decode step over the batch cache (its 4-D mask), or each row alone
  when rows attend alone (int8, see ``row_attention``);
- a segment: its queries over its prompt's keys so far, causally (query ``i`` sees positions
  ``<= start + i``).

Exactness: with rows attending alone (int8), a segment's prompt queries attend over keys
padded to the prompt's full length, masked past the causal edge. The CPU kernel then reduces
each query as ``generate``'s one-pass causal prefill does (its key blocks follow the key
length), so chunk boundaries do not change a bit (``tests/engine/test_packed.py``). Query
blocks of one or two tokens are reduced another way; the scheduler plans no chunk under 16
tokens but a prompt's whole rest. Replayed outputs (a recompute preemption's re-prefill) are
computed one query at a time over their prefix, as their decode steps did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .. import row_attention
from ..attention_masks import positional_band, windowed
from .kv_cache import BatchKVCache


class PromptKV:
    """One prompt's K/V while it is prefilled: per layer ``[1, H_kv, T, D]``, filled from 0.

    ``T`` is every token the prefill computes (prompt, plus replayed outputs after a recompute
    preemption), allocated once: chunks write in place, nothing is copied as it grows.
    ``zeroed``: exact attention reads the unfilled tail (masked) and needs it finite.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, length: int,
                 dtype: torch.dtype, device: torch.device, zeroed: bool) -> None:
        alloc = torch.zeros if zeroed else torch.empty
        shape = (1, num_kv_heads, length, head_dim)
        self.keys = [alloc(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [alloc(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.filled = 0  # positions [0, filled) hold K/V

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]


@dataclass
class Segment:
    """Tokens ``[start, start + length)`` of a prompt, at ``offset`` in the packed sequence."""

    kv: PromptKV
    offset: int
    start: int
    length: int
    prompt_len: int  # positions >= this are replayed outputs (recompute preemption)

    @property
    def stop(self) -> int:
        return self.start + self.length


def causal_mask(start: int, queries: int, keys: int, device: torch.device,
                window: int | None = None) -> torch.Tensor:
    """``[1, 1, queries, keys]`` bool: query ``i`` (position ``start + i``) sees keys ``<= start + i``
    (and, in a sliding-window layer, only the last ``window`` of them)."""
    return positional_band(window, start, queries, keys, device)


def grouped_attention(module: nn.Module, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """``query [1, H, C, D]`` over ``keys``/``values [1, H_kv, S, D]`` -> ``[1, C, H, D]``.

    The query heads that share a K/V head are laid side by side as one block of queries
    (``[1, H_kv, G * C, D]``, G = H / H_kv), so the keys are read as they are: ``sdpa`` with
    a mask would otherwise have them copied G-fold (``repeat_kv``), for every layer of every
    step, which at a long prompt's context costs more than the attention itself.
    """
    _, heads, count, dim = query.shape
    groups = heads // keys.shape[1]
    grouped = query.reshape(1, heads // groups, groups * count, dim)  # query r*C + i of KV head k: head k*G + r
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped, keys, values, attn_mask=mask.expand(1, 1, count, mask.shape[-1]).repeat(1, 1, groups, 1),
        scale=module.scaling)
    return out.reshape(1, heads, count, dim).transpose(1, 2)


class PackedCache:
    """The ``transformers`` cache protocol for a packed step (``update(k, v, layer_idx)``).

    ``rows`` decode rows go to ``batch`` (whose ``begin_step`` the runner called); segments'
    K/V are written into their ``PromptKV``. Returns the packed K/V unchanged: ``attend``
    reads each part's keys from where they now live.
    """

    is_compileable = False

    def __init__(self, batch: BatchKVCache | None, rows: int, decode_mask: torch.Tensor | None,
                 segments: list[Segment], rows_alone: list[int] | None) -> None:
        self.batch, self.rows, self.decode_mask = batch, rows, decode_mask
        self.segments = segments
        self.rows_alone = rows_alone  # per decode row its tokens (queries included), or None: batched
        self._decode_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are given explicitly; transformers only asks

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``key``/``value [1, H_kv, N, D]``: write each part where it belongs."""
        if self.rows:
            as_rows = (lambda t: t[0, :, : self.rows].transpose(0, 1).unsqueeze(2))  # [B, H_kv, 1, D]
            self._decode_kv[layer_idx] = self.batch.update(as_rows(key), as_rows(value), layer_idx)
        for seg in self.segments:
            part = slice(seg.offset, seg.offset + seg.length)
            seg.kv.keys[layer_idx][:, :, seg.start: seg.stop] = key[:, :, part]
            seg.kv.values[layer_idx][:, :, seg.start: seg.stop] = value[:, :, part]
        return key, value

    def attend(self, module: nn.Module, query: torch.Tensor, **kwargs) -> torch.Tensor:
        """``query [1, H, N, D]`` -> ``[1, N, H, D]``, each part over its own keys."""
        layer = module.layer_idx
        parts = []
        if self.rows:
            parts.append(self._attend_rows(module, query, layer, **kwargs))
        for seg in self.segments:
            parts.append(self._attend_segment(module, query, seg, layer, **kwargs))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _attend_rows(self, module: nn.Module, query: torch.Tensor, layer: int, **kwargs) -> torch.Tensor:
        q = query[0, :, : self.rows].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
        keys, values = self._decode_kv.pop(layer)
        window = kwargs.get("sliding_window")
        if self.rows_alone is not None and not window:
            kwargs[row_attention.ROW_LENGTHS] = self.rows_alone
            out, _ = row_attention.per_row_attention(module, q, keys, values, None, **kwargs)
        else:
            mask = windowed(self.decode_mask, window, 1, keys.shape[2], q.device)
            out, _ = sdpa_attention_forward(module, q, keys, values, mask, **kwargs)
        return out.transpose(0, 1)  # [B, 1, H, D] -> [1, B, H, D]

    def _attend_segment(self, module: nn.Module, query: torch.Tensor, seg: Segment, layer: int,
                        **kwargs) -> torch.Tensor:
        q = query[:, :, seg.offset: seg.offset + seg.length]  # [1, H, C, D]
        keys, values = seg.kv.keys[layer], seg.kv.values[layer]

        def over(count: int, width: int) -> torch.Tensor:  # the first ``count`` queries: [1, count, H, D]
            queries, mask = q[:, :, :count], causal_mask(seg.start, count, width, q.device)
            if count == 1 and self.rows_alone is not None:
                # The kernel reduces a lone query its own way; twice over, as a block, it is
                # reduced as the one-pass prefill reduced it.
                queries, mask = queries.expand(-1, -1, 2, -1), mask.expand(-1, -1, 2, -1)
            return sdpa_attention_forward(module, queries, keys[:, :, :width], values[:, :, :width],
                                          mask, **kwargs)[0][:, :count]

        window = kwargs.get("sliding_window")
        if self.rows_alone is None or window:  # batched rows: plain causal attention over the keys so far
            return grouped_attention(module, q, keys[:, :, :seg.stop], values[:, :, :seg.stop],
                                     causal_mask(seg.start, seg.length, seg.stop, q.device, window))
        prompt_queries = max(0, min(seg.stop, seg.prompt_len) - seg.start)
        out = []
        if prompt_queries:  # keys padded to the prompt's length: the one-pass prefill's reduction
            out.append(over(prompt_queries, seg.prompt_len))
        for i in range(prompt_queries, seg.length):  # replayed outputs: each alone over its prefix
            position = seg.start + i
            out.append(sdpa_attention_forward(module, q[:, :, i: i + 1], keys[:, :, : position + 1],
                                              values[:, :, : position + 1], None, **kwargs)[0])
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]
