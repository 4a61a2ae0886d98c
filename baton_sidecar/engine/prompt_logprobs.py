"""Prompt logprobs (``echo`` with ``logprobs``), scored by the request's own prefill forward.

A prefill keeps only each row's last logits (``logits_to_keep=1``), so rows that did not ask
pay nothing. For a prefill with rows that asked, a forward hook captures the decoder's final
hidden states ``[n, P, H]`` during that same forward; here the output head projects the asking
rows' prompt positions only, ``SLICE`` positions at a time, so no second forward runs and at
most ``[SLICE, V]`` logits exist at once.

Position j's logits score prompt token j + 1. A prompt of P tokens gets P - 1 scores: its first
token has none (nothing precedes it; OpenAI and vLLM answer ``null`` for it), and the last
position's logits are the first generated token's distribution (prefill's ``last_logits``). A
chunked prefill scores each chunk's positions against the next tokens of the prompt, the last
position of a chunk against the first token of the next one.

This is exact only where the model's logits are its output head applied to the decoder's last
hidden state, with nothing after it (Gemma 2's soft-capping, Cohere's logit scale are after it):
``head_is_plain`` checks that once per model with a 2-token forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from .request import TokenLogprob

SLICE = 256  # prompt positions projected through the head at once: [SLICE, V] float32 logits


@dataclass
class PromptScores:
    """Logprobs of T prompt tokens, each with its top-k alternatives (from log-softmax of raw logits)."""

    token_ids: list[int]  # [T] the tokens scored
    logprobs: torch.Tensor  # [T]
    top_ids: torch.Tensor  # [T, k]
    top_logprobs: torch.Tensor  # [T, k]

    @staticmethod
    def cat(parts: list[PromptScores]) -> PromptScores:
        """The scores of consecutive chunks, as one."""
        return PromptScores([t for p in parts for t in p.token_ids], torch.cat([p.logprobs for p in parts]),
                            torch.cat([p.top_ids for p in parts]), torch.cat([p.top_logprobs for p in parts]))

    def token_logprobs(self) -> tuple[TokenLogprob, ...]:
        chosen, top_ids, top_values = self.logprobs.tolist(), self.top_ids.tolist(), self.top_logprobs.tolist()
        return tuple(TokenLogprob(t, lp, tuple(zip(ids, values)))
                     for t, lp, ids, values in zip(self.token_ids, chosen, top_ids, top_values))


@contextlib.contextmanager
def capture_hidden(model: torch.nn.Module, enabled: bool = True) -> Iterator[list[torch.Tensor]]:
    """While open, a forward of ``model`` appends its decoder's last hidden state ``[n, P, H]``
    to the yielded list. Disabled, no hook is registered (plain prefills stay untouched)."""
    captured: list[torch.Tensor] = []
    if not enabled:
        yield captured
        return

    def hook(module, args, output) -> None:
        captured.append(output[0])  # last_hidden_state (a ModelOutput or a tuple)

    handle = model.get_decoder().register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@torch.inference_mode()
def score(model: torch.nn.Module, hidden: torch.Tensor, targets: list[int], k: int) -> PromptScores:
    """``hidden [T', H]`` (T' >= T = len(targets)): position j scores ``targets[j]``."""
    head = model.get_output_embeddings()
    device = hidden.device
    chosen, top_ids, top_values = [], [], []
    for lo in range(0, len(targets), SLICE):
        ids = torch.tensor(targets[lo: lo + SLICE], device=device)
        log_probs = torch.log_softmax(head(hidden[lo: lo + len(ids)]).float(), dim=-1)  # [s, V]
        chosen.append(log_probs.gather(1, ids[:, None])[:, 0])
        values, indices = log_probs.topk(k, dim=-1)
        top_values.append(values)
        top_ids.append(indices)
    if not chosen:  # a one-token prompt has nothing to score
        empty = torch.empty(0, k, device=device)
        return PromptScores([], empty[:, 0], empty.long(), empty)
    return PromptScores(list(targets), torch.cat(chosen), torch.cat(top_ids), torch.cat(top_values))


@torch.inference_mode()
def head_is_plain(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether the model's logits are exactly its output head over its decoder's last hidden state."""
    if model.get_output_embeddings() is None:
        return False
    input_ids = torch.tensor([[0, 1]], device=device)
    with capture_hidden(model) as hidden:
        logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=2).logits  # [1, 2, V]
    if len(hidden) != 1:
        return False
    mine = model.get_output_embeddings()(hidden[0])
    return mine.shape == logits.shape and torch.allclose(mine.float(), logits.float(), rtol=1e-4, atol=1e-4)
