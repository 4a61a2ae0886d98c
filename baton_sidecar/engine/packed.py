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
padded to the prompt's full length, masked past the causal edge, so the CPU kernel's key
blocks are ``generate``'s (they follow the key length). Its query blocks follow each call:
it cuts a call's queries into blocks of 32 (64 from 192 queries, 256 from 768), and a block
of 1-3 rows is reduced another way than one of >= 4. So each query is computed in a block of
the size class it had in ``generate``'s one call (``query_pieces``): then chunk boundaries do
not change a bit (``tests/engine/test_packed.py``). Replayed outputs (a recompute
preemption's re-prefill) are computed one query at a time over their prefix, as their decode
steps did.
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


SMALL_BLOCK = 4  # the CPU kernel reduces query blocks of 1-3 rows another way than blocks of >= 4
LEAD = 32  # rows that fill a call's first query block (calls of < 192 queries)


def kernel_block(queries: int) -> int:
    """Rows per query block of torch's CPU flash attention in a call of ``queries`` queries."""
    return 256 if queries >= 768 else 64 if queries >= 192 else 32


@dataclass(frozen=True)
class QueryPiece:
    """One attention call over prompt queries ``[first, first + count)``, after ``lead`` copies of
    the first and before ``pad`` copies of the last (whose outputs are dropped)."""

    first: int
    count: int
    lead: int = 0
    pad: int = 0


def query_pieces(start: int, stop: int, prompt_len: int) -> list[QueryPiece]:
    """The calls that give prompt queries ``[start, stop)`` the bits of ``generate``'s one call.

    That call cuts its ``prompt_len`` queries into ``kernel_block(prompt_len)``-row blocks; the
    last holds the rest, ``short`` rows if that is 1-3 (prompts of 33-35, 65-67, 193, ...).
    Measured (torch 2.13, MKL, AVX-512): a row's bits follow its block's size class, not the
    block's size or the row's place in it. Every block of >= 4 rows gives the same bits; blocks
    of 1 and of 2-3 rows give others, which also move with the alignment of the kernel's scratch
    buffers (sized by the call's first block: a full 32-row first block lays them out as
    ``generate``'s call does; a call of 1-3 queries alone may not). So:

    - rows in >= 4-row blocks there: one call, its own last block padded to >= 4 rows (a chunk
      of 33-35 queries would otherwise end in a 1-3-row block);
    - the short block's rows: padded to ``short`` rows, as the second block of a call after
      ``LEAD`` copies (alone only for a whole prompt of 1-3 tokens, alone in ``generate`` too).
    """
    block = kernel_block(prompt_len)
    short = prompt_len % block if prompt_len % block < SMALL_BLOCK else 0
    body_end = prompt_len - short  # queries [0, body_end) sit in >= 4-row blocks there
    pieces = []
    if start < min(stop, body_end):
        count = min(stop, body_end) - start
        rest = count % kernel_block(count)  # padding by <= 3 crosses no block-size threshold
        pieces.append(QueryPiece(start, count, pad=SMALL_BLOCK - rest if 0 < rest < SMALL_BLOCK else 0))
    first = max(start, body_end)
    if first < stop:
        pieces.append(QueryPiece(first, stop - first, lead=LEAD if body_end else 0, pad=short - (stop - first)))
    return pieces


def with_copies(t: torch.Tensor, lead: int, pad: int) -> torch.Tensor:
    """``t [1, X, C, Y]`` with ``lead`` copies of row 0 (dim 2) before it and ``pad`` of row C-1 after."""
    if not lead and not pad:
        return t
    return torch.cat([t[:, :, :1].expand(-1, -1, lead, -1), t, t[:, :, -1:].expand(-1, -1, pad, -1)], dim=2)


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
        window = kwargs.get("sliding_window")
        if self.rows_alone is None or window:  # batched rows: plain causal attention over the keys so far
            return grouped_attention(module, q, keys[:, :, :seg.stop], values[:, :, :seg.stop],
                                     causal_mask(seg.start, seg.length, seg.stop, q.device, window))
        prompt_queries = max(0, min(seg.stop, seg.prompt_len) - seg.start)
        out = []
        if prompt_queries:
            out.append(prompt_attention(module, q[:, :, :prompt_queries], seg, keys, values, **kwargs))
        for i in range(prompt_queries, seg.length):  # replayed outputs: each alone over its prefix
            position = seg.start + i
            out.append(sdpa_attention_forward(module, q[:, :, i: i + 1], keys[:, :, : position + 1],
                                              values[:, :, : position + 1], None, **kwargs)[0])
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]


def prompt_attention(module: nn.Module, q: torch.Tensor, seg: Segment, keys: torch.Tensor,
                     values: torch.Tensor, **kwargs) -> torch.Tensor:
    """``q [1, H, C, D]``, prompt queries from ``seg.start``, -> ``[1, C, H, D]`` with the bits of
    ``generate``'s one-pass prefill: over keys padded to the prompt's length (its key blocks),
    in calls whose query blocks match its own (``query_pieces``)."""
    width = seg.prompt_len
    keys, values = keys[:, :, :width], values[:, :, :width]
    out = []
    for piece in query_pieces(seg.start, seg.start + q.shape[2], width):
        rows = slice(piece.first - seg.start, piece.first - seg.start + piece.count)
        queries = with_copies(q[:, :, rows], piece.lead, piece.pad)
        mask = with_copies(causal_mask(piece.first, piece.count, width, q.device), piece.lead, piece.pad)
        part = sdpa_attention_forward(module, queries, keys, values, mask, **kwargs)[0]
        out.append(part[:, piece.lead: piece.lead + piece.count])
    return torch.cat(out, dim=1) if len(out) > 1 else out[0]
