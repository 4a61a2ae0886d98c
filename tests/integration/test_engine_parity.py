"""With the real embedded model: re-batching never changes a request's greedy tokens."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from baton_sidecar.config import EngineConfig, Limits, PolicyConfig, PreemptionPolicy
from baton_sidecar.engine import AsyncEngine, SamplingParams
from parity import INSTRUCTIONS, assert_same_greedy, chat_ids, collect, run_staggered, solo_generate, wait_for

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def workload(real_model):
    rng = random.Random(7)
    prompts = [chat_ids(real_model.tokenizer, text) for text in INSTRUCTIONS]
    lengths = sorted(len(p) for p in prompts)
    assert lengths[-1] - lengths[0] >= 15, "prompts must differ in length to exercise shaping"
    return [(p, rng.randint(6, 40)) for p in prompts]


@pytest.fixture(scope="module")
def references(real_model, workload):
    return [solo_generate(real_model, p, n) for p, n in workload]


@pytest.mark.parametrize("batching", ["rebatch", "run_to_completion"])
async def test_staggered_requests_match_transformers_alone(real_model, workload, references, batching):
    engine = AsyncEngine(real_model, EngineConfig(batching=batching), PolicyConfig())
    await engine.start()
    try:
        outputs = await run_staggered(engine, [(p, n, 0) for p, n in workload])
        for (prompt, _), out, want in zip(workload, outputs, references):
            assert_same_greedy(real_model, prompt, list(out.token_ids), want)
        assert engine.stats().steps > 20
    finally:
        await engine.shutdown(drain_timeout_s=5)
    stats = engine.stats()
    assert stats.batch_size == 0 and stats.kv_bytes_allocated == 0


@pytest.mark.parametrize("mode", ["swap", "recompute"])
async def test_preempted_requests_resume_with_identical_output(real_model, workload, references, mode):
    """Low-priority rows are preempted several times by waves of short urgent requests.

    Victims are the least urgent, latest arrivals, so the last low-priority request is
    split off by every wave and resumes in between.
    """
    policy = PolicyConfig(limits=Limits(max_batch_size=3),
                          preemption=PreemptionPolicy(mode=mode, max_preemptions_per_request=8))
    engine = AsyncEngine(real_model, EngineConfig(), policy)
    await engine.start()
    try:
        low_params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
        low = [engine.submit(p, low_params, priority=10) for p, _ in workload[:3]]
        low_outputs = [asyncio.ensure_future(collect(s)) for s in low]
        urgent_outputs = []
        for p, _ in workload[3:8]:
            # Each wave arrives when all three low rows are back in the batch.
            await wait_for(lambda: engine.stats().batch_size == 3 and
                           engine.stats().swapped + engine.stats().waiting == 0)
            urgent_outputs.append(
                await engine.generate(p, SamplingParams(max_tokens=4, temperature=0), priority=0))
        low_outputs = await asyncio.gather(*low_outputs)
    finally:
        await engine.shutdown(drain_timeout_s=5)
    low_refs = [solo_generate(real_model, p, 60, ignore_eos=True) for p, _ in workload[:3]]
    for (p, _), out, want in zip(workload[:3], low_outputs, low_refs):
        assert_same_greedy(real_model, p, out[0], want)
    for (p, _), out, want in zip(workload[3:8], urgent_outputs, references[3:8]):
        assert_same_greedy(real_model, p, list(out.token_ids), want[:4])
    waves = len(urgent_outputs)
    preemptions = [out[1] for out in low_outputs]
    # Each wave finds all three low rows in a full batch and needs one row: the victim is the
    # least urgent, latest arrival, every time. The others may only ever be bounded.
    assert preemptions[2] == waves, preemptions
    assert all(0 <= n <= policy.preemption.max_preemptions_per_request for n in preemptions[:2]), preemptions
    for _, n, events in low_outputs:  # every preemption was followed by a resume
        assert events.count("preempted") == events.count("resumed") == n
    stats = engine.stats()
    assert stats.preemptions_total == sum(preemptions)
    assert stats.kv_bytes_allocated == 0 and stats.swapped_bytes == 0


async def test_urgent_request_gets_its_first_token_within_a_few_steps(real_model, workload):
    policy = PolicyConfig(limits=Limits(max_batch_size=4))
    engine = AsyncEngine(real_model, EngineConfig(), policy)
    await engine.start()
    try:
        background = [engine.submit(p, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True), priority=10)
                      for p, _ in workload[:6]]
        await wait_for(lambda: engine.stats().batch_size == 4)
        submitted_at = engine.stats().steps
        stream = engine.submit(workload[8][0], SamplingParams(max_tokens=4, temperature=0), priority=0)
        first = await stream.__anext__()
        steps_to_first_token = engine.stats().steps - submitted_at
        assert first.token_ids
        assert steps_to_first_token <= 3, steps_to_first_token
        for s in background:
            s.cancel()
        async for _ in stream:
            pass
    finally:
        await engine.shutdown(drain_timeout_s=5)
    assert engine.stats().kv_bytes_allocated == 0


async def test_chunked_prefill_matches_transformers(real_model, workload):
    policy = PolicyConfig(limits=Limits(max_prefill_tokens=8))
    engine = AsyncEngine(real_model, EngineConfig(), policy)
    await engine.start()
    try:
        outputs = await run_staggered(engine, [(p, 12, 0) for p, _ in workload[6:9]], gap_s=0.05)
    finally:
        await engine.shutdown(drain_timeout_s=5)
    for (p, _), out in zip(workload[6:9], outputs):
        assert len(p) > 8
        assert_same_greedy(real_model, p, list(out.token_ids), solo_generate(real_model, p, 12))


async def test_seeded_sampling_is_the_same_alone_and_in_a_crowd(real_model, workload):
    engine = AsyncEngine(real_model, EngineConfig(), PolicyConfig())
    await engine.start()
    try:
        params = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=2024, ignore_eos=True)
        alone = await engine.generate(workload[1][0], params)
        crowd = [engine.submit(p, SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True))
                 for p, _ in workload[2:8]]
        together = await engine.generate(workload[1][0], params)
        for s in crowd:
            s.cancel()
        other_seed = await engine.generate(workload[1][0], SamplingParams(
            max_tokens=24, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True))
    finally:
        await engine.shutdown(drain_timeout_s=5)
    assert alone.token_ids == together.token_ids
    assert alone.token_ids != other_seed.token_ids


async def test_stop_strings_and_logprobs(real_model):
    engine = AsyncEngine(real_model, EngineConfig(), PolicyConfig())
    await engine.start()
    try:
        prompt = real_model.tokenizer.encode("One, two, three, four,")
        full = await engine.generate(prompt, SamplingParams(max_tokens=40, temperature=0, logprobs=2,
                                                            ignore_eos=True))
        assert full.logprobs and len(full.logprobs) == len(full.token_ids) == 40
        assert all(lp.logprob <= 0 and len(lp.top) == 2 for lp in full.logprobs)
        assert len(full.text) > 12
        middle = len(full.text) // 2
        word = full.text[middle: middle + 3]
        cut = await engine.generate(prompt, SamplingParams(max_tokens=40, temperature=0, stop=(word,),
                                                           ignore_eos=True))
        assert cut.finish_reason == "stop"
        assert cut.text == full.text[: full.text.index(word)]
    finally:
        await engine.shutdown(drain_timeout_s=5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
async def test_cuda_path_matches_transformers(workload):
    from baton_sidecar.model import load_model

    loaded = load_model(EngineConfig(device="cuda", dtype="float32"), progress=False)
    engine = AsyncEngine(loaded, EngineConfig(device="cuda"), PolicyConfig())
    await engine.start()
    try:
        outputs = await run_staggered(engine, [(p, n, 0) for p, n in workload], gap_s=0.02)
    finally:
        await engine.shutdown(drain_timeout_s=5)
    for (p, n), out in zip(workload, outputs):
        assert_same_greedy(loaded, p, list(out.token_ids), solo_generate(loaded, p, n))
