"""Replicas behind a load balancer, optionally autoscaled: the discrete-event loop.

Events are the workload's arrivals, in time order. Before an arrival at ``t`` is routed,
every replica runs the steps that start before ``t`` (a heap of replicas keyed by when each
next needs its scheduler, ``Replica.key``), so the balancer sees each replica as it is at
``t``; a step starting at or after ``t`` sees the new request. After the last arrival every
replica runs until it is idle.

- Balancers: ``round_robin`` (ready replicas in turn) and ``least_queue`` (fewest requests
  accepted and not answered; ties in turn).
- Autoscaling (``Autoscale``): every ``interval_s``, at the first arrival after it, if the
  requests waiting to start per ready replica exceed ``target_queue``, replicas are added as
  Kubernetes' HPA sizes them, ``ceil(ready * per_replica / target)``, up to ``max_replicas``;
  each takes ``startup_s`` before the balancer sends it anything. Replicas are never removed.
"""

from __future__ import annotations

import gc
import heapq
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..config import PolicyConfig, PrefillPolicy
from ..engine.admission import check_shape
from ..engine.request import AdmissionError, Request, RequestTimes, RequestValidationError
from .cost import StepCost
from .replica import PARAMS, Outcomes, Replica
from .workload import SimWorkload

SYSTEMS = ("baton", "rtc", "cb")
BALANCERS = ("round_robin", "least_queue")
UNBOUNDED_CONTEXT = 1 << 62


@dataclass(frozen=True)
class System:
    """A simulated engine configuration: the scheduler class and the policy it runs."""

    name: str
    batching: str  # EngineConfig.batching: "rebatch" | "run_to_completion"
    policy: PolicyConfig


def system(name: str, policy: PolicyConfig) -> System:
    """``baton``: re-batching with the policy as given (time budget, fused prompts by default).
    ``rtc``: run-to-completion (``RunToCompletionScheduler``).
    ``cb``: continuous batching without prefill/decode decoupling: the same re-batching scheduler
    with ``prefill: {budget: tokens, mode: separate}``: each step prefills whole prompts (up to
    ``max_prefill_tokens``) in a forward of their own before the decode forward, so every running
    row waits for them, and no step-time target sizes them."""
    if name == "baton":
        return System(name, "rebatch", policy)
    if name == "rtc":
        return System(name, "run_to_completion", policy)
    if name == "cb":
        return System(name, "rebatch", replace(policy, prefill=PrefillPolicy(budget="tokens", mode="separate")))
    raise ValueError(f"--systems: unknown system {name!r}; known: {', '.join(SYSTEMS)}")


@dataclass(frozen=True)
class Autoscale:
    target_queue: float  # waiting (not started) requests per ready replica that triggers a scale-up
    max_replicas: int
    startup_s: float = 60.0
    interval_s: float = 15.0

    def __post_init__(self) -> None:
        if self.target_queue <= 0 or self.max_replicas < 1 or self.startup_s < 0 or self.interval_s <= 0:
            raise ValueError("autoscale: target > 0, max replicas >= 1, start-up >= 0 s, interval > 0 s")


@dataclass(frozen=True)
class Cluster:
    replicas: int = 1
    balancer: str = "round_robin"
    autoscale: Autoscale | None = None

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("--replicas: must be >= 1")
        if self.balancer not in BALANCERS:
            raise ValueError(f"--balancer: must be one of {', '.join(BALANCERS)}")


@dataclass(frozen=True)
class ReplicaStats:
    index: int
    ready_at: float
    clock: float  # when it went idle for good
    steps: int
    planned: int  # steps the scheduler planned (the rest bulk decode)
    busy_s: float

    @classmethod
    def of(cls, replica: Replica) -> "ReplicaStats":
        return cls(replica.index, replica.ready_at, replica.clock, replica.steps, replica.planned, replica.busy_s)


@dataclass
class Simulation:
    """What one run produced: per-request outcomes and the cluster's history."""

    workload: SimWorkload
    system: System
    outcomes: Outcomes
    replicas: list[ReplicaStats]
    scale_events: list[dict[str, float]] = field(default_factory=list)
    wall_s: float = 0.0
    stopped: bool = False  # at the first refusal (``simulate(stop_at_refusal=True)``): outcomes incomplete

    def info(self) -> dict[str, Any]:
        horizon = max((r.clock for r in self.replicas), default=0.0)
        return {"replicas_final": len(self.replicas), "scale_events": self.scale_events,
                "steps": sum(r.steps for r in self.replicas),
                "planned_steps": sum(r.planned for r in self.replicas), "simulator_wall_s": self.wall_s,
                "busy_fraction": [round(r.busy_s / max(1e-9, horizon - r.ready_at), 4) for r in self.replicas]}


def make_request(i: int, arrival: float, prompt: int, output: int, priority: int | None, sla_class: str | None,
                 policy: PolicyConfig) -> Request:
    """Request ``i`` as ``AsyncEngine.submit`` would build it (priority and deadline from its
    SLA class, on the simulated clock)."""
    deadline = None
    if sla_class is not None:
        sla = policy.sla_classes.get(sla_class)
        if sla is None:
            raise ValueError(f"request {i}: unknown SLA class {sla_class!r}; known: {sorted(policy.sla_classes)}")
        priority = sla.priority if priority is None else priority
        deadline = arrival + sla.e2e_ms / 1000 if sla.e2e_ms is not None else None
    return Request(str(i), range(prompt), PARAMS, output, priority=priority or 0, sla_class=sla_class,
                   deadline=deadline, times=RequestTimes(arrival=arrival))


class Balancer:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.turn = 0

    def choose(self, ready: list[Replica], now: float) -> Replica:
        n = len(ready)
        start = self.turn % n
        self.turn += 1
        if self.kind == "round_robin":
            return ready[start]
        return min((ready[(start + j) % n] for j in range(n)), key=lambda r: r.outstanding(now))


def simulate(workload: SimWorkload, system: System, cost: StepCost, cluster: Cluster = Cluster(),
             fast: bool = True, stop_at_refusal: bool = False) -> Simulation:
    """Run ``workload`` through ``cluster.replicas`` engines of ``system`` (see the module docstring).

    ``stop_at_refusal``: stop at the first refused request (``Simulation.stopped``), for callers
    to whom a refusal already settles the question (``planning.replicas_needed``)."""
    collecting = gc.isenabled()
    gc.disable()  # millions of short-lived objects and no cycles among them: the collector only costs time
    try:
        return _simulate(workload, system, cost, cluster, fast, stop_at_refusal)
    finally:
        if collecting:
            gc.enable()


def _simulate(workload: SimWorkload, system: System, cost: StepCost, cluster: Cluster, fast: bool,
              stop_at_refusal: bool) -> Simulation:
    started = time.perf_counter()
    policy = system.policy
    outcomes = Outcomes(len(workload))
    # With one priority for all, no waiting request can ever preempt (bulk decode checks less).
    priorities_vary = (workload.priority is not None and len(np.unique(workload.priority)) > 1) \
        or workload.sla_class is not None

    replicas: list[Replica] = []
    versions: list[int] = []  # per replica: its live heap entry's version (older entries are stale)

    def new_replica(ready_at: float) -> Replica:
        replica = Replica(len(replicas), system.batching, policy, cost, outcomes, ready_at, priorities_vary, fast)
        replicas.append(replica)
        versions.append(0)
        return replica

    ready = [new_replica(0.0) for _ in range(cluster.replicas)]
    starting: list[Replica] = []
    heap: list[tuple[float, int, int]] = []
    balancer = Balancer(cluster.balancer)
    scale_events: list[dict[str, float]] = []
    next_check = cluster.autoscale.interval_s if cluster.autoscale else math.inf

    def push(replica: Replica) -> None:
        versions[replica.index] += 1
        key = replica.key()
        if key < math.inf:
            heapq.heappush(heap, (key, versions[replica.index], replica.index))

    def advance(until: float) -> None:
        while heap and heap[0][0] < until:
            _, version, index = heapq.heappop(heap)
            if version == versions[index]:
                replicas[index].run(until)
                push(replicas[index])

    # Plain Python columns: indexing numpy arrays a million times costs more than converting once.
    n = len(workload)
    priorities = [None] * n if workload.priority is None else workload.priority.tolist()
    classes = [None] * n if workload.sla_class is None else list(workload.sla_class)
    columns = zip(workload.arrival_s.tolist(), workload.prompt_tokens.tolist(), workload.output_tokens.tolist(),
                  priorities, classes)
    for i, (now, prompt, output, priority, sla_class) in enumerate(columns):
        advance(now)
        while starting and starting[0].ready_at <= now:
            ready.append(starting.pop(0))
        if now >= next_check:
            added = _scale(cluster.autoscale, ready, starting, now, new_replica)
            if added:
                scale_events.append({"t": now, "added": len(added), "ready_at": added[0].ready_at,
                                     "replicas": len(replicas)})
            next_check = (math.floor(now / cluster.autoscale.interval_s) + 1) * cluster.autoscale.interval_s
        request = make_request(i, now, prompt, output, priority, sla_class, policy)
        try:
            check_shape(request.num_prompt_tokens, request.max_tokens, UNBOUNDED_CONTEXT, policy.limits)
        except (AdmissionError, RequestValidationError):
            outcomes.refuse("too_large")
            if stop_at_refusal:
                break
            continue
        target = balancer.choose(ready, now)
        if target.submit(request, now):
            push(target)
        elif stop_at_refusal:
            break
    stopped = bool(outcomes.refused) and stop_at_refusal
    if not stopped:
        advance(math.inf)
    return Simulation(workload, system, outcomes, [ReplicaStats.of(r) for r in replicas], scale_events,
                      time.perf_counter() - started, stopped)


def _scale(autoscale: Autoscale, ready: list[Replica], starting: list[Replica], now: float,
           new_replica) -> list[Replica]:
    """Replicas to add now (HPA's rule on the waiting requests per ready replica)."""
    per_replica = sum(r.queued for r in ready) / len(ready)
    if per_replica <= autoscale.target_queue:
        return []
    desired = min(autoscale.max_replicas, math.ceil(len(ready) * per_replica / autoscale.target_queue))
    added = [new_replica(now + autoscale.startup_s)
             for _ in range(desired - len(ready) - len(starting))]
    starting.extend(added)
    return added
