"""Admission: the pure rules, and the one count queue refusals come from, on a busy engine."""

from __future__ import annotations

import asyncio
import threading

import pytest

from baton_sidecar.config import EngineConfig, Limits, PolicyConfig
from baton_sidecar.engine import AdmissionError, AsyncEngine, RequestValidationError, SamplingParams
from baton_sidecar.engine.admission import QueueCount, check_shape, queue_admits

GREEDY = dict(temperature=0, ignore_eos=True)


def test_queue_refuses_low_urgency_work_first():
    assert queue_admits(79, 100, priority=5)
    assert not queue_admits(80, 100, priority=5)
    assert queue_admits(99, 100, priority=0)
    assert not queue_admits(100, 100, priority=0)


def test_queue_count_refuses_at_the_limit_and_frees_what_started():
    count, limits = QueueCount(), Limits(max_queue=2)
    count.enter(limits, priority=0)
    count.enter(limits, priority=0)
    with pytest.raises(AdmissionError) as info:
        count.enter(limits, priority=0)
    assert info.value.reason == "queue_full" and info.value.retry_after_s
    count.leave(1)
    count.enter(limits, priority=0)
    assert count.queued == 2


def test_shape_checks_name_what_can_never_fit():
    check_shape(10, 20, max_model_len=64, limits=Limits(max_kv_tokens=30))
    with pytest.raises(RequestValidationError) as info:
        check_shape(10, 60, max_model_len=64, limits=Limits())
    assert info.value.field == "max_tokens"
    with pytest.raises(AdmissionError) as refusal:
        check_shape(10, 21, max_model_len=64, limits=Limits(max_kv_tokens=30))
    assert refusal.value.reason == "too_large"


async def test_requests_taken_in_by_a_busy_engine_still_count_against_the_queue(tiny_model, monkeypatch):
    """The engine thread drains two waiting requests, then sits in a long step: a third is refused.

    (Counting from the last step's stats plus the inbox would see an empty queue here.)
    """
    policy = PolicyConfig(limits=Limits(max_batch_size=1, max_queue=2))
    engine = AsyncEngine(tiny_model, EngineConfig(), policy)
    await engine.start(warmup=False)
    runner = engine.core.runner
    decode, entered, allow = runner.decode, threading.Event(), threading.Semaphore(0)
    gate = {"on": False}

    def gated_decode():
        if gate["on"]:
            entered.set()
            allow.acquire(timeout=10)
        return decode()

    monkeypatch.setattr(runner, "decode", gated_decode)
    streams = []
    try:
        streams.append(engine.submit([5, 6], SamplingParams(max_tokens=200, **GREEDY)))
        while engine.stats().batch_size != 1:
            await asyncio.sleep(0.01)
        gate["on"] = True
        await asyncio.to_thread(entered.wait, 10)
        entered.clear()
        streams += [engine.submit([7, 8], SamplingParams(max_tokens=5, **GREEDY)) for _ in range(2)]
        allow.release()  # that step ends; the next drains both into the engine, then decodes
        assert await asyncio.to_thread(entered.wait, 10)
        with pytest.raises(AdmissionError) as info:
            engine.submit([9, 10], SamplingParams(max_tokens=5, **GREEDY), priority=0)
        assert info.value.reason == "queue_full"
        assert engine.core.scheduler.waiting and len(engine.core.scheduler.waiting) == 2
    finally:
        gate["on"] = False
        for _ in range(5):
            allow.release()
        for stream in streams:
            stream.cancel()
        await engine.shutdown(drain_timeout_s=5)
    # Once the waiting requests started (or ended), the count is back to zero.
    assert engine._queue.queued == 0
