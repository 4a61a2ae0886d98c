"""One simulated engine: the fast path against every step planned, and times worked out by hand."""

from __future__ import annotations

import random

import numpy as np
import pytest

from baton_sidecar.engine.decisions import projected_peak_slots
from baton_sidecar.simulate.batch import DecodeRun
from baton_sidecar.simulate.cluster import Cluster, simulate, system
from baton_sidecar.simulate.cost import StepCost
from baton_sidecar.simulate.replica import peak_slots
from sim_helpers import COST, policy, random_workload, workload


@pytest.mark.parametrize("rows_leave", [True, False])
def test_peak_slots_equals_the_engines_projection(rows_leave):
    rng = random.Random(0)
    for _ in range(2000):
        rows = [(rng.randint(1, 300), rng.randint(1, 60)) for _ in range(rng.randint(0, 12))]
        assert peak_slots(rows, rows_leave) == projected_peak_slots(rows, rows_leave)


def test_decode_run_counts_the_steps_started_before_a_time():
    rng = random.Random(1)
    for _ in range(500):
        run = DecodeRun(rng.uniform(0, 5), rng.randint(0, 40), rng.uniform(0.001, 0.2), rng.choice([0, 1e-4, 0.01]))
        t = rng.uniform(run.start - 1, run.end + 1)
        expected = sum(1 for i in range(run.steps) if run.start + run.offset(i) < t)
        assert run.started_before(t) == expected


CASES = {
    "baton": dict(),
    "batch full, urgent work preempts": dict(max_batch_size=6, priorities=True),
    "recompute, tight KV": dict(max_batch_size=16, max_kv_tokens=3000, preemption="recompute", priorities=True),
    "chunked prompts": dict(max_prefill_tokens=64),
    "small queue": dict(max_queue=8, rate=200.0),
}


@pytest.mark.parametrize("name", ["baton", "rtc", "cb"])
@pytest.mark.parametrize("case", list(CASES))
def test_bulk_decode_gives_the_times_of_planning_every_step(name, case):
    options = dict(CASES[case])
    priorities, rate = options.pop("priorities", False), options.pop("rate", 30.0)
    preemption = options.pop("preemption", "swap")
    sys_ = system(name, policy(preemption, **options))
    for seed in range(3):
        w = random_workload(seed, rate=rate, priorities=priorities)
        for cluster in (Cluster(1), Cluster(3, "least_queue")):
            fast, exact = simulate(w, sys_, COST, cluster), simulate(w, sys_, COST, cluster, fast=False)
            f, e = fast.outcomes, exact.outcomes
            np.testing.assert_allclose(f.first_token_s, e.first_token_s, rtol=1e-9)
            np.testing.assert_allclose(f.finished_s, e.finished_s, rtol=1e-9)
            assert (f.replica == e.replica).all() and (f.preemptions == e.preemptions).all()
            assert f.refused == e.refused
            assert sum(r.steps for r in fast.replicas) == sum(r.steps for r in exact.replicas)
            assert sum(r.planned for r in fast.replicas) <= sum(r.planned for r in exact.replicas)
            done = ~np.isnan(fast.outcomes.finished_s)
            assert done.sum() + sum(fast.outcomes.refused.values()) == len(w)


def test_one_request_alone_takes_the_time_worked_out_by_hand():
    prompt, output = 100, 4
    sim = simulate(workload([1.0], [prompt], [output]), system("baton", policy()), COST)
    c = COST
    start = 1.0 + c.wake_s
    # An empty batch: the prompt runs in a forward of its own (first token), then the new row
    # decodes in the same step (second token), attending to its prompt and first token.
    first = start + c.forward_s + c.token_s * prompt
    end = first + c.forward_s + c.row_s + c.pair_s * (prompt + 1)
    for context in range(prompt + 2, prompt + output):  # tokens 3 .. output, one step each
        end += c.gap_s + c.forward_s + c.row_s + c.pair_s * context
    assert sim.outcomes.first_token_s[0] == pytest.approx(first)
    assert sim.outcomes.finished_s[0] == pytest.approx(end)
    assert sim.replicas[0].steps == output - 1


def test_run_to_completion_answers_a_batch_together():
    sim = simulate(workload([0.0, 0.0, 0.0], [10, 50, 30], [3, 40, 9]), system("rtc", policy()), COST)
    finished = sim.outcomes.finished_s
    assert finished[0] == finished[1] == finished[2]
    assert sim.replicas[0].steps == 39  # one batch: the longest request's 40 tokens, two in its first step
    rebatched = simulate(workload([0.0, 0.0, 0.0], [10, 50, 30], [3, 40, 9]), system("baton", policy()), COST)
    assert rebatched.outcomes.finished_s[0] < rebatched.outcomes.finished_s[2] < rebatched.outcomes.finished_s[1]


def test_continuous_batching_stalls_running_rows_for_each_prompt():
    """``cb`` prefills each newcomer in a forward of its own; ``baton`` packs it into the decode
    forward. With only forwards and prompt tokens costing time, the long request pays one
    extra forward per newcomer under ``cb``."""
    cost = StepCost(forward_s=0.010, row_s=0.0, pair_s=0.0, token_s=0.0001, gap_s=0.0, wake_s=0.0)
    arrivals = [0.0] + [0.1 * k for k in range(1, 6)]
    w = workload(arrivals, [20] * 6, [200] + [5] * 5)
    finished = {name: simulate(w, system(name, policy()), cost).outcomes.finished_s[0] for name in ("baton", "cb")}
    assert finished["cb"] - finished["baton"] == pytest.approx(5 * cost.forward_s)


def test_a_full_queue_refuses_and_too_large_requests_never_enter():
    sys_ = system("baton", policy(max_queue=2, max_kv_tokens=1000))
    sim = simulate(workload([0.0] * 6, [10] * 5 + [900], [10] * 5 + [200]), sys_, COST)
    assert sim.outcomes.refused == {"queue_full": 3, "too_large": 1}
    assert np.isfinite(sim.outcomes.finished_s[:2]).all() and np.isnan(sim.outcomes.finished_s[2:]).all()


def test_an_urgent_request_preempts_and_both_finish():
    sys_ = system("baton", policy("swap", max_batch_size=1))
    sim = simulate(workload([0.0, 0.2], [10, 10], [100, 10], priorities=[10, 0]), sys_, COST)
    o = sim.outcomes
    assert o.preemptions.tolist() == [1, 0]
    assert o.finished_s[1] < o.finished_s[0]
    assert np.isfinite(o.finished_s).all()
