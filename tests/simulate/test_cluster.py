"""Replicas behind a balancer, autoscaling, capacity planning and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from baton_sidecar.bench.metrics import SLO
from baton_sidecar.cli import main
from baton_sidecar.simulate import cost as costs
from baton_sidecar.simulate.cluster import Autoscale, Cluster, simulate, system
from baton_sidecar.simulate.metrics import summarize
from baton_sidecar.simulate.planning import replicas_needed, rtc_capacity
from baton_sidecar.simulate.split import simulate_split
from sim_helpers import COST, policy, random_workload, workload


def test_round_robin_takes_replicas_in_turn():
    sim = simulate(workload([0.1 * i for i in range(8)], [10] * 8, [5] * 8), system("baton", policy()), COST,
                   Cluster(4))
    assert sim.outcomes.replica.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_least_queue_sends_work_away_from_a_busy_replica():
    # Replica 0 holds a long request; short ones arriving far apart find replica 1 empty each time.
    w = workload([0.0] + [1.0 * k for k in range(1, 6)], [10] * 6, [1000] + [5] * 5)
    sim = simulate(w, system("baton", policy()), COST, Cluster(2, "least_queue"))
    assert sim.outcomes.replica.tolist() == [0, 1, 1, 1, 1, 1]
    rr = simulate(w, system("baton", policy()), COST, Cluster(2, "round_robin"))
    assert rr.outcomes.replica.tolist() == [0, 1, 0, 1, 0, 1]


def test_autoscaling_adds_replicas_that_serve_only_once_started():
    w = random_workload(0, n=400, rate=60.0, prompt=(50, 200), output=(50, 150))
    scale = Autoscale(target_queue=4, max_replicas=6, startup_s=2.0, interval_s=1.0)
    sim = simulate(w, system("baton", policy(max_batch_size=4)), COST, Cluster(1, autoscale=scale))
    assert sim.scale_events and len(sim.replicas) <= 6
    first = sim.scale_events[0]
    assert first["ready_at"] == pytest.approx(first["t"] + 2.0)
    for replica in sim.replicas[1:]:
        served = w.arrival_s[sim.outcomes.replica == replica.index]
        assert len(served) and served.min() >= replica.ready_at
    fixed = simulate(w, system("baton", policy(max_batch_size=4)), COST, Cluster(1))
    slo = SLO(None, None, None)
    assert summarize(sim, slo)["e2e_p95_s"] < summarize(fixed, slo)["e2e_p95_s"]


def test_replicas_needed_is_the_fewest_that_meet_the_target():
    w = random_workload(1, n=300, rate=40.0, prompt=(20, 100), output=(20, 100))
    sys_ = system("baton", policy(max_batch_size=8))
    e2e = {n: summarize(simulate(w, sys_, COST, Cluster(n)), SLO(None, None, None))["e2e_p95_s"] for n in range(1, 9)}
    target = (e2e[2] + e2e[3]) / 2 if e2e[2] > e2e[3] else e2e[3] * 1.01
    plan = replicas_needed(w, sys_, COST, Cluster(1), metric="e2e", target_s=target, max_replicas=16)
    n = plan["replicas"]
    assert e2e[n] <= target and (n == 1 or e2e[n - 1] > target)
    impossible = replicas_needed(w, sys_, COST, Cluster(1), metric="ttft", target_s=1e-6, max_replicas=4)
    assert impossible["replicas"] is None


def test_rtc_capacity_is_requests_over_the_makespan_of_one_batch_run():
    w = workload([0.0] * 4, [10, 20, 30, 40], [10, 20, 30, 40])
    sim = simulate(w, system("rtc", policy()), COST)
    makespan = np.nanmax(sim.outcomes.finished_s)
    assert rtc_capacity(w, system("baton", policy()), COST) == pytest.approx(4 / makespan)


def test_the_command_line_writes_every_load_and_system(tmp_path, capsys):
    model = tmp_path / "model.json"
    costs.save(COST, model)
    out = tmp_path / "out.json"
    code = main(["simulate", "offline", "-n", "60", "--output-len", "5:60", "--cost-model", str(model),
                 "--systems", "baton,rtc,cb", "--replicas", "2", "--balancer", "least_queue", "--load", "0.5,1.5",
                 "--plan-p95", "30", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert [p["load"] for p in result["points"]] == [0.5, 1.5]
    capacity = result["rtc_capacity_req_per_s"]
    assert capacity["cluster"] == pytest.approx(2 * capacity["one_replica"])
    low, high = (p["systems"] for p in result["points"])
    assert set(low) == {"baton", "rtc", "cb"}
    assert high["rtc"]["e2e_p95_s"] > low["rtc"]["e2e_p95_s"]  # more load, longer waits
    assert all(s["replicas_needed"]["replicas"] >= 1 for s in low.values())
    assert "baton" in capsys.readouterr().out


def test_the_command_line_replays_a_bench_run_and_refuses_bad_input(tmp_path, capsys):
    requests = [{"index": i, "priority": None, "prompt_tokens": 20 + i, "max_tokens": 10, "submitted_s": 0.05 * i}
                for i in range(10)]
    (tmp_path / "requests.json").write_text(json.dumps({"baton": requests}))
    model = tmp_path / "model.json"
    costs.save(COST, model)
    assert main(["simulate", "requests", str(tmp_path / "requests.json"), "--cost-model", str(model)]) == 0
    assert main(["simulate", "requests", str(tmp_path / "requests.json"), "--cost-model", str(model),
                 "--systems", "vllm"]) == 2
    assert main(["simulate", "requests", str(tmp_path / "absent.json"), "--cost-model", str(model)]) == 2
    assert main(["simulate", "offline", "--cost-model", str(tmp_path / "absent.json")]) == 2
    errors = capsys.readouterr().err
    assert "unknown system 'vllm'" in errors and "--cost-model" in errors


@pytest.mark.parametrize("workers", [1, 2])
def test_a_round_robin_cluster_run_replica_by_replica_gives_the_same_answers(workers):
    w = random_workload(2, n=200, rate=80.0, priorities=True)
    sys_ = system("baton", policy(max_queue=6, max_kv_tokens=300, max_batch_size=8))
    joint = simulate(w, sys_, COST, Cluster(3))
    split = simulate_split(w, sys_, COST, Cluster(3), workers=workers)
    assert joint.outcomes.refused == split.outcomes.refused and "too_large" in joint.outcomes.refused
    for name in ("first_token_s", "finished_s", "replica", "preemptions"):
        np.testing.assert_array_equal(getattr(joint.outcomes, name), getattr(split.outcomes, name))
    assert joint.replicas == split.replicas
    with pytest.raises(ValueError):
        simulate_split(w, sys_, COST, Cluster(3, "least_queue"))


def test_a_refusal_settles_a_planning_question_early():
    w = workload([0.0] * 6, [10] * 5 + [900], [10] * 5 + [200])
    sys_ = system("baton", policy(max_queue=2, max_kv_tokens=1000))
    sim = simulate(w, sys_, COST, stop_at_refusal=True)
    assert sim.stopped and sim.outcomes.refused == {"queue_full": 1}
    plan = replicas_needed(w, sys_, COST, Cluster(1), metric="e2e", target_s=100.0)
    assert plan["replicas"] is None and "too large" in plan["note"]  # no count of replicas can help
    assert set(plan["tried"].values()) == {None}
