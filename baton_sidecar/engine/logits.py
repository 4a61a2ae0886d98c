"""Logits processors: penalties, biases, bans, ``min_tokens`` and grammar masks, as batch tensor ops.

Each request that uses any of them owns a ``RowLogits`` (its state); rows that use none have
None and are never touched. One step over the batch's ``logits [B, V]``::

    rows with a grammar   -> bitmask [g, W] from their matchers -> disallowed tokens -inf
    rows with additions   -> one index_put over (row, token, value) triples:
                             banned tokens (bad words, min_tokens' stop tokens) -inf, logit_bias
    repetition penalty    -> [r, V] over prompt + output tokens: / p where > 0, * p elsewhere
    presence / frequency  -> [f, V]: - frequency * count - presence * (count > 0), output tokens

That is vLLM's order (bans, min_tokens, logit_bias, then penalties; masks commute with the
rest). The state is updated incrementally with each sampled token (``advance``): a count
per token and a seen flag per token, never rebuilt from the token lists. It belongs to the
request, not to its row, so it survives preemption (swap or recompute) unchanged.
"""

from __future__ import annotations

import torch

from .grammar import GrammarCompiler, RowGrammar, apply_bitmask
from .request import SamplingParams


def bad_word_ids(tokenizer, words: tuple[str, ...]) -> list[tuple[int, ...]]:
    """vLLM's tokenization of ``bad_words``: each word alone, and after a space when that gives
    a different first token of the same length (the word in the middle of a text)."""
    sequences: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        sequences.append(bare)
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            sequences.append(spaced)
    return [s for s in sequences if s]


class RowLogits:
    """One request's processors and their state (owned by the engine thread)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], stop_ids: frozenset[int],
                 banned: list[tuple[int, ...]], vocab_size: int, device: torch.device,
                 grammar: RowGrammar | None = None) -> None:
        self.params = params
        self.grammar = grammar
        self.generated = 0
        self.output: list[int] = []  # for multi-token bad words' prefixes
        self.presence, self.frequency = params.presence_penalty, params.frequency_penalty
        self.repetition = params.repetition_penalty
        # [V] int32 counts of generated tokens; [V] bool: in prompt or output.
        self.counts = torch.zeros(vocab_size, dtype=torch.int32, device=device) \
            if self.presence or self.frequency else None
        self.seen = None
        if self.repetition != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(prompt_ids, device=device)] = True
        # Static additions: (token, value); a single-token bad word is a -inf addition.
        single = [s[0] for s in banned if len(s) == 1]
        ids = [t for t, _ in params.logit_bias] + single
        values = [b for _, b in params.logit_bias] + [float("-inf")] * len(single)
        self.static_ids = torch.tensor(ids, dtype=torch.long, device=device)
        self.static_values = torch.tensor(values, dtype=torch.float32, device=device)
        self.prefix_bans = [(s[:-1], s[-1]) for s in banned if len(s) > 1]
        self.min_tokens = params.min_tokens
        # A stop id past the logits (stop_token_ids may name any id) can never be sampled anyway.
        self.stop_ids = torch.tensor(sorted(t for t in stop_ids if t < vocab_size), dtype=torch.long, device=device)

    def advance(self, token_id: int) -> None:
        """The row sampled ``token_id``: O(1) tensor updates, no rebuild."""
        self.generated += 1
        if self.counts is not None:
            self.counts[token_id] += 1
        if self.seen is not None:
            self.seen[token_id] = True
        if self.prefix_bans:
            self.output.append(token_id)
        if self.grammar is not None:
            self.grammar.advance(token_id)

    def additions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(token ids [k], values [k])`` to add to this row's logits at this step."""
        ids, values = [self.static_ids], [self.static_values]
        if self.generated < self.min_tokens and len(self.stop_ids):
            ids.append(self.stop_ids)
            values.append(torch.full((len(self.stop_ids),), float("-inf"), device=self.stop_ids.device))
        # Multi-token bad words: ban the last token when the output ends with the rest (vLLM).
        hits = [last for prefix, last in self.prefix_bans
                if len(self.output) >= len(prefix) and tuple(self.output[-len(prefix):]) == prefix]
        if hits:
            ids.append(torch.tensor(hits, dtype=torch.long, device=self.stop_ids.device))
            values.append(torch.full((len(hits),), float("-inf"), device=self.stop_ids.device))
        if len(ids) == 1:
            return self.static_ids, self.static_values
        return torch.cat(ids), torch.cat(values)


def apply_processors(logits: torch.Tensor, rows: list[RowLogits | None],
                     compiler: GrammarCompiler | None = None) -> torch.Tensor:
    """``logits [B, V]`` float, processed in place for the rows that have processors."""
    used = [i for i, r in enumerate(rows) if r is not None]
    if not used:
        return logits
    with torch.inference_mode():  # the model's logits are inference tensors
        _apply(logits, rows, used, compiler)
    return logits


def _apply(logits: torch.Tensor, rows: list[RowLogits | None], used: list[int],
           compiler: GrammarCompiler | None) -> None:
    constrained = [i for i in used if rows[i].grammar is not None]
    if constrained:
        assert compiler is not None, "a constrained row needs the engine's grammar compiler"
        index = torch.tensor(constrained, device=logits.device)
        bitmask = compiler.fill_bitmasks([rows[i].grammar for i in constrained])  # [g, W]
        logits[index] = apply_bitmask(logits.index_select(0, index), bitmask)
    _add(logits, [(i, rows[i]) for i in used])
    repeated = [i for i in used if rows[i].seen is not None]
    if repeated:
        index = torch.tensor(repeated, device=logits.device)
        sub = logits.index_select(0, index)  # [r, V]
        seen = torch.stack([rows[i].seen for i in repeated])  # [r, V]
        penalty = torch.tensor([rows[i].repetition for i in repeated], device=logits.device)[:, None]
        logits[index] = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    counted = [i for i in used if rows[i].counts is not None]
    if counted:
        index = torch.tensor(counted, device=logits.device)
        counts = torch.stack([rows[i].counts for i in counted]).to(logits.dtype)  # [f, V]
        frequency = torch.tensor([rows[i].frequency for i in counted], device=logits.device)[:, None]
        presence = torch.tensor([rows[i].presence for i in counted], device=logits.device)[:, None]
        logits[index] = logits.index_select(0, index) - frequency * counts - presence * (counts > 0)


def _add(logits: torch.Tensor, rows: list[tuple[int, RowLogits]]) -> None:
    """Every row's additions in one ``index_put_`` (accumulating: a bias on a banned token
    stays -inf)."""
    row_index, token_index, values = [], [], []
    for i, row in rows:
        ids, vals = row.additions()
        if len(ids):
            row_index.append(torch.full_like(ids, i))
            token_index.append(ids)
            values.append(vals)
    if values:
        logits.index_put_((torch.cat(row_index), torch.cat(token_index)),
                          torch.cat(values).to(logits.dtype), accumulate=True)
