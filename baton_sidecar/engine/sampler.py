"""Turn a batch of logits into tokens, each row with its own sampling parameters.

Rows with logits processors (penalties, biases, bans, grammar masks: ``logits.py``) are
processed first, as batch ops over those rows only. Greedy rows then take the argmax.
Sampled rows apply temperature, top-k and top-p as tensor ops over the whole batch, then
draw by inverse-CDF from one uniform number per row. Each seeded request owns a
``torch.Generator``, so its draws do not depend on its neighbours. Logprobs are those of
the raw logits, before any processor (vLLM's default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grammar import GrammarCompiler
from .logits import RowLogits, apply_processors
from .request import SamplingParams, TokenLogprob


@dataclass
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None = None


class RowSampler:
    """Per-choice sampling state: its parameters, its random generator, its processors.

    With a seed, choice ``index`` draws from ``seed + index`` (as vLLM's parallel sampling):
    each choice is reproducible whatever else is batched, and choice 0 is the same request
    with ``n`` = 1. ``logprobs``: alternatives to report per token (None: no logprob at all);
    ranked choices (best_of) need the chosen token's logprob even when none is reported.
    """

    def __init__(self, params: SamplingParams, device: torch.device,
                 processors: RowLogits | None = None, index: int = 0) -> None:
        self.params = params
        self.processors = processors  # None: the row pays nothing for processors
        self.logprobs = params.logprobs if params.logprobs is not None or not params.ranks_choices else 0
        # Uniform draws come from a CPU generator: reproducible across devices and cheap.
        self.generator = torch.Generator(device="cpu")
        if params.seed is not None:
            self.generator.manual_seed(params.seed + index)  # < 2**64, manual_seed's range
        else:
            self.generator.seed()

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def advance(self, token_id: int) -> None:
        """The request took ``token_id``: its processors' state follows."""
        if self.processors is not None:
            self.processors.advance(token_id)


def sample(logits: torch.Tensor, samplers: list[RowSampler],
           grammars: GrammarCompiler | None = None) -> list[SampledToken]:
    """``logits [n, V]`` (float; changed in place where processors apply) -> one token per row."""
    n = logits.shape[0]
    logits = logits.float()
    logprob_rows = [i for i, s in enumerate(samplers) if s.logprobs is not None]
    raw = logits.index_select(0, torch.tensor(logprob_rows, device=logits.device)) if logprob_rows else None
    logits = apply_processors(logits, [s.processors for s in samplers], grammars)
    chosen = torch.argmax(logits, dim=-1)  # [n]; greedy rows keep it
    sampled_rows = [i for i, s in enumerate(samplers) if not s.params.greedy]
    if sampled_rows:
        index = torch.tensor(sampled_rows, device=logits.device)
        rows = logits.index_select(0, index)  # [m, V]
        params = [samplers[i].params for i in sampled_rows]
        temps = torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
        probs = _filtered_probs(rows / temps, params)
        uniforms = torch.tensor([samplers[i].uniform() for i in sampled_rows],
                                device=logits.device, dtype=probs.dtype)[:, None]
        cdf = probs.cumsum(dim=-1)
        # Clamp: float error can leave cdf[-1] a hair below the draw.
        drawn = torch.searchsorted(cdf, uniforms * cdf[:, -1:]).clamp_max(probs.shape[-1] - 1)
        chosen[index] = drawn[:, 0]

    token_ids = chosen.tolist()
    logprobs: dict[int, TokenLogprob] = {}
    if logprob_rows:
        index = torch.tensor(logprob_rows, device=logits.device)
        log_probs = torch.log_softmax(raw, dim=-1)  # [m, V]
        top_n = max(samplers[i].logprobs for i in logprob_rows)
        top_values, top_ids = log_probs.topk(max(top_n, 1), dim=-1)
        picked = log_probs.gather(1, chosen.index_select(0, index)[:, None])[:, 0].tolist()
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        for j, i in enumerate(logprob_rows):
            k = samplers[i].logprobs
            logprobs[i] = TokenLogprob(token_ids[i], picked[j],
                                       tuple(zip(top_ids[j][:k], top_values[j][:k])))
    return [SampledToken(token_ids[i], logprobs.get(i)) for i in range(n)]


def _filtered_probs(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Softmax of ``scaled [m, V]`` after per-row top-k and top-p filtering. Only the rows that
    filter anything pay for sorting the vocabulary; the others are softmaxed as they are."""
    vocab = scaled.shape[-1]
    filtering = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1]
    if filtering:
        index = torch.tensor(filtering, device=scaled.device)
        kept = _top_k_top_p(scaled.index_select(0, index), [params[i] for i in filtering])
        scaled = scaled.index_copy(0, index, kept)
    return torch.softmax(scaled, dim=-1)


def _top_k_top_p(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """``scaled [f, V]`` with the tokens beyond each row's top-k and top-p set to -inf."""
    vocab = scaled.shape[-1]
    top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=scaled.device)
    top_p = torch.tensor([p.top_p for p in params], device=scaled.device, dtype=scaled.dtype)
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=scaled.device)[None, :]
    drop = ranks >= top_k[:, None]  # beyond top-k
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False  # even a top_p that underflows to 0 keeps the most likely token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(1, sorted_ids, sorted_logits)
