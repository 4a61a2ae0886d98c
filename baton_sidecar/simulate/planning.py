"""Capacity questions answered by simulation: one replica's capacity, replicas needed for a target.

- ``rtc_capacity``: requests/s one run-to-completion replica completes with the workload's
  first requests all at t=0: the bench's capacity (``--load`` is a fraction of it), its
  queue unbounded so that no request is refused.
- ``replicas_needed``: the fewest replicas whose simulated p95 (TTFT or E2E) meets a target at
  a given rate, by doubling then bisection (latency is taken to fall as replicas are added),
  with no request refused (a count that refuses one stops there: it fails).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..bench.metrics import SLO
from .cluster import Cluster, Simulation, System, simulate, system
from .cost import StepCost
from .metrics import summarize
from .split import simulate_split, splittable
from .workload import SimWorkload

METRICS = ("e2e", "ttft")


def rtc_capacity(workload: SimWorkload, base: System, cost: StepCost, requests: int = 256) -> float:
    """Requests per second of one ``rtc`` replica on ``workload``'s first ``requests`` at t=0."""
    sample = workload.head(min(requests, len(workload))).all_at_once()
    limits = replace(base.policy.limits, max_queue=max(base.policy.limits.max_queue, len(sample)))
    rtc = system("rtc", replace(base.policy, limits=limits))
    summary = summarize(simulate(sample, rtc, cost), SLO(None, None, None))
    if not summary["requests_per_s"]:
        raise ValueError("capacity: the rtc run completed nothing")
    return summary["requests_per_s"]


def run_cluster(workload: SimWorkload, sys: System, cost: StepCost, cluster: Cluster, fast: bool = True,
                workers: int = 1, stop_at_refusal: bool = False) -> Simulation:
    """``simulate``, replica by replica on ``workers`` processes where the cluster allows (``split``)."""
    if splittable(cluster):
        return simulate_split(workload, sys, cost, cluster, fast, workers, stop_at_refusal)
    return simulate(workload, sys, cost, cluster, fast, stop_at_refusal)


def replicas_needed(workload: SimWorkload, sys: System, cost: StepCost, cluster: Cluster, *, metric: str,
                    target_s: float, max_replicas: int = 256, workers: int = 1) -> dict[str, Any]:
    """The fewest replicas (``cluster``'s balancer, no autoscaling) with p95 ``metric`` <= ``target_s``."""
    if metric not in METRICS:
        raise ValueError(f"--plan-metric: must be one of {', '.join(METRICS)}")
    key = f"{metric}_p95_s"
    tried: dict[int, float | None] = {}

    def meets(n: int) -> bool:
        """Whether ``n`` replicas meet the target; a refusal fails at once (the queue overflowed)."""
        sim = run_cluster(workload, sys, cost, replace(cluster, replicas=n, autoscale=None), workers=workers,
                          stop_at_refusal=True)
        refused.update(sim.outcomes.refused)
        tried[n] = None if sim.stopped else summarize(sim, SLO(None, None, None))[key]
        return tried[n] is not None and tried[n] <= target_s

    refused: dict[str, int] = {}
    low, high = 0, 1  # low fails (0 replicas serve nothing), high is the candidate
    while not meets(high):
        if "too_large" in refused:  # more replicas never help a request no replica can hold
            return {"metric": key, "target_s": target_s, "replicas": None, "tried": _named(tried),
                    "note": "requests too large for one replica's KV budget"}
        if high >= max_replicas:
            return {"metric": key, "target_s": target_s, "replicas": None, "tried": _named(tried),
                    "note": f"not met with {max_replicas} replicas (--plan-max)"}
        low, high = high, min(2 * high, max_replicas)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if meets(middle) else (middle, high)
    return {"metric": key, "target_s": target_s, "replicas": high, f"{key}_at_replicas": tried[high],
            "tried": _named(tried)}


def _named(tried: dict[int, float | None]) -> dict[str, float | None]:
    """Replica counts tried -> the p95 each gave (None: requests were refused), for JSON."""
    return {str(n): v for n, v in sorted(tried.items())}
