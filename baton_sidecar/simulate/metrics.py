"""A simulation's numbers, named and defined as the bench's (``bench/metrics.py``).

- TTFT = first token - arrival; E2E = final answer - arrival (a run-to-completion batch
  answers each request when its longest row is done, as the engine does);
- TPOT = (E2E - TTFT) / (output tokens - 1): the bench's definition, whose last token comes
  with the final answer;
- throughput over the makespan (first arrival to last answer); goodput = answered requests
  that met every stated SLO, per second; ``goodput_fraction`` over every request, refused
  ones included.

Percentiles are numpy's "linear" ones, as ``baton_sidecar.stats`` computes them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..bench.metrics import SLO
from .cluster import Simulation

PERCENTILES = (50, 95, 99)


def distribution(prefix: str, values: np.ndarray) -> dict[str, float | None]:
    if not len(values):
        return {f"{prefix}_mean_s": None, **{f"{prefix}_p{q}_s": None for q in PERCENTILES}}
    points = np.percentile(values, PERCENTILES)
    return {f"{prefix}_mean_s": float(values.mean()),
            **{f"{prefix}_p{q}_s": float(v) for q, v in zip(PERCENTILES, points)}}


def summarize(sim: Simulation, slo: SLO) -> dict[str, Any]:
    w, o = sim.workload, sim.outcomes
    done = ~np.isnan(o.finished_s)
    ttft = (o.first_token_s - w.arrival_s)[done]
    e2e = (o.finished_s - w.arrival_s)[done]
    outputs = w.output_tokens[done]
    many = outputs > 1
    tpot = np.full(len(e2e), np.nan)
    tpot[many] = (e2e[many] - ttft[many]) / (outputs[many] - 1)
    makespan = float(o.finished_s[done].max() - w.arrival_s.min()) if done.any() else 0.0
    met = np.ones(len(e2e), dtype=bool)
    for limit, values in ((slo.ttft_s, ttft), (slo.tpot_s, tpot), (slo.e2e_s, e2e)):
        if limit is not None:
            met &= np.isnan(values) | (values <= limit)
    per_s = (lambda n: n / makespan if makespan > 0 else None)
    out: dict[str, Any] = {
        "num_requests": len(w),
        "completed": int(done.sum()),
        "refused": dict(o.refused),
        "duration_s": makespan,
        "output_tokens": int(outputs.sum()),
        "output_tokens_per_s": per_s(int(outputs.sum())),
        "requests_per_s": per_s(int(done.sum())),
        "goodput_req_per_s": per_s(int(met.sum())),
        "goodput_fraction": float(met.sum()) / len(w),
        "slo": slo.as_dict(),
        "preemptions": int(o.preemptions.sum()),
    }
    out.update(distribution("ttft", ttft))
    out.update(distribution("tpot", tpot[many]))
    out.update(distribution("e2e", e2e))
    out.update(sim.info())
    return out
