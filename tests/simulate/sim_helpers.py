"""Small workloads and cost models for the simulator's tests (no model, no files)."""

from __future__ import annotations

import numpy as np

from baton_sidecar.config import Limits, PolicyConfig, PreemptionPolicy
from baton_sidecar.simulate.cost import StepCost
from baton_sidecar.simulate.workload import SimWorkload

# Round numbers, so expected times can be written down by hand.
COST = StepCost(forward_s=0.010, row_s=0.001, pair_s=1e-6, token_s=0.0001, gap_s=0.0005, wake_s=0.005)


def workload(arrivals, prompts, outputs, priorities=None) -> SimWorkload:
    return SimWorkload("test", np.array(arrivals, dtype=float), np.array(prompts, dtype=np.int64),
                       np.array(outputs, dtype=np.int64),
                       None if priorities is None else np.array(priorities, dtype=np.int64))


def random_workload(seed: int, n: int = 120, rate: float = 30.0, priorities: bool = False,
                    prompt=(5, 300), output=(1, 120)) -> SimWorkload:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    arrivals[: n // 6] = arrivals[0]  # a burst at the start
    return workload(arrivals, rng.integers(*prompt, n), rng.integers(*output, n),
                    rng.choice([0, 5, 10], n) if priorities else None)


def policy(preemption: str = "swap", **limits) -> PolicyConfig:
    return PolicyConfig(limits=Limits(**limits), preemption=PreemptionPolicy(mode=preemption))
