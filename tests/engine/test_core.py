"""EngineCore on the tiny model, stepped by hand: the step contract and the state it keeps in step.

After every step the scheduler's view (queues, computed-token counts) must mirror the
runner's (rows, positions, chunk caches); nothing else in the engine checks that.
"""

from __future__ import annotations

import pytest

from baton_sidecar.config import EngineConfig, Limits, PolicyConfig, PreemptionPolicy, PrefillPolicy
from baton_sidecar.engine.core import EngineCore
from baton_sidecar.engine.request import Request, RequestStatus, RequestTimes, SamplingParams
from baton_sidecar.engine.step import StepRecord

GREEDY = dict(temperature=0, ignore_eos=True)


def request(rid: str, prompt: list[int], max_tokens: int, priority: int = 0, arrival: float = 0.0) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **GREEDY), max_tokens,
                   priority=priority, times=RequestTimes(arrival=arrival))


def check_mirrors(core: EngineCore) -> None:
    scheduler, runner = core.scheduler, core.runner
    assert sorted(scheduler.running) == sorted(runner.row_ids)
    for row, rid in enumerate(runner.row_ids):
        req = scheduler.running[rid]
        if not req.status.finished:
            assert req.num_computed_tokens == runner.positions[row] == req.num_tokens - 1
    assert sorted(scheduler.prefilling) == sorted([*runner.prompts, *runner.chunks])
    for rid, req in scheduler.prefilling.items():
        assert runner.prefilled_tokens(rid) == req.num_computed_tokens < req.num_prefill_tokens
    assert sorted(core.swapped_kv) == sorted(r.request_id for r in scheduler.swapped)
    assert runner.num_cached_tokens() == runner.cache.num_real_tokens()
    queued = [*scheduler.waiting, *scheduler.swapped, *scheduler.prefilling.values(), *scheduler.running.values()]
    assert set(core.tracked) == {r.request_id for r in queued}


def step(core: EngineCore, tokens: dict[str, list[int]]) -> None:
    for out in core.step():
        tokens.setdefault(out.request_id, []).extend(out.token_ids)
    check_mirrors(core)


def run(core: EngineCore, tokens: dict[str, list[int]] | None = None, max_steps: int = 400) -> dict[str, list[int]]:
    tokens = {} if tokens is None else tokens
    for _ in range(max_steps):
        if not core.has_work():
            return tokens
        step(core, tokens)
    raise AssertionError("the engine did not drain")


@pytest.mark.parametrize("prefill", ["fused", "separate"])
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_scheduler_state_mirrors_the_runner_through_chunks_and_preemptions(tiny_model, mode, prefill):
    policy = PolicyConfig(limits=Limits(max_batch_size=2, max_prefill_tokens=8),
                          preemption=PreemptionPolicy(mode=mode), prefill=PrefillPolicy(mode=prefill))
    core = EngineCore(tiny_model, EngineConfig(decode_row_padding="off"), policy)
    records: list[StepRecord] = []
    core.step_observer = records.append
    core.add(request("low-a", [5, 6, 7], 30, priority=10, arrival=0.0))
    core.add(request("two", [4, 5], 2, priority=0, arrival=0.0))  # joins and finishes in one step
    core.add(request("low-b", list(range(2, 22)), 30, priority=10, arrival=1.0))  # 20 tokens: chunks of 8
    tokens: dict[str, list[int]] = {}
    for _ in range(6):  # fused: a newcomer's second token comes a step later (not in its prefill's step)
        step(core, tokens)
        if core.scheduler.running.keys() == {"low-a", "low-b"}:
            break
    assert core.scheduler.running.keys() == {"low-a", "low-b"}
    core.add(request("urgent", [9, 10], 5, priority=0, arrival=2.0))
    run(core, tokens)
    assert {rid: len(t) for rid, t in tokens.items()} == {"low-a": 30, "low-b": 30, "two": 2, "urgent": 5}
    assert core.preemptions_total == 1
    assert sum(r.preempted for r in records) == 1 and sum(r.finished for r in records) == 4
    chunks = [r.chunk_tokens for r in records if r.chunk_tokens]
    assert chunks[:3] == [8, 8, 4]
    if mode == "swap":  # embedded back from host memory, nothing recomputed
        assert len(chunks) == 3 and sum(r.resumed for r in records) == 1
    else:  # low-b re-prefills its prompt and generated tokens but the pending one, chunk by chunk
        assert max(chunks[3:]) == 8 and sum(chunks[3:]) >= 20


def test_a_request_preempted_mid_chunked_prefill_starts_over(tiny_model):
    policy = PolicyConfig(limits=Limits(max_batch_size=1, max_prefill_tokens=8),
                          preemption=PreemptionPolicy(mode="swap"))
    core = EngineCore(tiny_model, EngineConfig(decode_row_padding="off"), policy)
    core.add(request("long", list(range(2, 12)), 4, priority=10))  # 10 tokens: 8, then 2
    tokens: dict[str, list[int]] = {}
    step(core, tokens)
    assert core.runner.prefilled_tokens("long") == 8
    core.add(request("urgent", [9, 10], 3, priority=0, arrival=1.0))
    step(core, tokens)
    long_request = core.tracked["long"].request
    assert core.runner.prefilled_tokens("long") is None and long_request.num_computed_tokens == 0
    assert long_request.status == RequestStatus.PREEMPTED and core.scheduler.waiting == [long_request]
    run(core, tokens)
    assert len(tokens["long"]) == 4 and len(tokens["urgent"]) == 3


def test_run_to_completion_rows_ride_until_the_batch_is_done(tiny_model):
    core = EngineCore(tiny_model, EngineConfig(batching="run_to_completion", decode_row_padding="off"),
                      PolicyConfig())
    core.add(request("short", [5, 6], 2))
    core.add(request("long", [7, 8, 9], 6))
    finals: dict[str, int] = {}
    rows_per_step = []
    for step in range(20):
        if not core.has_work():
            break
        for out in core.step():
            if out.finished:
                finals[out.request_id] = step
        rows_per_step.append(core.runner.num_rows)
        check_mirrors(core)
    assert finals == {"short": 4, "long": 4}  # the short result waited for the long one
    assert rows_per_step == [2, 2, 2, 2, 0]  # the finished row rode along until then


def test_step_observer_costs_no_record_when_unset(tiny_model, monkeypatch):
    core = EngineCore(tiny_model, EngineConfig(decode_row_padding="off"), PolicyConfig())
    monkeypatch.setattr(core, "_record", lambda *a: pytest.fail("a record was built with no observer"))
    core.add(request("a", [5, 6], 3))
    assert len(run(core)["a"]) == 3


def test_a_model_that_cannot_pack_prefills_apart_with_the_same_tokens(tiny_model):
    """Models Baton's attention cannot serve (sliding windows) prefill with their own attention:
    whole prompts left-padded together, chunks one forward each; the tokens are the same."""
    outputs = []
    for can_pack in (True, False):
        policy = PolicyConfig(limits=Limits(max_batch_size=4, max_prefill_tokens=8))
        core = EngineCore(tiny_model, EngineConfig(decode_row_padding="off"), policy)
        core.runner.can_pack = can_pack
        records: list[StepRecord] = []
        core.step_observer = records.append
        core.add(request("a", [5, 6, 7], 12))
        core.add(request("b", list(range(2, 30)), 6, arrival=0.5))  # 28 tokens: chunked
        core.add(request("c", [8, 9], 5, arrival=1.0))
        outputs.append(run(core))
        assert any(r.chunk_tokens for r in records)
        assert any(r.fused for r in records) == can_pack
    assert outputs[0] == outputs[1]
