"""The asyncio engine on the tiny model: streaming, cancellation, isolation, memory, RTC mode."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from baton_sidecar.config import EngineConfig, Limits, PolicyConfig
from baton_sidecar.engine import AdmissionError, AsyncEngine, RequestValidationError, SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture
async def engine(tiny_model):
    engine = AsyncEngine(tiny_model, EngineConfig(), PolicyConfig())
    await engine.start()
    yield engine
    await engine.shutdown(drain_timeout_s=2)


async def wait_until(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_stream_yields_deltas_then_a_final_result(engine):
    stream = engine.submit([5, 6, 7], SamplingParams(max_tokens=5, **GREEDY))
    outputs = [out async for out in stream]
    assert [len(o.token_ids) for o in outputs] == [1, 1, 1, 1, 1]
    assert outputs[-1].finished and outputs[-1].finish_reason == "length"
    assert outputs[-1].completion_tokens == 5 and outputs[-1].prompt_tokens == 3
    names = [name for o in outputs for name, _ in o.events]
    assert names[:4] == ["queued", "scheduled", "prefilled", "first_token"] and names[-1] == "finished"


async def test_cancel_frees_the_row_and_memory(engine):
    long_one = engine.submit([5, 6], SamplingParams(max_tokens=400, **GREEDY))
    await wait_until(lambda: engine.stats().batch_size == 1)
    long_one.cancel()
    outputs = [out async for out in long_one]
    assert outputs[-1].finish_reason == "cancelled"
    await wait_until(lambda: engine.stats().batch_size == 0)
    assert engine.stats().kv_bytes_allocated == 0


async def test_finished_rows_leave_while_others_keep_running(engine):
    records = []
    engine.observe_steps(records.append)
    short = engine.submit([5, 6], SamplingParams(max_tokens=3, **GREEDY))
    long_one = engine.submit([7, 8, 9], SamplingParams(max_tokens=60, **GREEDY))
    short_out, long_out = await asyncio.gather(_drain(short), _drain(long_one))
    engine.observe_steps(None)
    assert short_out[-1].completion_tokens == 3 and long_out[-1].completion_tokens == 60
    # The short result is delivered while the long request still has most of its tokens to go.
    assert short_out[-1].times.finished < long_out[-1].times.first_token + 0.5 * (
        long_out[-1].times.finished - long_out[-1].times.first_token)
    # The step that finished the short request ended with one row: it left in that same step,
    # and the long one kept decoding alone.
    assert [r.batch_rows for r in records if r.finished] == [1, 0]
    assert sum(1 for r in records if r.decode_rows == 1) >= 60 - 3 - 1


async def test_a_failing_prefill_ends_only_its_own_requests(engine, monkeypatch):
    """Whether prompts run apart or in the decode rows' packed forward (then it is retried apart)."""
    runner = engine.core.runner
    real_prefill, real_packed = runner.prefill, runner.run_packed

    def flaky_prefill(request_ids, token_lists, *args):
        if any(tokens[0] == 66 for tokens in token_lists):
            raise RuntimeError("boom")
        return real_prefill(request_ids, token_lists, *args)

    def flaky_packed(parts, decode):
        if any(part.tokens[0] == 66 for part in parts):
            raise RuntimeError("boom")
        return real_packed(parts, decode)

    monkeypatch.setattr(runner, "prefill", flaky_prefill)
    monkeypatch.setattr(runner, "run_packed", flaky_packed)
    healthy = engine.submit([5, 6], SamplingParams(max_tokens=40, **GREEDY))
    await wait_until(lambda: engine.stats().batch_size == 1)
    broken = await engine.generate([66, 6], SamplingParams(max_tokens=5, **GREEDY))
    assert broken.finish_reason == "error" and "boom" in broken.error
    assert [o async for o in healthy][-1].completion_tokens == 40


async def test_bad_input_raises_naming_the_field(engine):
    with pytest.raises(RequestValidationError) as info:
        engine.submit("", SamplingParams())
    assert info.value.field == "prompt"
    with pytest.raises(RequestValidationError) as info:
        engine.submit([5, 10_000], SamplingParams())
    assert info.value.field == "prompt"
    with pytest.raises(RequestValidationError) as info:
        engine.submit([5] * 600, SamplingParams())
    assert info.value.field == "prompt"
    with pytest.raises(RequestValidationError) as info:
        engine.submit([5, 6], SamplingParams(max_tokens=511))
    assert info.value.field == "max_tokens"
    with pytest.raises(RequestValidationError) as info:
        engine.submit([5, 6], SamplingParams(), sla_class="nope")
    assert info.value.field == "sla_class"


async def test_refusals_are_typed(tiny_model):
    limits = Limits(max_kv_tokens=50, max_queue=1, max_batch_size=1)
    engine = AsyncEngine(tiny_model, EngineConfig(), PolicyConfig(limits=limits))
    await engine.start(warmup=False)
    try:
        with pytest.raises(AdmissionError) as info:
            engine.submit([5] * 40, SamplingParams(max_tokens=20))
        assert info.value.reason == "too_large"
        engine.submit([5], SamplingParams(max_tokens=30, **GREEDY))
        await wait_until(lambda: engine.stats().batch_size == 1)
        engine.submit([5], SamplingParams(max_tokens=30, **GREEDY))
        await wait_until(lambda: engine.stats().waiting == 1)
        with pytest.raises(AdmissionError) as info:  # the one queue slot is taken
            engine.submit([5], SamplingParams(max_tokens=30, **GREEDY), priority=0)
        assert info.value.reason == "queue_full" and info.value.retry_after_s
    finally:
        await engine.shutdown(drain_timeout_s=5)
    with pytest.raises(AdmissionError) as info:
        engine.submit([5], SamplingParams())
    assert info.value.reason == "shutting_down"
    assert engine.stats().refusals_by_reason == {"too_large": 1, "queue_full": 1, "shutting_down": 1}


async def test_run_to_completion_holds_results_until_the_batch_is_done(tiny_model):
    engine = AsyncEngine(tiny_model, EngineConfig(batching="run_to_completion"), PolicyConfig())
    await engine.start(warmup=False)
    try:
        with engine.submit_together():  # one batch: the engine thread can't start the short one alone
            short_stream = engine.submit([5, 6], SamplingParams(max_tokens=2, **GREEDY))
            long_stream = engine.submit([7, 8], SamplingParams(max_tokens=40, **GREEDY))
        short, long_one = asyncio.ensure_future(_drain(short_stream)), asyncio.ensure_future(_drain(long_stream))
        received = {}
        short.add_done_callback(lambda _: received.setdefault("short", time.monotonic()))
        short_deltas, long_deltas = await asyncio.gather(short, long_one)
        short_out, long_out = short_deltas[-1], long_deltas[-1]
        assert short_out.completion_tokens == 2 and long_out.completion_tokens == 40
        # The short request finished early, but its result was held until the long one finished.
        held = [t for name, t in short_out.events if name == "finished"][0]
        assert held == short_out.times.finished < long_out.times.first_token + 0.5 * (
            long_out.times.finished - long_out.times.first_token)
        assert received["short"] >= long_out.times.finished
        await wait_until(lambda: engine.stats().batch_size == 0)
    finally:
        await engine.shutdown(drain_timeout_s=2)


async def test_policy_applies_at_run_time(engine):
    engine.apply_policy(PolicyConfig(limits=Limits(max_batch_size=1)))
    a = engine.submit([5, 6], SamplingParams(max_tokens=200, **GREEDY))  # long: a wide window to look in
    b = engine.submit([7, 8], SamplingParams(max_tokens=20, **GREEDY))
    batch_sizes = []

    async def drain_watching(stream):
        async for _ in stream:
            batch_sizes.append(engine.stats().batch_size)

    # One row runs while the other waits (one snapshot: the first may finish between two reads), and no
    # step ever holds both.
    await wait_until(lambda: (s := engine.stats()).batch_size == 1 and s.waiting == 1)
    await asyncio.gather(drain_watching(a), drain_watching(b))
    assert batch_sizes and max(batch_sizes) == 1


async def _drain(stream):
    return [o async for o in stream]


async def test_long_prompt_is_prefilled_in_chunks_while_the_batch_decodes(tiny_model):
    policy = PolicyConfig(limits=Limits(max_prefill_tokens=16))
    engine = AsyncEngine(tiny_model, EngineConfig(), policy)
    await engine.start(warmup=False)
    try:
        running = engine.submit([5, 6], SamplingParams(max_tokens=200, **GREEDY))
        await wait_until(lambda: engine.stats().batch_size == 1)
        long_prompt = [(7 * i) % 90 + 2 for i in range(100)]  # 7 chunks of 16
        long_stream = engine.submit(long_prompt, SamplingParams(max_tokens=5, **GREEDY))
        tokens_meanwhile = 0
        async for out in running:
            tokens_meanwhile += len(out.token_ids)
            if engine.stats().batch_size == 2:
                break
        chunked = [o async for o in long_stream]
        running.cancel()
        assert tokens_meanwhile >= 6, "the batch must keep decoding while the long prompt is chunked"
        engine.apply_policy(PolicyConfig())  # default budget: the prompt is prefilled in one piece
        whole = await engine.generate(long_prompt, SamplingParams(max_tokens=5, **GREEDY))
    finally:
        await engine.shutdown(drain_timeout_s=2)
    assert [t for o in chunked for t in o.token_ids] == list(whole.token_ids)


async def test_an_unexpected_step_failure_ends_requests_and_the_engine_keeps_serving(engine, monkeypatch):
    runner = engine.core.runner
    real_embed = runner.embed
    calls = {"n": 0}

    def embed_failing_once(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("embed broke")
        return real_embed(*args)

    monkeypatch.setattr(runner, "embed", embed_failing_once)
    failed = await engine.generate([5, 6], SamplingParams(max_tokens=5, **GREEDY))
    assert failed.finish_reason == "error" and "embed broke" in failed.error
    healthy = await engine.generate([5, 6], SamplingParams(max_tokens=5, **GREEDY))
    assert healthy.finish_reason == "length" and healthy.completion_tokens == 5


async def test_a_failure_outside_a_step_ends_every_request_and_the_engine_keeps_serving(engine, monkeypatch):
    """E.g. out of memory while a request's logits state is allocated on intake: the request whose
    intake failed, the one running beside it and any later one each get a final; nothing hangs."""
    running = engine.submit([5, 6], SamplingParams(max_tokens=400, **GREEDY))
    await anext(running)  # it has a row
    track = engine.core.outputs.track

    def track_failing(request):
        if request.params.presence_penalty:
            raise RuntimeError("out of memory (simulated)")
        return track(request)
    monkeypatch.setattr(engine.core.outputs, "track", track_failing)
    bad = engine.submit([5, 7], SamplingParams(max_tokens=3, presence_penalty=1.0, n=2, **GREEDY))

    async def finals(stream):
        return [o for o in [o async for o in stream] if o.finished]
    ran, refused = await asyncio.wait_for(asyncio.gather(finals(running), finals(bad)), 10)
    assert [o.finish_reason for o in ran] == ["error"] and "out of memory" in ran[0].error
    assert sorted((o.index, o.finish_reason) for o in refused) == [(0, "error"), (1, "error")]  # both choices
    monkeypatch.undo()
    healthy = await asyncio.wait_for(engine.generate([5, 6], SamplingParams(max_tokens=5, **GREEDY)), 10)
    assert healthy.finish_reason == "length" and engine._thread.is_alive()
    assert engine.stats().waiting == 0 and not engine._streams


async def test_a_tighter_policy_ends_queued_requests_it_leaves_unable_to_run_and_the_line_moves(engine):
    """Accepted under the old KV budget, refused by the new one even alone: it ends as admission would
    refuse it now (``too_large``), instead of blocking everything queued behind it."""
    engine.apply_policy(PolicyConfig(limits=Limits(max_batch_size=1, max_kv_tokens=2000)))
    running = engine.submit([5, 6], SamplingParams(max_tokens=300, **GREEDY))
    await anext(running)  # holds the only row
    with engine.submit_together():
        big = engine.submit([3 + i % 90 for i in range(100)], SamplingParams(max_tokens=300, **GREEDY))  # 400 slots
        small = engine.submit([5, 6], SamplingParams(max_tokens=3, **GREEDY))
        engine.apply_policy(PolicyConfig(limits=Limits(max_batch_size=1, max_kv_tokens=350)))
    refused = [o async for o in big][-1]
    assert refused.finish_reason == "error" and refused.error.startswith("too_large:")
    running.cancel()
    finished = await asyncio.wait_for(small.__anext__(), 10)
    assert finished.token_ids  # the line moved
    assert [o async for o in small][-1].finish_reason == "length"


async def test_padding_counters_add_up_the_live_windows_of_decode_steps(engine):
    def counters():
        stats = engine.stats()
        return stats.kv_slots_total, stats.kv_padding_slots_total

    slots0, padding0 = counters()  # the start-up warm-up request decoded already
    alone = engine.submit([5, 6, 7], SamplingParams(max_tokens=5, **GREEDY))
    [o async for o in alone]
    # Decode steps see windows of 3, 4, 5 and 6 real tokens (the first token comes from prefill).
    slots1, padding1 = counters()
    assert (slots1 - slots0, padding1 - padding0) == (18, 0)
    short = engine.submit([5, 6], SamplingParams(max_tokens=40, **GREEDY))  # still running when long joins
    long_one = engine.submit(list(range(7, 19)), SamplingParams(max_tokens=3, **GREEDY))
    [o async for o in short], [o async for o in long_one]
    slots2, padding2 = counters()
    assert 0 < padding2 - padding1 < slots2 - slots1  # the short row is left-padded to the long one


async def test_the_engine_thread_detokenizes_with_its_own_tokenizer(engine):
    # The server tokenizes prompts on other threads; a fast tokenizer must not be shared.
    core_tokenizer = engine.core.tokenizer
    assert core_tokenizer is not engine.tokenizer
    assert core_tokenizer.backend_tokenizer is not engine.tokenizer.backend_tokenizer
    assert core_tokenizer.decode([5, 6, 7]) == engine.tokenizer.decode([5, 6, 7])


async def test_a_newcomers_first_token_does_not_wait_for_the_steps_decode_pass(engine, monkeypatch):
    running = engine.submit([5, 6], SamplingParams(max_tokens=300, **GREEDY))
    await wait_until(lambda: engine.stats().batch_size == 1)
    release = threading.Event()
    decode = engine.core.runner.decode

    def gated_decode():
        if engine.core.runner.num_rows == 2:  # the newcomer has been prefilled and embedded
            release.wait(timeout=10)
        return decode()

    monkeypatch.setattr(engine.core.runner, "decode", gated_decode)
    newcomer = engine.submit([7, 8, 9], SamplingParams(max_tokens=4, **GREEDY))
    first = await asyncio.wait_for(newcomer.__anext__(), timeout=5)
    assert len(first.token_ids) == 1 and not release.is_set()  # arrived while the decode pass was held
    release.set()
    assert [o async for o in newcomer][-1].completion_tokens == 4
    running.cancel()
