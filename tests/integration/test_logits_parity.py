"""With the real model: penalties, biases, bans and min_tokens match transformers' logits processors.

Each request runs in one re-batched batch with plain requests beside it; the reference is the
request alone through ``transformers`` ``generate`` with the equivalent processor
(``RepetitionPenaltyLogitsProcessor``, ``MinNewTokensLengthLogitsProcessor``,
``NoBadWordsLogitsProcessor``, ``SequenceBiasLogitsProcessor``), or for OpenAI's presence and
frequency penalties (transformers has none) a processor written from OpenAI's definition.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from baton_sidecar.config import EngineConfig, Limits, PolicyConfig, PreemptionPolicy
from baton_sidecar.engine import AsyncEngine, SamplingParams
from parity import assert_same_greedy, solo_generate

pytestmark = pytest.mark.model

PROMPTS = [
    "List the days of the week, separated by commas.",
    "Write a short poem about the sea and the sea and the sea.",
    "Hi",
    "Explain what a binary search does.",
    "Repeat the word banana five times.",
    "What is the capital of France?",
]


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence/frequency penalties over the generated tokens (not the prompt)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros_like(scores)
        generated = input_ids[:, self.prompt_len:]
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0)


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def reference(loaded, prompt: list[int], max_new: int, **kwargs) -> list[int]:
    """The request alone through ``generate`` with ``kwargs`` (processors, min_new_tokens...)."""
    penalties = kwargs.pop("openai", None)
    if penalties:
        kwargs["logits_processor"] = LogitsProcessorList([OpenAIPenalties(len(prompt), *penalties)])
    input_ids = torch.tensor([prompt], device=loaded.device)
    with torch.inference_mode():
        out = loaded.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                    max_new_tokens=max_new, **kwargs)
    tokens = out[0, len(prompt):].tolist()
    eos = loaded.eos_token_ids
    return tokens[:next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))]


@pytest.fixture(scope="module")
def prompts(real_model):
    return [chat_ids(real_model.tokenizer, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def cases(real_model, prompts):
    """(prompt, SamplingParams, transformers kwargs): each processor, and all at once."""
    tok = real_model.tokenizer
    plain = solo_generate(real_model, prompts[0], 24)
    # Ban a word the plain answer uses, alone and as a two-token sequence, and bias another.
    banned_single, banned_pair = plain[3], tuple(plain[5:7])
    biased = tok.encode(" Monday", add_special_tokens=False)[0]
    short = solo_generate(real_model, prompts[2], 40)
    assert len(short) < 30, "the min_tokens case needs a prompt the model answers briefly"
    greedy = dict(temperature=0, max_tokens=28)
    return [
        (prompts[1], SamplingParams(repetition_penalty=1.3, **greedy), dict(repetition_penalty=1.3)),
        (prompts[4], SamplingParams(repetition_penalty=0.8, **greedy), dict(repetition_penalty=0.8)),
        (prompts[2], SamplingParams(min_tokens=len(short) + 4, temperature=0, max_tokens=40),
         dict(min_new_tokens=len(short) + 4)),
        (prompts[0], SamplingParams(bad_words_ids=((banned_single,), banned_pair), **greedy),
         dict(bad_words_ids=[[banned_single], list(banned_pair)])),
        (prompts[0], SamplingParams(logit_bias={biased: 8.0, plain[2]: -100}, **greedy),
         dict(sequence_bias={(biased,): 8.0, (plain[2],): -100.0})),
        (prompts[1], SamplingParams(presence_penalty=1.5, frequency_penalty=0.5, **greedy),
         dict(openai=(1.5, 0.5))),
        (prompts[4], SamplingParams(frequency_penalty=-0.7, **greedy), dict(openai=(0.0, -0.7))),
        (prompts[3], SamplingParams(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3,
                                    logit_bias={biased: 3.0}, bad_words_ids=((banned_single,),),
                                    min_tokens=10, **greedy),
         dict(repetition_penalty=1.2, openai=(0.5, 0.3), sequence_bias={(biased,): 3.0},
              bad_words_ids=[[banned_single]], min_new_tokens=10)),
    ]


@pytest.fixture(scope="module")
def references(real_model, cases):
    return [reference(real_model, p, params.max_tokens, **kw) for p, params, kw in cases]


async def test_processed_and_plain_rows_in_one_batch_match_transformers(real_model, prompts, cases,
                                                                        references):
    plain_refs = [solo_generate(real_model, p, 20) for p in prompts]
    engine = AsyncEngine(real_model, EngineConfig(), PolicyConfig())
    await engine.start()
    try:
        async def staggered(i, prompt, params):
            await asyncio.sleep(0.05 * i)
            return await engine.generate(prompt, params)
        jobs = [staggered(i, p, params) for i, (p, params, _) in enumerate(cases)]
        jobs += [staggered(i, p, SamplingParams(temperature=0, max_tokens=20)) for i, p in enumerate(prompts)]
        outs = await asyncio.gather(*jobs)
    finally:
        await engine.shutdown(drain_timeout_s=5)
    for (prompt, params, kw), out, want in zip(cases, outs, references):
        assert list(out.token_ids) == want, (kw, out.token_ids, want)
    for prompt, out, want in zip(prompts, outs[len(cases):], plain_refs):
        assert_same_greedy(real_model, prompt, list(out.token_ids), want)
    # The processors really changed something: no case equals the plain answer to its prompt.
    changed = [want != solo_generate(real_model, p, len(want)) for (p, _, _), want in zip(cases, references)]
    assert sum(changed) >= len(cases) - 1, changed


@pytest.mark.parametrize("mode", ["swap", "recompute"])
async def test_preempted_penalised_rows_resume_with_identical_output(real_model, cases, references, mode):
    """Penalised rows of low priority are split off by waves of urgent ones, many times."""
    policy = PolicyConfig(limits=Limits(max_batch_size=3),
                          preemption=PreemptionPolicy(mode=mode, max_preemptions_per_request=8))
    engine = AsyncEngine(real_model, EngineConfig(), policy)
    await engine.start()
    low_cases = [cases[0], cases[5], cases[7]]
    try:
        low = [asyncio.ensure_future(engine.generate(p, params, priority=10)) for p, params, _ in low_cases]
        for p, _, _ in cases[:4]:
            await asyncio.sleep(0.3)
            await engine.generate(p, SamplingParams(max_tokens=3, temperature=0), priority=0)
        outs = await asyncio.gather(*low)
    finally:
        await engine.shutdown(drain_timeout_s=5)
    assert sum(out.num_preemptions for out in outs) >= 2
    for case, out in zip(low_cases, outs):
        assert list(out.token_ids) == references[cases.index(case)]
