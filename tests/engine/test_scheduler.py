"""Pure scheduling decisions, driven without a model."""

from __future__ import annotations

import itertools

import pytest

from baton_sidecar.config import Limits, PaddingPolicy, PolicyConfig, PreemptionPolicy
from baton_sidecar.engine.request import Request, RequestOutput, RequestStatus, RequestTimes, SamplingParams
from baton_sidecar.engine.decisions import (choose_victim, effective_priority, padding_ratio_after,
                                            projected_peak_slots, waiting_key)
from baton_sidecar.engine.scheduler import BatchView, RunToCompletionScheduler, Scheduler
from baton_sidecar.engine.step import PrefillChunk, StepPlan, StepResults

_ids = itertools.count()


def make(priority=0, arrival=0.0, prompt=10, max_tokens=10, deadline=None, generated=0, preempted=0):
    request = Request(f"r{next(_ids)}", list(range(2, 2 + prompt)), SamplingParams(max_tokens=max_tokens),
                      max_tokens, priority=priority, deadline=deadline, times=RequestTimes(arrival=arrival))
    request.output_token_ids = [5] * generated
    request.num_preemptions = preempted
    return request


def policy(**limits) -> PolicyConfig:
    return PolicyConfig(limits=Limits(**limits), padding=PaddingPolicy(max_padding_ratio=1.0))


def start(scheduler: Scheduler, *requests: Request) -> None:
    """Bring requests into the batch through the step contract: plan, then their first token."""
    for request in requests:
        scheduler.add(request)
    plan = scheduler.schedule(now=0.0, batch=BatchView())
    assert plan.prefill == list(requests)
    for request in requests:
        request.append_token(7)  # what executing the plan does: the first token
    scheduler.update_from_output(plan, StepResults(joined=list(requests)))


def view(*requests: Request) -> BatchView:
    """The batch as the runner would report it for these rows (no padding: equal lengths)."""
    length = max((r.num_tokens for r in requests), default=0)
    return BatchView(len(requests), length, sum(r.num_tokens for r in requests))


def final(request: Request, reason: str = "length") -> RequestOutput:
    request.finish(RequestStatus.FINISHED_LENGTH if reason == "length" else RequestStatus.FINISHED_CANCELLED)
    return RequestOutput(request.request_id, (), "", None, finished=True, finish_reason=reason)


def test_waiting_order_is_priority_then_deadline_then_arrival():
    urgent_late = make(priority=0, arrival=5.0)
    urgent_deadline = make(priority=0, arrival=6.0, deadline=7.0)
    batch_early = make(priority=10, arrival=0.0)
    ordered = sorted([batch_early, urgent_late, urgent_deadline], key=lambda r: waiting_key(r, 6.0, 1000))
    assert ordered == [urgent_deadline, urgent_late, batch_early]


def test_aging_bounds_the_wait_of_low_priority_work():
    old_batch = make(priority=10, arrival=0.0)
    assert effective_priority(old_batch, now=29.0, aging_s=3.0) == 1
    assert effective_priority(old_batch, now=33.0, aging_s=3.0) == -1
    fresh_urgent = make(priority=0, arrival=33.0)
    ordered = sorted([fresh_urgent, old_batch], key=lambda r: waiting_key(r, 33.0, 3.0))
    assert ordered[0] is old_batch  # after priority*aging_s seconds nothing overtakes it


def test_victim_is_least_urgent_latest_and_respects_cap():
    candidate = make(priority=0)
    a = make(priority=5, arrival=1.0)
    b = make(priority=5, arrival=2.0)
    c = make(priority=1, arrival=3.0)
    assert choose_victim([a, b, c], candidate, max_preemptions=4) is b
    capped = make(priority=5, arrival=2.0, preempted=4)
    assert choose_victim([a, capped, c], candidate, max_preemptions=4) is a
    assert choose_victim([make(priority=0)], candidate, max_preemptions=4) is None  # never equal priority


def test_projected_peak_slots_matches_a_step_by_step_simulation():
    rows = [(10, 5), (30, 2), (4, 40)]

    def simulate(rows_leave):
        peak, horizon = 0, max(r for _, r in rows)
        for t in range(horizon + 1):
            active = [(n, r) for n, r in rows if r >= t or not rows_leave]
            if active:
                peak = max(peak, len(active) * max(n + t for n, _ in active))
        return peak

    assert projected_peak_slots(rows) == simulate(True)
    assert projected_peak_slots(rows, rows_leave=False) == simulate(False)
    assert projected_peak_slots([]) == 0


def test_padding_ratio_after_insert():
    # 2 rows of 10 real tokens in a 10-wide window, add a 5-token row: 25 real / 30 slots
    assert padding_ratio_after(20, 2, 10, 5) == pytest.approx(1 - 25 / 30)



# --- planning -------------------------------------------------------------------------------

def test_schedule_admits_in_order_within_batch_limit():
    scheduler = Scheduler(policy(max_batch_size=2))
    first, second, third = make(arrival=0), make(arrival=1), make(arrival=2)
    for r in (third, first, second):
        scheduler.add(r)
    plan = scheduler.schedule(now=3.0, batch=BatchView())
    assert plan.prefill == [first, second] and not plan.preempt and not plan.chunks


def urgent_arrives_at_a_full_batch(mode: str):
    """Two low-priority rows fill a batch of 2; an urgent request arrives. Returns the plan."""
    scheduler = Scheduler(PolicyConfig(limits=Limits(max_batch_size=2),
                                       preemption=PreemptionPolicy(mode=mode)))
    low_old, low_new = make(priority=10, arrival=0), make(priority=10, arrival=1)
    start(scheduler, low_old, low_new)
    urgent = make(priority=0, arrival=2)
    scheduler.add(urgent)
    return scheduler, low_old, low_new, urgent, scheduler.schedule(now=2.0, batch=view(low_old, low_new))


def test_urgent_request_preempts_least_urgent_when_batch_is_full():
    _, low_old, low_new, urgent, plan = urgent_arrives_at_a_full_batch("recompute")
    assert [(p.request, p.mode) for p in plan.preempt] == [(low_new, "recompute")]
    assert plan.prefill == [urgent]
    assert plan.decode == [low_old]  # the victim is not decoded; the newcomer joins by its results


def test_no_preemption_when_mode_off_or_candidate_not_more_urgent():
    off = Scheduler(PolicyConfig(limits=Limits(max_batch_size=1), preemption=PreemptionPolicy(mode="off")))
    low = make(priority=10)
    start(off, low)
    off.add(make(priority=0))
    plan = off.schedule(1.0, view(low))
    assert plan.empty and plan.decode == [low]

    same = Scheduler(PolicyConfig(limits=Limits(max_batch_size=1)))
    running = make(priority=0)
    start(same, running)
    same.add(make(priority=0))
    assert same.schedule(1.0, view(running)).empty


def test_kv_budget_limits_admission():
    scheduler = Scheduler(policy(max_kv_tokens=100))
    scheduler.add(make(prompt=40, max_tokens=10, arrival=0))  # peak 50
    scheduler.add(make(prompt=40, max_tokens=10, arrival=1))  # together: 2 * 50 = 100
    scheduler.add(make(prompt=10, max_tokens=10, arrival=2))  # would reach 3 * 50
    plan = scheduler.schedule(now=3.0, batch=BatchView())
    assert len(plan.prefill) == 2


def test_prefill_budget_splits_admissions_across_steps():
    scheduler = Scheduler(policy(max_prefill_tokens=25))
    for i in range(3):
        scheduler.add(make(prompt=10, arrival=i))
    assert len(scheduler.schedule(now=3.0, batch=BatchView()).prefill) == 2


def test_packed_prompts_cost_their_real_tokens():
    # 30 + 5 real tokens fit a budget of 40: prompts are packed, not left-padded to the longest.
    scheduler = Scheduler(policy(max_prefill_tokens=40))
    long, short = make(prompt=30, arrival=0.0), make(prompt=5, arrival=1.0)
    scheduler.add(long)
    scheduler.add(short)
    assert scheduler.schedule(now=2.0, batch=BatchView()).prefill == [long, short]


def test_chunking_is_planned_once_from_the_computed_token_count():
    scheduler = Scheduler(policy(max_prefill_tokens=16))
    huge, tiny = make(prompt=40, arrival=0.0), make(prompt=4, arrival=1.0)
    scheduler.add(huge)
    scheduler.add(tiny)
    plan = scheduler.schedule(now=2.0, batch=BatchView())
    # The short newcomer goes first, whole; 12 tokens left are less than a chunk worth starting.
    assert plan.prefill == [tiny] and plan.chunks == []
    tiny.append_token(7)
    scheduler.update_from_output(plan, StepResults(joined=[tiny]))
    assert scheduler.waiting == [huge]

    plan = scheduler.schedule(now=3.0, batch=view(tiny))
    assert plan.chunks == [PrefillChunk(huge, 0, 16, last=False, reason="tokens")]
    scheduler.update_from_output(plan, StepResults())
    assert scheduler.prefilling == {huge.request_id: huge} and huge.num_computed_tokens == 16

    plan = scheduler.schedule(now=4.0, batch=view(tiny))
    assert plan.chunks == [PrefillChunk(huge, 16, 32, last=False, reason="tokens")]
    scheduler.update_from_output(plan, StepResults())

    plan = scheduler.schedule(now=5.0, batch=view(tiny))
    assert plan.chunks == [PrefillChunk(huge, 32, 40, last=True, reason="whole")]
    huge.append_token(7)
    scheduler.update_from_output(plan, StepResults(joined=[huge]))
    assert list(scheduler.running) == [tiny.request_id, huge.request_id] and not scheduler.prefilling
    assert huge.num_computed_tokens == 40  # all but the pending token


def test_a_prompt_under_way_keeps_its_minimum_chunk_while_short_prompts_fill_the_step():
    scheduler = Scheduler(policy(max_prefill_tokens=32))
    huge = make(prompt=100, arrival=0.0)
    scheduler.add(huge)
    scheduler.update_from_output(scheduler.schedule(0.0, BatchView()), StepResults())
    assert huge.num_computed_tokens == 32
    shorts = [make(prompt=10, arrival=1.0 + i) for i in range(3)]  # 30 tokens: would fill the step
    for short in shorts:
        scheduler.add(short)
    plan = scheduler.schedule(now=4.0, batch=BatchView())
    assert plan.prefill == shorts[:1]  # 16 of 32 tokens are held for the prompt under way ...
    assert plan.chunks == [PrefillChunk(huge, 32, 54, last=False, reason="tokens")]  # ... which gets the rest


def test_a_recompute_resumed_request_is_chunked_by_what_it_re_prefills():
    # 16 prompt + 1 generated: it re-prefills 16 tokens (the 17th is pending), which fits a budget of 16.
    resumed = make(prompt=16, generated=1, preempted=1)
    scheduler = Scheduler(policy(max_prefill_tokens=16))
    scheduler.add(resumed)
    plan = scheduler.schedule(now=1.0, batch=BatchView())
    assert plan.prefill == [resumed] and not plan.chunks
    assert resumed.prefill_token_ids() == resumed.prompt_token_ids


def test_a_prompt_mid_chunked_prefill_is_preempted_by_recompute_even_in_swap_mode():
    scheduler = Scheduler(PolicyConfig(limits=Limits(max_batch_size=1, max_prefill_tokens=8),
                                       preemption=PreemptionPolicy(mode="swap")))
    long_low = make(priority=10, prompt=10, arrival=0.0)  # 8 tokens, then 2
    scheduler.add(long_low)
    scheduler.update_from_output(plan := scheduler.schedule(0.0, BatchView()), StepResults())
    assert plan.chunks[0].request is long_low and long_low.num_computed_tokens == 8
    urgent = make(priority=0, prompt=4, arrival=1.0)
    scheduler.add(urgent)
    plan = scheduler.schedule(now=1.0, batch=BatchView())
    assert [(p.request, p.mode) for p in plan.preempt] == [(long_low, "recompute")]
    assert plan.prefill == [urgent] and not plan.chunks  # its chunk is not planned any more
    scheduler.update_from_output(plan, StepResults(joined=[urgent]))
    assert scheduler.waiting == [long_low] and long_low.num_computed_tokens == 0  # starts over later
    assert long_low.status == RequestStatus.PREEMPTED and long_low.num_preemptions == 1


def test_padding_policy_holds_back_a_bloating_newcomer_until_it_has_waited():
    strict = PolicyConfig(padding=PaddingPolicy(max_padding_ratio=0.3), aging_s=10.0)
    scheduler = Scheduler(strict)
    long_row = make(prompt=100, arrival=0)
    start(scheduler, long_row)
    tiny = make(prompt=5, arrival=1.0)
    scheduler.add(tiny)
    batch = view(long_row)
    assert scheduler.schedule(now=2.0, batch=batch).empty  # ratio would be ~0.48
    assert scheduler.schedule(now=12.0, batch=batch).prefill == [tiny]  # waited aging_s


def test_a_tighter_policy_evicts_nobody_and_holds_newcomers_until_rows_leave():
    scheduler = Scheduler(policy(max_batch_size=2))
    a, b = make(arrival=0), make(arrival=1)
    start(scheduler, a, b)
    waiting = make(arrival=2)
    scheduler.add(waiting)
    scheduler.policy = policy(max_batch_size=1)  # as EngineCore.apply_policy does between steps
    plan = scheduler.schedule(now=3.0, batch=view(a, b))
    assert plan.empty and plan.decode == [a, b]  # in-flight requests keep running
    a.finish(RequestStatus.FINISHED_LENGTH)
    update = scheduler.update_from_output(plan, StepResults(finished=[a]))
    assert update.leave == [a]
    assert scheduler.schedule(now=4.0, batch=view(b)).empty  # one row left: still at the new limit
    b.finish(RequestStatus.FINISHED_LENGTH)
    scheduler.update_from_output(StepPlan(decode=[b]), StepResults(finished=[b]))
    assert scheduler.schedule(now=5.0, batch=BatchView()).prefill == [waiting]


# --- applying a step ------------------------------------------------------------------------

def test_preemptions_are_applied_from_the_plan():
    scheduler, keep, swapped, urgent, plan = urgent_arrives_at_a_full_batch("swap")
    assert [p.request for p in plan.preempt] == [swapped]
    assert swapped.status == RequestStatus.RUNNING  # planning changes no state
    urgent.append_token(7)
    scheduler.update_from_output(plan, StepResults(joined=[urgent]))
    assert scheduler.swapped == [swapped] and swapped.status == RequestStatus.PREEMPTED
    assert swapped.num_preemptions == 1 and swapped.num_computed_tokens == swapped.num_tokens - 1  # K/V on host
    assert list(scheduler.running) == [keep.request_id, urgent.request_id]
    # Once there is room, it is resumed (embedded back), not prefilled again.
    urgent.finish(RequestStatus.FINISHED_LENGTH)
    scheduler.update_from_output(StepPlan(decode=[keep, urgent]), StepResults(finished=[urgent]))
    plan = scheduler.schedule(now=3.0, batch=view(keep))
    assert plan.resume == [swapped] and plan.prefill == [] and plan.decode == [keep, swapped]


def test_finished_rows_leave_and_requests_finished_before_joining_do_not():
    scheduler = Scheduler(policy())
    row, other = make(arrival=0), make(arrival=1)
    start(scheduler, row, other)
    newcomer = make(arrival=2)
    scheduler.add(newcomer)
    plan = scheduler.schedule(now=3.0, batch=view(row, other))
    assert plan.prefill == [newcomer]
    outputs = [final(row), final(newcomer)]  # the newcomer's first token finished it: it never got a row
    update = scheduler.update_from_output(plan, StepResults(finished=[row, newcomer], outputs=outputs))
    assert update.leave == [row] and update.outputs == outputs
    assert list(scheduler.running) == [other.request_id] and not scheduler.waiting
    assert scheduler.finish_requests([other]) == [other]  # a cancelled row leaves at once
    assert not scheduler.has_work()


# --- run-to-completion ----------------------------------------------------------------------

def test_run_to_completion_admits_nothing_while_a_batch_runs():
    scheduler = RunToCompletionScheduler(policy())
    running = make()
    start(scheduler, running)
    scheduler.add(make())
    plan = scheduler.schedule(now=1.0, batch=view(running))
    assert plan.empty and plan.decode == [running]


def test_run_to_completion_forms_its_batch_from_everything_that_fits():
    # A prefill budget would shrink static batches: run-to-completion ignores it.
    scheduler = RunToCompletionScheduler(policy(max_prefill_tokens=16))
    waiting = [make(prompt=30, arrival=i) for i in range(5)]
    for request in waiting:
        scheduler.add(request)
    assert scheduler.schedule(now=9.0, batch=BatchView()).prefill == waiting


def test_run_to_completion_rows_ride_along_and_results_wait_for_the_whole_batch():
    scheduler = RunToCompletionScheduler(policy())
    short, cancelled, long_one = make(arrival=0), make(arrival=1), make(arrival=2)
    start(scheduler, short, cancelled, long_one)
    plan = scheduler.schedule(now=1.0, batch=view(short, cancelled, long_one))
    short_final = final(short)
    update = scheduler.update_from_output(plan, StepResults(finished=[short], outputs=[short_final]))
    assert update.leave == [] and update.outputs == []  # it rides along; its result is held
    final(cancelled, reason="cancelled")
    assert scheduler.finish_requests([cancelled]) == []  # a cancelled row rides along too
    plan = scheduler.schedule(now=2.0, batch=view(short, cancelled, long_one))
    assert plan.decode == [short, cancelled, long_one]
    long_final = final(long_one)
    update = scheduler.update_from_output(plan, StepResults(finished=[long_one], outputs=[long_final]))
    assert update.leave == [short, cancelled, long_one]  # the whole batch leaves at once
    assert update.outputs == [short_final, long_final]
    assert not scheduler.has_work()


def test_run_to_completion_never_holds_a_request_that_finished_before_joining():
    scheduler = RunToCompletionScheduler(policy())
    one_token = make()
    scheduler.add(one_token)
    plan = scheduler.schedule(now=1.0, batch=BatchView())
    output = final(one_token)
    update = scheduler.update_from_output(plan, StepResults(finished=[one_token], outputs=[output]))
    assert update.outputs == [output] and update.leave == [] and not scheduler.has_work()


def test_a_prompt_under_way_preempted_for_a_chunked_newcomer_gets_no_chunk_in_that_plan():
    """Its K/V is dropped by the preemption: a chunk planned after it would continue from nothing."""
    scheduler = Scheduler(PolicyConfig(limits=Limits(max_batch_size=1, max_prefill_tokens=64),
                                       padding=PaddingPolicy(max_padding_ratio=1.0),
                                       preemption=PreemptionPolicy(mode="swap")))
    low = make(priority=10, prompt=200, arrival=0.0)
    scheduler.add(low)
    scheduler.update_from_output(scheduler.schedule(0.0, BatchView()), StepResults())
    assert low.num_computed_tokens == 64
    mid = make(priority=5, prompt=200, arrival=1.0)  # too long for one step: a chunked newcomer
    scheduler.add(mid)
    plan = scheduler.schedule(1.0, BatchView())
    assert [(p.request, p.mode) for p in plan.preempt] == [(low, "recompute")]
    assert [c.request for c in plan.chunks] == [mid]


def test_a_newcomer_that_cannot_get_a_row_never_stalls_the_prompt_under_way():
    """The newcomer sorts first (its deadline) but cannot preempt an equal: the prompt under way must
    go on and finish, or neither ever would."""
    scheduler = Scheduler(PolicyConfig(limits=Limits(max_batch_size=1, max_prefill_tokens=64),
                                       padding=PaddingPolicy(max_padding_ratio=1.0)))
    under_way = make(prompt=300, arrival=0.0)
    scheduler.add(under_way)
    scheduler.update_from_output(scheduler.schedule(0.0, BatchView()), StepResults())
    newcomer = make(prompt=300, arrival=0.5, deadline=5.0)
    scheduler.add(newcomer)
    for t in range(1, 5):
        plan = scheduler.schedule(float(t), BatchView())
        assert [c.request for c in plan.chunks] == [under_way] and not plan.preempt
        scheduler.update_from_output(plan, StepResults())
    assert under_way.num_computed_tokens == 300 and newcomer.num_computed_tokens == 0


def test_an_aged_request_that_cannot_get_in_does_not_block_a_more_urgent_one_that_can_preempt():
    scheduler = Scheduler(PolicyConfig(limits=Limits(max_batch_size=1), padding=PaddingPolicy(max_padding_ratio=1.0),
                                       aging_s=30))
    job = make(priority=10, max_tokens=10_000)
    start(scheduler, job)
    old = make(priority=10, arrival=1.0)  # aged to 8 by t=62: ahead of urgent, but cannot preempt its equal
    urgent = make(priority=9, arrival=61.5)
    scheduler.add(old)
    scheduler.add(urgent)
    assert waiting_key(old, 62.0, 30) < waiting_key(urgent, 62.0, 30)
    plan = scheduler.schedule(62.0, view(job))
    assert [p.request for p in plan.preempt] == [job] and plan.prefill == [urgent]
    # Equally urgent requests still wait behind it: order is kept among them.
    later = make(priority=10, arrival=2.0)
    scheduler = Scheduler(scheduler.policy)
    start(scheduler, job := make(priority=10, max_tokens=10_000))
    for request in (old, later):
        scheduler.add(request)
    assert not scheduler.schedule(62.0, view(job)).prefill


def test_queued_requests_a_tighter_policy_leaves_unable_to_run_are_named():
    scheduler = Scheduler(policy(max_batch_size=4, max_kv_tokens=1000))
    big, small = make(prompt=100, max_tokens=400), make(prompt=5, max_tokens=5, arrival=1.0)
    scheduler.add(big)
    scheduler.add(small)
    assert scheduler.unfittable() == []
    scheduler.policy = policy(max_batch_size=4, max_kv_tokens=300)  # big's peak is 500 slots
    assert scheduler.unfittable() == [big]
