"""Pure scheduling decisions, driven without a model."""

from __future__ import annotations

import itertools

import pytest

from baton_sidecar.config import Limits, PaddingPolicy, PolicyConfig, PreemptionPolicy
from baton_sidecar.engine.request import Request, RequestStatus, RequestTimes, SamplingParams
from baton_sidecar.engine.scheduler import (BatchView, Scheduler, choose_victim, effective_priority,
                                            padding_ratio_after, projected_peak_slots, queue_admits,
                                            waiting_key)

_ids = itertools.count()


def make(priority=0, arrival=0.0, prompt=10, max_tokens=10, deadline=None, generated=0, preempted=0):
    request = Request(f"r{next(_ids)}", list(range(2, 2 + prompt)), SamplingParams(max_tokens=max_tokens),
                      max_tokens, priority=priority, deadline=deadline, times=RequestTimes(arrival=arrival))
    request.output_token_ids = [5] * generated
    request.num_preemptions = preempted
    return request


def policy(**limits) -> PolicyConfig:
    return PolicyConfig(limits=Limits(**limits), padding=PaddingPolicy(max_padding_ratio=1.0))


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


def test_queue_refuses_low_urgency_work_first():
    assert queue_admits(79, 100, priority=5)
    assert not queue_admits(80, 100, priority=5)
    assert queue_admits(99, 100, priority=0)
    assert not queue_admits(100, 100, priority=0)


def test_padding_ratio_after_insert():
    # 2 rows of 10 real tokens in a 10-wide window, add a 5-token row: 25 real / 30 slots
    assert padding_ratio_after(20, 2, 10, 5) == pytest.approx(1 - 25 / 30)


def test_schedule_admits_in_order_within_batch_limit():
    scheduler = Scheduler(policy(max_batch_size=2))
    first, second, third = make(arrival=0), make(arrival=1), make(arrival=2)
    for r in (third, first, second):
        scheduler.add(r)
    plan = scheduler.schedule(now=3.0, batch=BatchView())
    assert plan.prefill == [first, second] and not plan.preempt


def test_urgent_request_preempts_least_urgent_when_batch_is_full():
    scheduler = Scheduler(PolicyConfig(limits=Limits(max_batch_size=2),
                                       preemption=PreemptionPolicy(mode="recompute")))
    low_old, low_new = make(priority=10, arrival=0), make(priority=10, arrival=1)
    for r in (low_old, low_new):
        scheduler.on_running(r)
    urgent = make(priority=0, arrival=2)
    scheduler.add(urgent)
    plan = scheduler.schedule(now=2.0, batch=BatchView(rows=2, length=10, real_tokens=20))
    assert plan.preempt == [low_new] and plan.prefill == [urgent]
    assert plan.preemption_mode == "recompute"


def test_no_preemption_when_mode_off_or_candidate_not_more_urgent():
    off = Scheduler(PolicyConfig(limits=Limits(max_batch_size=1), preemption=PreemptionPolicy(mode="off")))
    off.on_running(make(priority=10))
    off.add(make(priority=0))
    assert off.schedule(1.0, BatchView(rows=1, length=10, real_tokens=10)).empty

    same = Scheduler(PolicyConfig(limits=Limits(max_batch_size=1)))
    same.on_running(make(priority=0))
    same.add(make(priority=0))
    assert same.schedule(1.0, BatchView(rows=1, length=10, real_tokens=10)).empty


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


def test_prefill_budget_counts_the_padded_group_not_real_tokens():
    # 30 + 5 real tokens fit a budget of 40, but prefilled together they cost 2 x 30 padded.
    scheduler = Scheduler(policy(max_prefill_tokens=40))
    long, short = make(prompt=30, arrival=0.0), make(prompt=5, arrival=1.0)
    scheduler.add(long)
    scheduler.add(short)
    assert scheduler.schedule(now=2.0, batch=BatchView()).prefill == [long]


def test_prefill_budget_admits_one_chunked_prompt_and_charges_one_chunk():
    scheduler = Scheduler(policy(max_prefill_tokens=16))
    huge, tiny = make(prompt=100, arrival=0.0), make(prompt=4, arrival=1.0)
    scheduler.add(huge)
    scheduler.add(tiny)
    assert scheduler.schedule(now=2.0, batch=BatchView()).prefill == [huge]  # its first chunk fills the step
    # A step that already owes a chunk admits nothing more.
    scheduler = Scheduler(policy(max_prefill_tokens=16))
    scheduler.add(make(prompt=4))
    assert scheduler.schedule(now=2.0, batch=BatchView(prefill_reserved=16)).empty


def test_run_to_completion_admits_nothing_while_a_batch_runs():
    scheduler = Scheduler(policy(), run_to_completion=True)
    scheduler.on_running(make())
    scheduler.add(make())
    assert scheduler.schedule(now=1.0, batch=BatchView(rows=1, length=10, real_tokens=10)).empty


def test_padding_policy_holds_back_a_bloating_newcomer_until_it_has_waited():
    strict = PolicyConfig(padding=PaddingPolicy(max_padding_ratio=0.3), aging_s=10.0)
    scheduler = Scheduler(strict)
    scheduler.on_running(make(prompt=100, arrival=0))
    tiny = make(prompt=5, arrival=1.0)
    scheduler.add(tiny)
    batch = BatchView(rows=1, length=100, real_tokens=100)
    assert scheduler.schedule(now=2.0, batch=batch).empty  # ratio would be ~0.48
    assert scheduler.schedule(now=12.0, batch=batch).prefill == [tiny]  # waited aging_s


def test_policy_swap_takes_effect_on_the_next_plan():
    scheduler = Scheduler(policy(max_batch_size=1))
    scheduler.add(make(arrival=0))
    scheduler.add(make(arrival=1))
    scheduler.policy = policy(max_batch_size=2)
    assert len(scheduler.schedule(now=2.0, batch=BatchView()).prefill) == 2


def test_preempted_request_goes_to_the_right_queue():
    scheduler = Scheduler(policy())
    swapped, recomputed = make(), make()
    for r in (swapped, recomputed):
        scheduler.on_running(r)
    scheduler.on_preempted(swapped, "swap")
    scheduler.on_preempted(recomputed, "recompute")
    assert scheduler.swapped == [swapped] and scheduler.waiting == [recomputed]
    assert swapped.status == RequestStatus.PREEMPTED and swapped.num_preemptions == 1


def test_run_to_completion_forms_its_batch_from_everything_that_fits():
    # A prefill budget would shrink static batches: run-to-completion ignores it.
    scheduler = Scheduler(policy(max_prefill_tokens=16), run_to_completion=True)
    waiting = [make(prompt=30, arrival=i) for i in range(5)]
    for request in waiting:
        scheduler.add(request)
    assert scheduler.schedule(now=9.0, batch=BatchView()).prefill == waiting
