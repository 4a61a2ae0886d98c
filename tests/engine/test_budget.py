"""The time-based prefill budget: the step cost model, the budget's grants, and chunk order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from baton_sidecar.config import Limits, PaddingPolicy, PolicyConfig, PrefillPolicy
from baton_sidecar.engine.budget import HEADROOM, MIN_CHUNK, StepBudget
from baton_sidecar.engine.request import Request, RequestTimes, SamplingParams
from baton_sidecar.engine.scheduler import BatchView, Scheduler
from baton_sidecar.engine.step import StepResults
from baton_sidecar.engine.step_cost import FORWARD, StepCostModel, decode_shape, prompt_shape

# Roughly the default model on one CPU thread: 55 ms a forward, 2.5 ms a token, 1 ms a logit
# row, 1 us per attention pair.
THETA = np.array([0.055, 2.5, 1.0, 1.0])
_ids = itertools.count()


def make(prompt: int, priority: int = 0, arrival: float = 0.0) -> Request:
    return Request(f"b{next(_ids)}", list(range(2, 2 + prompt)), SamplingParams(max_tokens=8), 8,
                   priority=priority, times=RequestTimes(arrival=arrival))


def test_the_cost_model_learns_a_device_its_prior_got_wrong():
    rng = np.random.default_rng(0)
    truth = StepCostModel(THETA)
    model = StepCostModel(THETA * np.array([3.0, 0.3, 2.0, 0.5]))  # a prior off by 2-3x
    shapes = [FORWARD + decode_shape(int(rng.integers(1, 16)), int(rng.integers(50, 2000)))
              + prompt_shape(int(rng.integers(0, 3000)), int(rng.integers(0, 200)), False) for _ in range(200)]
    for shape in shapes:
        model.observe(shape, truth.predict(shape) * (1 + 0.02 * rng.standard_normal()))
    errors = [abs(model.predict(s) / truth.predict(s) - 1) for s in shapes[-50:]]
    assert np.mean(errors) < 0.05 and max(errors) < 0.2  # the prior: 30% on average, up to 120%


def test_alike_steps_leave_what_they_cannot_tell_apart_near_the_prior():
    model = StepCostModel(THETA)
    decode = FORWARD + decode_shape(4, 300)
    for _ in range(100):
        model.observe(decode, StepCostModel(THETA).predict(decode) * 1.2)  # steps run 20% slower
    assert model.predict(decode) == pytest.approx(StepCostModel(THETA).predict(decode) * 1.2, rel=0.05)
    assert model.theta[3] == pytest.approx(THETA[3], rel=0.5)  # attention pairs: still about the prior
    assert (model.theta >= 0).all()


def predicted(cost: StepCostModel, rows: int, context: int, start: int, count: int, fused: bool) -> float:
    shape = FORWARD + decode_shape(rows, context) + prompt_shape(start, count, False)
    return cost.predict(shape if fused else shape + FORWARD)


@pytest.mark.parametrize("fused", [True, False])
def test_the_chunk_is_the_largest_that_keeps_the_step_under_the_target(fused):
    cost = StepCostModel(THETA)
    budget = StepBudget(512, cost, target_s=0.3, rows=4, context=300, fused=fused)
    grant = budget.chunk(start=1000, remaining=3000, first=True)
    assert grant.reason == "time" and MIN_CHUNK < grant.count < 512
    assert predicted(cost, 4, 300, 1000, grant.count, fused) <= 0.3 * HEADROOM
    assert predicted(cost, 4, 300, 1000, grant.count + 1, fused) > 0.3 * HEADROOM


def test_a_separate_prefill_pays_for_its_own_forward():
    fused = StepBudget(512, StepCostModel(THETA), 0.2, rows=4, context=300, fused=True)
    separate = StepBudget(512, StepCostModel(THETA), 0.2, rows=4, context=300, fused=False)
    assert separate.room(0, 3000).count < fused.room(0, 3000).count


def test_with_no_row_decoding_only_the_token_limit_applies():
    budget = StepBudget(512, StepCostModel(THETA), target_s=0.2, rows=0, context=0)
    assert budget.chunk(0, 3000, first=True).count == 512


def test_when_decode_alone_overruns_the_target_a_prompt_under_way_still_gets_the_minimum():
    budget = StepBudget(512, StepCostModel(THETA), target_s=0.05, rows=32, context=2000)
    budget.reserve(3000 - 640)  # held for the prompt under way, before any other is granted
    assert budget.chunk(0, 3000, first=False).count == 0  # a newcomer finds the floor taken ...
    grant = budget.chunk(640, 3000, first=True)  # ... by the prompt under way, which progresses
    assert (grant.count, grant.reason) == (MIN_CHUNK, "floor")
    budget.take(grant, 3000 - 640)
    assert budget.chunk(640 + MIN_CHUNK, 3000, first=False).count == 0


def test_when_decode_alone_overruns_the_target_each_step_still_prefills_the_floor():
    """Else, on a machine whose decode rows alone fill the target, every short prompt would
    wait for its TTFT objective to pass."""
    budget = StepBudget(512, StepCostModel(THETA), target_s=0.05, rows=32, context=2000)
    assert budget.fits_alone(MIN_CHUNK) and not budget.fits_alone(MIN_CHUNK + 1)
    short = budget.room(0, 10)
    assert (short.count, short.reason) == (10, "whole")
    budget.take(short, 10)
    rest = budget.room(0, 100)
    assert (rest.count, rest.reason) == (MIN_CHUNK - 10, "floor")  # the floor is per step, not per prompt
    budget.take(rest, 100)
    assert budget.room(0, 100).count == 0


def timed_scheduler(target_ms: float = 200.0, mode: str = "fused") -> Scheduler:
    policy = PolicyConfig(limits=Limits(max_prefill_tokens=512), max_step_ms=target_ms,
                          padding=PaddingPolicy(max_padding_ratio=1.0), prefill=PrefillPolicy(mode=mode))
    scheduler = Scheduler(policy)
    scheduler.step_cost = StepCostModel(THETA)
    return scheduler


def test_rows_decoding_cut_a_long_prompts_chunk_by_time_and_the_record_says_so():
    scheduler = timed_scheduler()
    long = make(prompt=4000)
    scheduler.add(long)
    idle = scheduler.schedule(now=0.0, batch=BatchView())
    assert [(c.stop, c.reason) for c in idle.chunks] == [(512, "tokens")] and idle.predicted_s is None
    scheduler.update_from_output(idle, StepResults())
    busy = scheduler.schedule(now=1.0, batch=BatchView(rows=4, length=100, real_tokens=400))
    (chunk,) = busy.chunks
    assert chunk.reason == "time" and 0 < chunk.stop - chunk.start < 512
    assert busy.predicted_s <= 0.2 * HEADROOM


def test_long_prompts_share_the_budget_by_priority_then_arrival():
    scheduler = timed_scheduler(target_ms=2000.0)
    old, new = make(1000, priority=5, arrival=0.0), make(1000, priority=5, arrival=1.0)
    urgent = make(1000, priority=0, arrival=2.0)
    for request in (old, new, urgent):
        scheduler.add(request)
    finished_order = []
    for step in range(12):
        plan = scheduler.schedule(now=3.0, batch=BatchView(rows=2, length=50, real_tokens=100))
        assert plan.chunks, "someone always progresses"
        ranks = [(c.request.priority, c.request.times.arrival) for c in plan.chunks]
        assert ranks == sorted(ranks)  # within a step: by priority, then arrival
        for chunk in plan.chunks:
            if chunk.last:
                chunk.request.append_token(7)
                finished_order.append(chunk.request)
        scheduler.update_from_output(plan, StepResults(joined=[c.request for c in plan.chunks if c.last]))
        if len(finished_order) == 3:
            break
    assert finished_order == [urgent, old, new]


def test_short_newcomers_go_first_whole_while_a_long_prompt_is_chunked():
    scheduler = timed_scheduler()
    long = make(prompt=4000, arrival=0.0)
    scheduler.add(long)
    scheduler.update_from_output(scheduler.schedule(0.0, BatchView()), StepResults())
    short = make(prompt=20, arrival=1.0)
    scheduler.add(short)
    plan = scheduler.schedule(now=1.0, batch=BatchView(rows=4, length=100, real_tokens=400))
    assert plan.prefill == [short]
    assert [c.request for c in plan.chunks] == [long] and plan.chunks[0].start == 512


def test_the_time_target_never_holds_a_short_prompt_past_its_ttft_objective():
    scheduler = timed_scheduler(target_ms=100.0)  # 10 decode rows alone fill it
    busy = BatchView(rows=10, length=100, real_tokens=1000)
    short = make(prompt=200, arrival=0.0)  # interactive by default: ttft 1000 ms
    scheduler.add(short)
    early = scheduler.schedule(now=0.5, batch=busy)
    assert early.prefill == []  # only the step's floor: one minimum chunk
    assert [(c.start, c.stop, c.reason) for c in early.chunks] == [(0, MIN_CHUNK, "floor")]
    late = scheduler.schedule(now=1.0, batch=busy)
    assert late.prefill == [short]  # overdue: whole, the step stretches


def test_an_urgent_long_newcomer_does_not_take_the_minimum_held_for_the_prompt_under_way():
    scheduler = timed_scheduler(target_ms=50.0)  # decode rows alone overrun it
    busy = BatchView(rows=10, length=100, real_tokens=1000)
    under_way = make(prompt=2000, priority=5, arrival=0.0)
    scheduler.add(under_way)
    scheduler.update_from_output(scheduler.schedule(0.0, BatchView()), StepResults())
    urgent = make(prompt=2000, priority=0, arrival=0.5)  # more urgent than every row: not held to the target
    scheduler.add(urgent)
    plan = scheduler.schedule(now=0.6, batch=busy)
    assert [(c.request, c.start, c.stop - c.start, c.reason) for c in plan.chunks] == [
        (urgent, 0, 512 - 16, "tokens"), (under_way, 512, 16, "floor")]


def test_tokens_held_for_a_prompt_under_way_do_not_hide_the_separate_prefill_forward():
    plain = StepBudget(512, StepCostModel(THETA), 0.3, rows=4, context=300, fused=False)
    holding = StepBudget(512, StepCostModel(THETA), 0.3, rows=4, context=300, fused=False)
    holding.reserve(1000)  # 16 tokens held: whole prompts are granted next, before the chunk
    grant = holding.room(0, 3000)
    assert grant.reason == "time" and grant.count == plain.room(0, 3000).count


def test_less_urgent_rows_inter_token_objective_never_delays_a_more_urgent_prompt():
    scheduler = timed_scheduler(target_ms=100.0)
    rows = [make(prompt=50, priority=10, arrival=0.0) for _ in range(3)]
    for row in rows:
        scheduler.add(row)
    first = scheduler.schedule(now=0.0, batch=BatchView())
    for row in rows:
        row.append_token(7)
    scheduler.update_from_output(first, StepResults(joined=rows))
    busy = BatchView(rows=3, length=51, real_tokens=153)
    urgent, peer = make(prompt=200, priority=0, arrival=0.5), make(prompt=200, priority=10, arrival=0.5)
    scheduler.add(peer)
    assert scheduler.schedule(now=0.6, batch=busy).prefill == []  # as urgent as the rows: it waits
    scheduler.add(urgent)
    assert scheduler.schedule(now=0.6, batch=busy).prefill == [urgent]  # more urgent: whole, now
