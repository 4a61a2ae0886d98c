"""How fast the simulator runs: a million requests of the Azure conversation trace.

    python -m baton_sidecar.simulate.speed                       # GPU model, 8 replicas, 60 req/s
    python -m baton_sidecar.simulate.speed --model cpu --replicas 64 --rate 20 --prompt-scale 8 --output-scale 4

Prints the simulator's wall and CPU seconds, the steps it simulated and how many of them
the scheduler planned (the rest were bulk decode), with the run's latency numbers, so a
change that slows the simulator or changes its answers shows. Numbers are in docs/simulator.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ..bench.metrics import SLO
from ..bench.workloads import AZURE_CONV, default_data_dir
from ..config import PolicyConfig
from . import cost as costs
from . import workload as workloads
from .cli import cost_model_path
from .cluster import BALANCERS, Cluster, system
from .metrics import summarize
from .planning import run_cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=1_000_000)
    parser.add_argument("--model", default="gpu", help="cpu, gpu or a cost model file (default gpu)")
    parser.add_argument("--system", default="baton")
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--balancer", choices=BALANCERS, default="round_robin")
    parser.add_argument("--rate", type=float, default=60.0, help="requests/s offered to the cluster")
    parser.add_argument("--prompt-scale", type=float, default=1.0)
    parser.add_argument("--output-scale", type=float, default=1.0)
    parser.add_argument("--exact", action="store_true", help="every step through the scheduler")
    parser.add_argument("--workers", type=int, default=1, help="processes (round robin: replica by replica)")
    args = parser.parse_args(argv)

    path = cost_model_path(args.model)
    model = costs.load(path)
    policy = PolicyConfig.from_dict({"limits": (costs.suggested_policy(path) or {}).get("limits") or {}})
    trace = default_data_dir() / AZURE_CONV
    rows, origin = workloads.trace_rows(trace if trace.is_file() else None, 20000)
    load_started = time.perf_counter()
    work = workloads.trace(rows, args.n, prompt_scale=args.prompt_scale, output_scale=args.output_scale,
                           max_prompt=8192, max_output=4096, origin=origin).at_rate(args.rate)
    built_s = time.perf_counter() - load_started
    cpu, wall = _cpu_s(), time.perf_counter()
    sim = run_cluster(work, system(args.system, policy), model, Cluster(args.replicas, args.balancer),
                      not args.exact, args.workers)
    wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
    s = summarize(sim, SLO())
    print(f"{args.n} requests ({Path(origin).name}, workload built in {built_s:.1f} s), {args.system} on "
          f"{args.replicas} replicas, {args.rate:g} req/s, cost model {path.name}, {args.workers} worker(s)")
    print(f"simulator: {wall:.1f} s wall, {cpu:.1f} s CPU ({args.n / wall:,.0f} requests/s); "
          f"{s['steps']:,} steps of which {s['planned_steps']:,} planned by the scheduler; "
          f"{s['duration_s']:,.0f} simulated seconds")
    print(f"results: completed {s['completed']:,}, refused {s['refused']}, TTFT p95 {s['ttft_p95_s']:.2f} s, "
          f"E2E p50 {s['e2e_p50_s']:.2f} s, p95 {s['e2e_p95_s']:.2f} s, p99 {s['e2e_p99_s']:.2f} s, "
          f"goodput {s['goodput_fraction']:.3f}")
    return 0


def _cpu_s() -> float:
    """CPU seconds of this process and its finished workers."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


if __name__ == "__main__":
    raise SystemExit(main())
