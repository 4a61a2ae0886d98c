"""With the real model: ``n`` / ``best_of`` choices forked from one prefill, and prompt logprobs.

Choices: one prefill whatever ``n``; seeded choices reproducible whatever else is batched;
greedy choices identical; preemption keeps every choice as it would have been. Prompt logprobs
(``echo`` with ``logprobs``): equal to a plain transformers forward, whole or chunked.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import torch

from baton_sidecar.config import EngineConfig, Limits, PolicyConfig, PreemptionPolicy
from baton_sidecar.engine import AsyncEngine, SamplingParams, StructuredOutput

pytestmark = pytest.mark.model

PROMPT = "Once upon a time, in a small village by the sea,"


async def started(real_model, policy: PolicyConfig | None = None) -> AsyncEngine:
    engine = AsyncEngine(real_model, EngineConfig(), policy or PolicyConfig())
    await engine.start()
    return engine


async def test_n_choices_share_one_prefill_and_seeds_make_them_reproducible(real_model):
    engine = await started(real_model)
    try:
        params = SamplingParams(n=3, temperature=0.9, seed=11, max_tokens=12)
        alone = await engine.generate_choices(PROMPT, params)
        # Choice 0 of a seeded n > 1 request is the same request with n = 1.
        single = await engine.generate(PROMPT, SamplingParams(temperature=0.9, seed=11, max_tokens=12))
        prefills = []  # prompts whose prefill starts, per forward
        real_prefill, real_packed = engine.core.runner.prefill, engine.core.runner.run_packed

        def spy(ids, tokens, *args):
            prefills.append(len(ids))
            return real_prefill(ids, tokens, *args)

        def spy_packed(parts, decode):
            prefills.append(sum(1 for part in parts if part.start == 0))
            return real_packed(parts, decode)
        engine.core.runner.prefill, engine.core.runner.run_packed = spy, spy_packed
        others = [engine.generate(f"{i} plus {i} is", SamplingParams(temperature=1.0, max_tokens=10))
                  for i in range(4)]
        busy, *_ = await asyncio.gather(engine.generate_choices(PROMPT, params), *others)
    finally:
        await engine.shutdown(drain_timeout_s=5)
    assert [c.index for c in alone] == [0, 1, 2]
    assert [c.token_ids for c in busy] == [c.token_ids for c in alone]  # whatever else is batched
    assert alone[0].token_ids == single.token_ids
    assert len({c.token_ids for c in alone}) > 1, "seeded choices should differ from one another"
    assert sum(prefills) == 5, prefills  # the n = 3 request's prompt once, and the four others
    assert all(c.prompt_tokens == alone[0].prompt_tokens for c in alone)


async def test_greedy_choices_are_identical_and_structured_choices_each_validate(real_model):
    schema = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 12}},
              "required": ["word"], "additionalProperties": False}
    engine = await started(real_model)
    try:
        greedy = await engine.generate_choices(PROMPT, SamplingParams(n=2, temperature=0, max_tokens=10))
        structured = StructuredOutput("json", json.dumps(schema))
        await engine.compile_grammar(structured)
        shaped = await engine.generate_choices("Give a word as JSON:", SamplingParams(
            n=3, temperature=1.0, seed=3, max_tokens=40, structured=structured))
    finally:
        await engine.shutdown(drain_timeout_s=5)
    assert greedy[0].token_ids == greedy[1].token_ids and len(greedy[0].token_ids) == 10
    for choice in shaped:
        jsonschema.validate(json.loads(choice.text), schema)


async def test_best_of_returns_the_n_most_likely(real_model):
    engine = await started(real_model)
    try:
        params = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=8, logprobs=0)
        every = await engine.generate_choices(PROMPT, params)
        best = await engine.generate_choices(PROMPT, SamplingParams(n=2, best_of=4, temperature=1.0, seed=5,
                                                                    max_tokens=8))
    finally:
        await engine.shutdown(drain_timeout_s=5)
    scored = sorted(every, key=lambda c: -sum(lp.logprob for lp in c.logprobs))
    assert [c.token_ids for c in best] == [c.token_ids for c in scored[:2]]
    assert [c.index for c in best] == [0, 1]


@pytest.mark.parametrize("mode", ["swap", "recompute"])
async def test_preempted_choices_resume_as_if_never_preempted(real_model, mode):
    params = SamplingParams(n=3, temperature=0.8, seed=21, max_tokens=30)
    quiet = await started(real_model)
    try:
        want = await quiet.generate_choices(PROMPT, params)
    finally:
        await quiet.shutdown(drain_timeout_s=5)
    policy = PolicyConfig(limits=Limits(max_batch_size=4),
                          preemption=PreemptionPolicy(mode=mode, max_preemptions_per_request=8))
    engine = await started(real_model, policy)
    try:
        low = asyncio.ensure_future(engine.generate_choices(PROMPT, params, priority=10))
        for i in range(4):
            await asyncio.sleep(0.3)
            await engine.generate_choices(f"Say {i}", SamplingParams(n=2, max_tokens=3, temperature=0), priority=0)
        got = await low
    finally:
        await engine.shutdown(drain_timeout_s=5)
    assert sum(c.num_preemptions for c in got) >= 2
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def reference_prompt_logprobs(real_model, ids: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprob of every prompt token after the first, and the top-k ids, from one plain forward."""
    with torch.inference_mode():
        logits = real_model.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    return log_probs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], log_probs.topk(k, dim=-1).indices


@pytest.mark.parametrize("chunked", [False, True])
async def test_prompt_logprobs_equal_a_plain_forward(real_model, chunked):
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    ids = real_model.tokenizer.encode(text)
    policy = PolicyConfig(limits=Limits(max_prefill_tokens=48)) if chunked else PolicyConfig()
    engine = await started(real_model, policy)
    try:
        beside = engine.generate("Hello", SamplingParams(max_tokens=20, temperature=0))
        scored, _ = await asyncio.gather(
            engine.generate(ids, SamplingParams(max_tokens=0, prompt_logprobs=3)), beside)
        with_tokens = await engine.generate(ids, SamplingParams(max_tokens=2, prompt_logprobs=1, temperature=0))
    finally:
        await engine.shutdown(drain_timeout_s=5)
    want, top = reference_prompt_logprobs(real_model, ids, 3)
    assert len(ids) > 48 and scored.prompt_token_ids == tuple(ids)
    got = torch.tensor([lp.logprob for lp in scored.prompt_logprobs])
    assert [lp.token_id for lp in scored.prompt_logprobs] == ids[1:]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert [[t for t, _ in lp.top] for lp in scored.prompt_logprobs] == top.tolist()
    assert scored.completion_tokens == 0 and scored.token_ids == ()
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in with_tokens.prompt_logprobs]), want,
                               atol=1e-4, rtol=0)
    assert with_tokens.completion_tokens == 2
