"""Model work on the running batch: prefill newcomers apart, embed them, decode, split rows off.

Every method that touches the cache runs under ``torch.inference_mode`` (the buffers are
inference tensors). The runner knows rows and tensors, not scheduling: the engine core
executes the scheduler's plan through it, and it never calls the scheduler. All attention
inputs (mask, positions, cache views) are built here and in ``kv_cache``.

State: the batch (``cache`` plus per-row ``row_ids``, ``next_tokens``, ``positions``, all
index-aligned) and, apart from it, the K/V of each prompt whose prefill is under way: a
``PromptKV`` for packed steps (``prompts``), or a ``DynamicCache`` for models that cannot
pack (``chunks``), each with its parts' prompt scores so far (``chunk_scores``).

Two ways to run prompts: ``run_packed`` (prompt parts, and with ``decode`` the batch's decode
rows, in one packed forward: see ``packed.py``), where the model allows (``can_pack``); else
``prefill`` (whole prompts, left-padded together) and ``prefill_chunk``.

A prefill row can be embedded several times (``embed`` with a repeated row): that is how the
choices of an ``n`` > 1 request fork from its one prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .. import row_attention
from ..architectures import full_cache, kv_geometry
from ..model import LoadedModel
from .kv_cache import BatchKVCache, RowKV
from .packed import PackedCache, PromptKV, Segment
from .prompt_logprobs import PromptScores, capture_hidden, head_is_plain, score

# What a prefill row scores of its prompt (``prompt_logprobs``): (the tokens its positions
# predict, top-k alternatives per token).
ScoreRequest = tuple[list[int], int]


@dataclass
class Prefilled:
    """Newcomers prefilled together: per-layer K/V ``[n, H_kv, P, D]``, mask ``[n, P]``."""

    request_ids: list[str]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    last_logits: torch.Tensor  # [n, V] logits at each row's last prompt token
    prompt_scores: dict[int, PromptScores] = field(default_factory=dict)  # row -> its prompt's logprobs


@dataclass
class PromptPart:
    """Tokens ``[start, start + len(tokens))`` of a request's prefill, for a packed step."""

    request_id: str
    tokens: list[int]
    start: int
    total: int  # the tokens its prefill computes in all (prompt, plus replayed outputs)
    prompt_len: int  # positions >= this are replayed outputs
    last: bool  # the prefill's last part: it returns ``Prefilled``
    scores: ScoreRequest | None = None


@dataclass
class PackedOutput:
    decode_logits: torch.Tensor | None  # [B, V]: the decode rows', if the step decoded
    prefilled: list[Prefilled | None]  # per part: ``Prefilled`` after its prefill's last part


@dataclass
class SwappedRow:
    """A row split off the batch with its K/V on host memory (``swap`` preemption)."""

    kv: RowKV
    next_token: int
    position: int


class ModelRunner:
    def __init__(self, loaded: LoadedModel, padded_rows: dict[int, int] | None = None) -> None:
        """``padded_rows``: ``{B: B'}``, decode steps at B rows run with B' - B dummy rows."""
        self.model = loaded.model
        self.device = loaded.device
        layers, kv_heads, head_dim = kv_geometry(loaded.model, loaded.device)
        self.dtype = next(loaded.model.parameters()).dtype
        self.cache = BatchKVCache(layers, kv_heads, head_dim, self.dtype, self.device)
        pad = loaded.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else 0  # padding is always masked; its id is irrelevant
        # Row state, index-aligned with the cache's rows.
        self.row_ids: list[str] = []
        self.next_tokens: list[int] = []  # the token each row feeds at the next decode step
        self.positions: list[int] = []  # that token's position (= real tokens before it)
        self.padded_rows = dict(padded_rows or {})
        self.chunks: dict[str, DynamicCache] = {}  # request id -> its chunked prefill's cache so far
        self.prompts: dict[str, PromptKV] = {}  # request id -> its packed prefill's K/V so far
        self.chunk_scores: dict[str, list[PromptScores]] = {}  # ... and its chunks' prompt scores
        # Prompt logprobs are exact only for a model whose logits are its plain output head
        # (see prompt_logprobs); checked once, with a 2-token forward.
        self.scores_prompts = head_is_plain(self.model, self.device)
        # Rows attend as if alone (int8); packed steps need Baton's attention function (installed
        # here too for models built outside ``load_model``, where the model allows it).
        self.per_row_attention = row_attention.rows_attend_alone(self.model)
        row_attention.install(self.model)
        self.can_pack = row_attention.packs(self.model)

    @property
    def num_rows(self) -> int:
        return len(self.row_ids)

    def num_cached_tokens(self) -> int:
        """Real tokens in the cache: ``cache.num_real_tokens()`` without reducing the mask."""
        return sum(self.positions)  # a row's position = its cached tokens

    def padding_ratio(self) -> float:
        """Share of the live window's slots that are padding (from positions: no mask reduction)."""
        slots = self.cache.num_slots()
        return 0.0 if slots == 0 else 1.0 - self.num_cached_tokens() / slots

    def row_of(self, request_id: str) -> int:
        return self.row_ids.index(request_id)

    # --- prefill ------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, request_ids: list[str], token_lists: list[list[int]],
                scores: dict[int, ScoreRequest] | None = None, replayed: list[int] | None = None) -> Prefilled:
        """Run the prompts alone (left-padded together), never touching the running batch.

        ``scores``: rows whose prompt positions are scored too (``prompt_logprobs``).
        ``replayed``: per row, trailing tokens that are re-prefilled outputs (recompute).
        """
        scores = scores or {}
        n, width = len(token_lists), max(len(t) for t in token_lists)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.bool)
        for i, tokens in enumerate(token_lists):
            input_ids[i, width - len(tokens):] = torch.tensor(tokens)
            mask[i, width - len(tokens):] = True
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.long().cumsum(dim=-1) - 1).clamp_min(0)  # [n, P]
        cache = full_cache()
        with capture_hidden(self.model, enabled=bool(scores)) as hidden:
            out = self.model(input_ids=input_ids, attention_mask=mask.long(), position_ids=positions,
                             past_key_values=cache, use_cache=True, logits_to_keep=1,
                             **self._row_lengths([len(t) for t in token_lists], replayed))
        # Row i's prompt starts at column width - len: left padding.
        prompt_scores = {i: score(self.model, hidden[0][i, width - len(token_lists[i]):], targets, k)
                         for i, (targets, k) in scores.items()}
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        return Prefilled(request_ids, keys, values, mask, out.logits[:, -1, :], prompt_scores)

    @torch.inference_mode()
    def prefill_chunk(self, request_id: str, tokens: list[int], start: int, last: bool,
                      scores: ScoreRequest | None = None) -> Prefilled | None:
        """Prefill prompt tokens ``[start, start + len(tokens))`` in the request's own cache.

        Returns ``Prefilled`` (mask ``[1, P]``) after the ``last`` chunk, which also drops the
        request's entry in ``chunks``; None before that. ``scores``: this chunk's positions
        are scored too; the last chunk returns every chunk's scores.
        """
        cache = self.chunks.get(request_id) if start else None
        if cache is None:
            cache = self.chunks[request_id] = full_cache()
            self.chunk_scores[request_id] = []
        assert cache.get_seq_length() == start, "chunks must arrive in order"
        stop = start + len(tokens)
        input_ids = torch.tensor([tokens], device=self.device)  # [1, C]
        positions = torch.arange(start, stop, device=self.device)[None, :]
        mask = torch.ones(1, stop, dtype=torch.long, device=self.device)
        with capture_hidden(self.model, enabled=scores is not None) as hidden:
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
        if scores is not None:
            self.chunk_scores[request_id].append(score(self.model, hidden[0][0], *scores))
        if not last:
            return None
        del self.chunks[request_id]
        parts = self.chunk_scores.pop(request_id)
        return Prefilled([request_id], [layer.keys for layer in cache.layers],
                         [layer.values for layer in cache.layers], mask.bool(), out.logits[:, -1, :],
                         {0: PromptScores.cat(parts)} if scores is not None else {})

    def drop_chunk(self, request_id: str) -> None:
        self.chunks.pop(request_id, None)
        self.prompts.pop(request_id, None)
        self.chunk_scores.pop(request_id, None)

    def prefilled_tokens(self, request_id: str) -> int | None:
        """Tokens of an unfinished prefill computed so far; None if it has none under way."""
        if request_id in self.prompts:
            return self.prompts[request_id].filled
        cache = self.chunks.get(request_id)
        return None if cache is None else cache.get_seq_length()

    def discard(self, request_id: str) -> None:
        """Drop a request's K/V wherever it is: its row, or its unfinished chunked prefill."""
        if request_id in self.chunks or request_id in self.prompts:
            self.drop_chunk(request_id)
        else:
            self.remove([request_id])

    # --- packed steps ---------------------------------------------------------------------

    @torch.inference_mode()
    def run_packed(self, parts: list[PromptPart], decode: bool) -> PackedOutput:
        """One forward over prompt ``parts`` and, with ``decode``, one token of every batch row.

        The sequence is ``[1, N]``: the rows' next tokens, then each part's tokens (see
        ``packed.py``). Logits are kept for the rows and for each last part's last token only.
        """
        rows = self.num_rows if decode else 0
        segments, offset = [], rows
        for part in parts:
            kv = self.prompts.get(part.request_id) if part.start else None
            if kv is None:
                kv = self.prompts[part.request_id] = PromptKV(
                    self.cache.num_layers, self.cache.num_kv_heads, self.cache.head_dim, part.total,
                    self.dtype, self.device, zeroed=self.per_row_attention)
                self.chunk_scores[part.request_id] = []
            assert kv.filled == part.start, "parts must arrive in order"
            segments.append(Segment(kv, offset, part.start, len(part.tokens), part.prompt_len))
            offset += len(part.tokens)
        input_ids = self.next_tokens[:rows] + [t for part in parts for t in part.tokens]
        positions = self.positions[:rows] + [p for s in segments for p in range(s.start, s.stop)]
        keep = list(range(rows)) + [s.offset + s.length - 1 for s, p in zip(segments, parts) if p.last]
        decode_mask = self.cache.begin_step(rows) if rows else None
        packed = PackedCache(self.cache, rows, decode_mask, segments,
                             [p + 1 for p in self.positions] if self.per_row_attention else None)
        try:
            with capture_hidden(self.model, enabled=any(p.scores is not None for p in parts)) as hidden:
                out = self.model(input_ids=torch.tensor([input_ids], device=self.device),
                                 position_ids=torch.tensor([positions], device=self.device),
                                 # A ready 4-D mask is used as is; the packed cache masks each part.
                                 attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device),
                                 past_key_values=packed, use_cache=True,
                                 logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device),
                                 **{row_attention.PACKED: packed})
        except BaseException:
            if rows:
                self.cache.abort_step()
            raise
        if rows:
            self.cache.end_step()
            self.positions = [p + 1 for p in self.positions]
        logits = out.logits[0]  # [len(keep), V]
        prefilled: list[Prefilled | None] = []
        done = rows
        for segment, part in zip(segments, parts):
            segment.kv.filled = segment.stop
            if part.scores is not None:
                hidden_part = hidden[0][0, segment.offset: segment.offset + segment.length]
                self.chunk_scores[part.request_id].append(score(self.model, hidden_part, *part.scores))
            if not part.last:
                prefilled.append(None)
                continue
            prefilled.append(self._prompt_done(part, logits[done: done + 1]))
            done += 1
        return PackedOutput(logits[:rows] if rows else None, prefilled)

    def _prompt_done(self, part: PromptPart, last_logits: torch.Tensor) -> Prefilled:
        kv = self.prompts.pop(part.request_id)
        parts = self.chunk_scores.pop(part.request_id)
        mask = torch.ones(1, kv.length, dtype=torch.bool, device=self.device)
        return Prefilled([part.request_id], kv.keys, kv.values, mask, last_logits,
                         {0: PromptScores.cat(parts)} if part.scores is not None else {})

    @torch.inference_mode()
    def embed(self, prefilled: Prefilled, rows: list[int], next_tokens: list[int],
              ids: list[str] | None = None) -> None:
        """Embed rows ``rows`` of ``prefilled`` into the running batch, each with its next token.

        A row may be listed more than once: each copy becomes a batch row of its own (the
        choices of one prompt), named by ``ids`` (default: the prefilled request's id).
        """
        if not rows:
            return
        index = torch.tensor(rows, device=self.device)  # repeated rows are copied by index_select
        keys = [k.index_select(0, index) for k in prefilled.keys]
        values = [v.index_select(0, index) for v in prefilled.values]
        mask = prefilled.mask.index_select(0, index)
        # Drop columns that are padding in every selected row before shaping.
        first = int(torch.argmax(mask.any(dim=0).to(torch.int8)))
        if first:
            keys = [k[:, :, first:] for k in keys]
            values = [v[:, :, first:] for v in values]
            mask = mask[:, first:]
        self.cache.insert(keys, values, mask)
        lengths = mask.sum(dim=1).tolist()
        self.row_ids.extend(ids if ids is not None else [prefilled.request_ids[r] for r in rows])
        self.next_tokens.extend(next_tokens)
        self.positions.extend(int(n) for n in lengths)

    # --- decode ---------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self) -> torch.Tensor:
        """One step for every row; returns logits ``[B, V]``."""
        rows = self.num_rows
        step_rows = self.padded_rows.get(rows, rows)  # B' >= B, see row_padding
        attention_mask = self.cache.begin_step(step_rows)  # [B', 1, 1, L+1]
        dummies = step_rows - rows
        input_ids = torch.tensor(self.next_tokens + [self.pad_token_id] * dummies, device=self.device)[:, None]
        position_ids = torch.tensor(self.positions + [0] * dummies, device=self.device)[:, None]  # [B', 1]
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=self.cache, use_cache=True,
                             **self._row_lengths([p + 1 for p in self.positions] + [0] * dummies))
        except BaseException:
            self.cache.abort_step()
            raise
        self.cache.end_step()
        self.positions = [p + 1 for p in self.positions]
        return out.logits[:rows, -1, :]

    def _row_lengths(self, lengths: list[int], replayed: list[int] | None = None) -> dict[str, list[int]]:
        """The forward's extra kwargs for per-row attention: each row's tokens, queries included."""
        if not self.per_row_attention:
            return {}
        return {row_attention.ROW_LENGTHS: lengths, row_attention.ROW_REPLAYED: replayed or [0] * len(lengths)}

    def set_next_tokens(self, tokens: list[int]) -> None:
        assert len(tokens) == self.num_rows
        self.next_tokens = tokens

    # --- removal and swapping --------------------------------------------------------------

    @torch.inference_mode()
    def remove(self, request_ids: list[str]) -> None:
        indices = [self.row_ids.index(r) for r in request_ids]
        moves = self.cache.remove_rows(indices)
        # Mirror the cache's swap-removes on the row state.
        for old, new in moves:
            self.row_ids[new] = self.row_ids[old]
            self.next_tokens[new] = self.next_tokens[old]
            self.positions[new] = self.positions[old]
        keep = self.cache.rows
        del self.row_ids[keep:], self.next_tokens[keep:], self.positions[keep:]

    @torch.inference_mode()
    def swap_out(self, request_id: str) -> SwappedRow:
        """Copy the row's K/V to host memory, then remove it from the batch."""
        row = self.row_of(request_id)
        swapped = SwappedRow(self.cache.extract_row(row).to("cpu"), self.next_tokens[row], self.positions[row])
        self.remove([request_id])
        return swapped

    @torch.inference_mode()
    def swap_in(self, request_id: str, swapped: SwappedRow) -> None:
        self.cache.insert_row(swapped.kv)
        self.row_ids.append(request_id)
        self.next_tokens.append(swapped.next_token)
        self.positions.append(swapped.position)

    @torch.inference_mode()
    def shrink_if_sparse(self, min_utilisation: float) -> bool:
        return self.cache.shrink_if_sparse(min_utilisation)

    def reset(self) -> None:
        """Drop every row, the cache buffers and every chunked prefill."""
        self.cache.release()
        self.row_ids, self.next_tokens, self.positions = [], [], []
        self.chunks.clear()
        self.prompts.clear()
        self.chunk_scores.clear()
