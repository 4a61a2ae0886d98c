"""int8 weights and activations: the re-batching engine is token-exact against ``generate``.

The reference is the same int8 model run alone through transformers. No tie rule here: with
per-row attention (``row_attention.py``) a row's logits are bit-identical to the row alone,
so any difference at all is a bug.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from baton_sidecar import row_attention
from baton_sidecar.config import EngineConfig, Limits, PolicyConfig, PreemptionPolicy, PrefillPolicy
from baton_sidecar.engine import AsyncEngine, SamplingParams
from parity import INSTRUCTIONS, chat_ids, collect, run_staggered, solo_generate, wait_for

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def workload(int8_model):
    rng = random.Random(11)
    return [(chat_ids(int8_model.tokenizer, text), rng.randint(8, 40)) for text in INSTRUCTIONS]


@pytest.fixture(scope="module")
def references(int8_model, workload):
    return [solo_generate(int8_model, p, n) for p, n in workload]


def test_int8_model_runs_per_row_attention(int8_model):
    assert row_attention.rows_attend_alone(int8_model.model)


@pytest.mark.parametrize("gap_s", [0.0, 0.15])
async def test_staggered_int8_requests_match_generate_exactly(int8_model, workload, references, gap_s):
    """gap 0: newcomers are prefilled together (left-padded); 0.15 s: they join a running batch."""
    engine = AsyncEngine(int8_model, EngineConfig(quantization="int8"), PolicyConfig())
    steps = []  # the plans' prompt work, for a failure's message (plans follow measured step times)
    engine.observe_steps(lambda r: steps.append((r.chunk_sizes, r.chunk_reasons, r.prefill_tokens,
                                                 r.decode_rows, r.fused)) if r.chunk_sizes or r.prefill_tokens else None)
    await engine.start()
    try:
        outputs = await run_staggered(engine, [(p, n, 0) for p, n in workload], gap_s=gap_s)
    finally:
        await engine.shutdown(drain_timeout_s=5)
    for (prompt, _), out, want in zip(workload, outputs, references):
        assert list(out.token_ids) == want, f"prompt of {len(prompt)} tokens; prompt steps: {steps}"
    assert engine.stats().steps > 20


async def test_prompt_chunked_before_its_short_last_block_matches_generate(int8_model, workload):
    """The staggered case made deterministic: 35 prompt tokens, chunks of 19 and 16. Queries
    32-34 are a 3-row query block in ``generate``'s one call but sat inside a 16-row one here,
    and greedy output diverged at token 31 (``packed.query_pieces``)."""
    prompt, max_tokens = workload[15]
    policy = PolicyConfig(limits=Limits(max_prefill_tokens=24), prefill=PrefillPolicy(budget="tokens"))
    engine = AsyncEngine(int8_model, EngineConfig(quantization="int8"), policy)
    chunks = []
    engine.observe_steps(lambda r: chunks.append(r.chunk_sizes) if r.chunk_sizes else None)
    await engine.start()
    try:
        out = await engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0))
    finally:
        await engine.shutdown(drain_timeout_s=5)
    assert len(prompt) == 35 and chunks == [(19,), (16,)], f"not the planned case: chunks {chunks}"
    assert list(out.token_ids) == solo_generate(int8_model, prompt, max_tokens)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
async def test_preempted_int8_requests_resume_exactly(int8_model, workload, mode):
    """Waves of urgent requests preempt the low-priority rows; every output equals ``generate``'s."""
    policy = PolicyConfig(limits=Limits(max_batch_size=3),
                          preemption=PreemptionPolicy(mode=mode, max_preemptions_per_request=8))
    engine = AsyncEngine(int8_model, EngineConfig(quantization="int8"), policy)
    await engine.start()
    try:
        low_params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
        low = [asyncio.ensure_future(collect(engine.submit(p, low_params, priority=10))) for p, _ in workload[:3]]
        urgent = []
        for p, _ in workload[3:7]:
            await wait_for(lambda: engine.stats().batch_size == 3 and
                           engine.stats().swapped + engine.stats().waiting == 0)
            urgent.append(await engine.generate(p, SamplingParams(max_tokens=4, temperature=0), priority=0))
        low = await asyncio.gather(*low)
    finally:
        await engine.shutdown(drain_timeout_s=5)
    assert sum(preemptions for _, preemptions, _ in low) >= len(urgent)
    for (p, _), (tokens, _, _) in zip(workload[:3], low):
        assert tokens == solo_generate(int8_model, p, 48, ignore_eos=True)
    for (p, _), out in zip(workload[3:7], urgent):
        assert list(out.token_ids) == solo_generate(int8_model, p, 4)
