"""Every family users bring: greedy output equals the request alone through transformers.

Tiny random models of each family (``tests/archs.py``) are saved and loaded as a user's
``--model DIR`` is. Staggered requests of mixed priorities then run under four policies:
plain re-batching, chunked prefill, and swap and recompute preemption. Each family's
attention features are covered: sliding windows that bind (prompts are longer than the
window), Gemma's alternating layers and soft-capping, absolute position embeddings (GPT-2,
OPT), partial rotary and parallel attention (GPT-NeoX), QK-norm (Qwen3), mixtures of experts
(Qwen2-MoE, Mixtral, gpt-oss with its attention sinks), Cohere 2's global layers without rotary.
"""

from __future__ import annotations

import asyncio

import pytest

from archs import FAMILIES, WINDOW, save_family
from baton_sidecar import row_attention
from baton_sidecar.config import EngineConfig, Limits, PolicyConfig, PreemptionPolicy
from baton_sidecar.engine import AsyncEngine, SamplingParams
from baton_sidecar.model import load_model
from parity import assert_same_greedy, solo_generate
from tiny import random_prompts

MAX_TOKENS = 20
POLICIES = {
    "rebatch": PolicyConfig(),
    "chunked": PolicyConfig(limits=Limits(max_prefill_tokens=16)),
    "swap": PolicyConfig(limits=Limits(max_batch_size=2), preemption=PreemptionPolicy(mode="swap")),
    "recompute": PolicyConfig(limits=Limits(max_batch_size=2), preemption=PreemptionPolicy(mode="recompute")),
}
# Families whose prompts cannot ride in the decode forward (see row_attention.pack_refusal).
UNPACKED = {"gemma2": "attention logit soft-capping", "gpt-oss": "eager attention (the model does not run on sdpa)"}


async def run_staggered(loaded, prompts, policy):
    """Greedy requests arriving 20 ms apart; returns their tokens, their preemption counts and
    the steps' chunk sizes. The first two are the least urgent and the rest arrive once both
    run, so with a batch of two every later arrival preempts (whatever the machine's speed)."""
    engine = AsyncEngine(loaded, EngineConfig(), policy)
    chunks = []
    engine.observe_steps(lambda record: chunks.extend(record.chunk_sizes))
    await engine.start()
    both_running = asyncio.Event()

    async def one(index, prompt):
        if index >= 2:
            await both_running.wait()
            await asyncio.sleep((index - 2) * 0.02)
        tokens, final = [], None
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        async for final in engine.submit(prompt, params, priority=2 if index < 2 else index % 2):
            tokens.extend(final.token_ids)  # each output carries the new tokens only
            if index < 2 and engine.stats().batch_size >= 2:
                both_running.set()
        both_running.set()  # (a first request that ends before the other joins releases the rest)
        return tokens, final.num_preemptions

    try:
        finals = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
    finally:
        await engine.shutdown(drain_timeout_s=5)
    return [tokens for tokens, _ in finals], [count for _, count in finals], chunks


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    directory = save_family(request.param, tmp_path_factory.mktemp(request.param) / request.param)
    loaded = load_model(EngineConfig(model=str(directory)), progress=False)
    prompts = random_prompts(6, WINDOW + 4, 40, seed=1)
    references = [solo_generate(loaded, p, MAX_TOKENS, ignore_eos=True) for p in prompts]
    return request.param, loaded, prompts, references


@pytest.mark.parametrize("policy", sorted(POLICIES))
async def test_family_matches_transformers_alone(family, policy):
    name, loaded, prompts, references = family
    outputs, preemptions, chunks = await run_staggered(loaded, prompts, POLICIES[policy])
    for prompt, got, want in zip(prompts, outputs, references):
        assert_same_greedy(loaded, prompt, got, want)
    if policy in ("swap", "recompute"):
        assert sum(preemptions) > 0, "the policy must really preempt"
    if policy == "chunked":
        assert chunks and max(chunks) <= 16 < max(len(p) for p in prompts), "prompts must really be chunked"


def test_each_family_attends_through_batons_masks(family):
    name, loaded, _, _ = family
    assert row_attention.installed(loaded.model)
    assert row_attention.pack_refusal(loaded.model.config) == UNPACKED.get(name)


async def test_absolute_positions_never_run_past_the_embedding_table(tmp_path):
    """GPT-2's learned positions end at ``n_positions``: a request past them is refused (400), not run."""
    from baton_sidecar.engine.request import RequestValidationError

    loaded = load_model(EngineConfig(model=str(save_family("gpt2", tmp_path / "gpt2"))), progress=False)
    assert loaded.max_model_len == loaded.model.config.n_positions
    engine = AsyncEngine(loaded, EngineConfig(), PolicyConfig())
    await engine.start()
    try:
        with pytest.raises(RequestValidationError, match="max_tokens"):
            await engine.generate([2] * (loaded.max_model_len - 10), SamplingParams(max_tokens=11))
        out = await engine.generate([2] * (loaded.max_model_len - 10), SamplingParams(max_tokens=10, ignore_eos=True))
        assert len(out.token_ids) == 10  # up to the table's last position
    finally:
        await engine.shutdown(drain_timeout_s=5)
