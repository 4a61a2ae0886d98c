"""The simulator against the real engine: the tiny model serves a workload, a cost model is
fitted from the steps it recorded, and the simulator replays the same requests.

Each system's cost model is fitted from its own run: the machine these tests share speeds up
and slows down between runs, and the question here is whether the simulator, given the
engine's step costs, reproduces what the engine did with them (batches formed, prompts
joined, answers held). The bench-scale comparison is in docs/simulator.md.
"""

from __future__ import annotations

import random

import pytest

from baton_sidecar.bench.metrics import SLO
from baton_sidecar.bench.metrics import summarize as bench_summary
from baton_sidecar.bench.systems import EngineSystem
from baton_sidecar.bench.workloads import BenchRequest, Workload
from baton_sidecar.config import EngineConfig, PolicyConfig
from baton_sidecar.simulate.cluster import simulate, system
from baton_sidecar.simulate.cost import fit_steps
from baton_sidecar.simulate.metrics import summarize
from baton_sidecar.simulate.workload import from_bench
from tiny import VOCAB

TOLERANCE = 0.35  # |predicted / measured - 1|; on a quiet machine they agree within a few percent


def bursts(seed: int = 0, sizes: tuple[int, ...] = (8, 24), every_s: float = 0.04) -> Workload:
    """Bursts of requests, ``every_s`` apart. The second arrives while the first batch runs
    (a step takes ~2 ms on the tiny model, the first batch ~100 ms): rtc holds it for a second
    batch, baton lets it join at once. The margins both ways (40 ms for a late engine start,
    60 ms for the first batch) keep the batches the same on a busy machine."""
    rng = random.Random(seed)
    requests = []
    for burst, size in enumerate(sizes):
        for _ in range(size):
            prompt = tuple(rng.randrange(2, VOCAB) for _ in range(rng.randint(8, 96)))
            requests.append(BenchRequest(len(requests), prompt, rng.randint(16, 64), arrival_s=burst * every_s))
    return Workload("bursts", requests)


@pytest.mark.parametrize("name", ["baton", "rtc"])
def test_predicted_e2e_p95_agrees_with_the_engine(tiny_model, name):
    workload, policy = bursts(), PolicyConfig()
    config = EngineConfig(batching="rebatch" if name == "baton" else "run_to_completion", decode_row_padding="off")
    run = EngineSystem(name, tiny_model, config, policy, use_features=False).run(workload, lambda tokens: None)
    measured = bench_summary(run.records, SLO())
    assert measured["completed"] == len(workload.requests)

    model = fit_steps({name: run.steps})
    predicted = summarize(simulate(from_bench(workload), system(name, policy), model), SLO())
    assert predicted["completed"] == len(workload.requests)
    for key in ("ttft_p95_s", "e2e_p50_s", "e2e_p95_s"):
        assert abs(predicted[key] / measured[key] - 1) <= TOLERANCE, (name, key, predicted[key], measured[key])
    assert predicted["steps"] == pytest.approx(len(run.steps), rel=0.15)
