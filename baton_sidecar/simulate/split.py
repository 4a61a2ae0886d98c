"""Round-robin clusters, replica by replica: the same answers as one event loop, on several cores.

Under round robin without autoscaling the balancer's choice depends on nothing a replica
does: the k-th request it routes goes to replica ``k mod N`` (requests too large for any
replica are refused before routing). Replicas never interact otherwise, so each can be
simulated alone on its own requests, in a worker process of its own, and the outcomes put
back in place. ``tests/simulate/test_cluster.py`` checks the result equals ``simulate``'s.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import replace

import numpy as np

from .cluster import Cluster, ReplicaStats, Simulation, System, simulate
from .cost import StepCost
from .replica import Outcomes
from .workload import SimWorkload


def splittable(cluster: Cluster) -> bool:
    return cluster.balancer == "round_robin" and cluster.autoscale is None and cluster.replicas > 1


def simulate_split(workload: SimWorkload, system: System, cost: StepCost, cluster: Cluster, fast: bool = True,
                   workers: int = 1, stop_at_refusal: bool = False) -> Simulation:
    """``simulate`` for a ``splittable`` cluster, its replicas spread over ``workers`` processes."""
    if not splittable(cluster):
        raise ValueError("only a round-robin cluster without autoscaling runs replica by replica")
    started = time.perf_counter()
    limits = system.policy.limits
    # Too large alone for the KV budget (engine/admission.check_shape): refused, never routed.
    routed = np.flatnonzero(workload.prompt_tokens + workload.output_tokens <= limits.max_kv_tokens)
    picks = [routed[k::cluster.replicas] for k in range(cluster.replicas)]
    if stop_at_refusal and len(routed) < len(workload):
        outcomes = Outcomes(len(workload))
        outcomes.refused["too_large"] = len(workload) - len(routed)
        return Simulation(workload, system, outcomes, [], [], time.perf_counter() - started, stopped=True)
    jobs = [(_subset(workload, picked), system, cost, fast, stop_at_refusal) for picked in picks]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(_one_replica, jobs, chunksize=1)
    else:
        parts = [_one_replica(job) for job in jobs]
    outcomes = Outcomes(len(workload))
    refused_too_large = len(workload) - len(routed)
    if refused_too_large:
        outcomes.refused["too_large"] = refused_too_large
    stats = []
    for index, (picked, (part, replica, _)) in enumerate(zip(picks, parts)):
        outcomes.first_token_s[picked] = part.first_token_s
        outcomes.finished_s[picked] = part.finished_s
        outcomes.preemptions[picked] = part.preemptions
        outcomes.replica[picked] = np.where(part.replica >= 0, index, -1)
        for reason, count in part.refused.items():
            outcomes.refused[reason] = outcomes.refused.get(reason, 0) + count
        stats.append(replace(replica, index=index))
    stopped = any(stopped for _, _, stopped in parts)
    return Simulation(workload, system, outcomes, stats, [], time.perf_counter() - started, stopped)


def _subset(workload: SimWorkload, picked: np.ndarray) -> SimWorkload | None:
    if not len(picked):
        return None
    return SimWorkload(workload.name, workload.arrival_s[picked], workload.prompt_tokens[picked],
                       workload.output_tokens[picked],
                       None if workload.priority is None else workload.priority[picked],
                       None if workload.sla_class is None else [workload.sla_class[i] for i in picked])


def _one_replica(job) -> tuple[Outcomes, ReplicaStats, bool]:
    """One replica alone on its requests (a worker process's job)."""
    workload, system, cost, fast, stop_at_refusal = job
    if workload is None:
        return Outcomes(0), ReplicaStats(0, 0.0, 0.0, 0, 0, 0.0), False
    sim = simulate(workload, system, cost, Cluster(1), fast, stop_at_refusal)
    return sim.outcomes, sim.replicas[0], sim.stopped
