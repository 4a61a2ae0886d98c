"""``baton-sidecar simulate``: what-if runs of the engine's scheduler on simulated time.

Usage (see docs/simulator.md)::

    baton-sidecar simulate trace --cost-model gpu --systems baton,rtc,cb --replicas 4 --load 0.5,0.8 --json out.json
    baton-sidecar simulate requests bench-out/trace/requests.json --run baton --cost-model bench-out/trace/steps.json
    baton-sidecar simulate trace -n 100000 --cost-model gpu --rate 40 --plan-p95 10

``add_simulate_arguments`` fills a parser; ``run_simulate(args)`` checks them, builds the
workload, the cost model, the systems and the cluster, runs every (load, system) and writes
the JSON; it returns an exit code (0 ok, 2 bad arguments or missing data).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..bench.metrics import SLO
from ..bench.workloads import ARENA_ANSWERS, ARENA_QUESTIONS, AZURE_CONV, WorkloadError, default_data_dir, parse_range
from ..config import PolicyConfig
from . import cost as costs
from . import workload as workloads
from .cluster import BALANCERS, SYSTEMS, Autoscale, Cluster, system
from .metrics import summarize
from .planning import METRICS, replicas_needed, rtc_capacity, run_cluster

WORKLOADS = ("trace", "offline", "poisson", "prompts", "jsonl", "requests")
MODELS_DIR = Path(__file__).parent / "models"
SHIPPED = {"cpu": "cpu-smollm2-135m.json", "gpu": "gpu-llama3-8b-h100.json"}


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workload", choices=WORKLOADS,
                        help="trace [CSV]: Azure LLM trace (default: the shared conversation trace); offline / "
                             "poisson: uniform lengths; prompts [QUESTIONS]: Arena-Hard; jsonl FILE; requests "
                             "FILE: a bench run's requests.json (exact replay)")
    parser.add_argument("path", nargs="?", help="the trace CSV, JSONL, requests.json or Arena-Hard question file")
    g = parser.add_argument_group("workload")
    g.add_argument("--num-requests", "-n", type=int, help="requests (default: trace 10000, others 256; a trace "
                                                          "asked for more rows than it has is replayed end to end)")
    g.add_argument("--prompt-len", default="10:130", help="offline/poisson prompt tokens LO:HI")
    g.add_argument("--output-len", default="8:256", help="offline/poisson output tokens LO:HI")
    g.add_argument("--prompt-scale", type=float, default=8.0, help="trace: divide prompt lengths by this (8)")
    g.add_argument("--output-scale", type=float, help="trace: divide output lengths by this (4; prompts: 1)")
    g.add_argument("--max-prompt", type=int, default=512, help="cap on prompt tokens after scaling (512)")
    g.add_argument("--max-output", type=int, default=256, help="cap on output tokens after scaling (256)")
    g.add_argument("--trace-start", type=float, default=0.0, help="trace: start this many seconds in")
    g.add_argument("--run", help="requests: the run label to replay (default: the file's first)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--synthetic-fallback", action="store_true",
                   help="trace: a synthetic stand-in (the bench's) when the CSV is absent")
    g = parser.add_argument_group("systems and cost")
    g.add_argument("--cost-model", default="cpu",
                   help="a fitted model file, a bench run's steps.json (fitted now), or a shipped model: "
                        f"{', '.join(f'{k} ({v})' for k, v in SHIPPED.items())} (default cpu)")
    g.add_argument("--save-cost-model", type=Path, help="write the cost model used (fitted) to this file")
    g.add_argument("--systems", default="baton,rtc,cb", help=f"comma-separated: {', '.join(SYSTEMS)}")
    g.add_argument("--policy", type=Path, help="a policy file (YAML or JSON, docs/config.md's policy block)")
    g.add_argument("--max-batch-size", type=int)
    g.add_argument("--max-kv-tokens", type=int)
    g.add_argument("--max-prefill-tokens", type=int)
    g.add_argument("--max-queue", type=int)
    g.add_argument("--max-step-ms", type=float, help="step-time target of the time prefill budget")
    g.add_argument("--exact", action="store_true", help="no bulk decode: every step through the scheduler")
    g.add_argument("--workers", type=int, default=1,
                   help="processes for a round-robin cluster without autoscaling (its replicas never interact; "
                        "the answers are the same)")
    g = parser.add_argument_group("load and cluster")
    g.add_argument("--load", help="offered loads, fractions of the cluster's rtc capacity (replicas x one "
                                  "replica's, simulated), comma-separated")
    g.add_argument("--rate", help="offered rates, requests/s, comma-separated (instead of --load)")
    g.add_argument("--replicas", type=int, default=1)
    g.add_argument("--balancer", choices=BALANCERS, default="round_robin")
    g.add_argument("--autoscale-target", type=float, help="add replicas while waiting requests per replica exceed this")
    g.add_argument("--autoscale-max", type=int, default=64, help="autoscaling: replicas at most (64)")
    g.add_argument("--startup-s", type=float, default=60.0, help="autoscaling: a new replica's start-up (60 s)")
    g.add_argument("--autoscale-interval", type=float, default=15.0, help="autoscaling: seconds between checks (15)")
    g = parser.add_argument_group("objectives and planning")
    g.add_argument("--slo-ttft", type=float, default=2.0, help="goodput TTFT objective, s (2; 0 = none)")
    g.add_argument("--slo-tpot", type=float, default=0.5, help="goodput TPOT objective, s (0.5; 0 = none)")
    g.add_argument("--slo-e2e", type=float, default=0.0, help="goodput E2E objective, s (none)")
    g.add_argument("--plan-p95", type=float, help="also find the replicas needed for p95 <= this many seconds at "
                                                  "each rate")
    g.add_argument("--plan-metric", choices=METRICS, default="e2e")
    g.add_argument("--plan-max", type=int, default=256, help="planning: replicas at most (256)")
    g.add_argument("--json", type=Path, help="write the results here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton-sidecar simulate", description=__doc__.split("\n\n")[0])
    add_simulate_arguments(parser)
    return parser


# --- inputs ----------------------------------------------------------------------------------------

def cost_model_path(text: str) -> Path:
    return MODELS_DIR / SHIPPED[text] if text in SHIPPED else Path(text)


def load_policy(args: argparse.Namespace, path: Path) -> PolicyConfig:
    """The policy file (or the defaults), the cost model's suggested limits, then the flags."""
    data: dict[str, Any] = {}
    if args.policy:
        import yaml

        try:
            data = yaml.safe_load(args.policy.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"--policy: {args.policy} is not YAML or JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(f"--policy: {args.policy} must hold a mapping")
        data = data.get("policy", data)
    suggested = costs.suggested_policy(path) or {}
    limits = {**(suggested.get("limits") or {}), **(data.get("limits") or {})}
    for name in ("max_batch_size", "max_kv_tokens", "max_prefill_tokens", "max_queue"):
        if getattr(args, name) is not None:
            limits[name] = getattr(args, name)
    data = {**data, "limits": limits}
    if args.max_step_ms is not None:
        data["max_step_ms"] = args.max_step_ms
    return PolicyConfig.from_dict(data)


def load_workload(args: argparse.Namespace) -> workloads.SimWorkload:
    kind, n, data_dir = args.workload, args.num_requests, default_data_dir()
    if kind == "trace":
        path = Path(args.path) if args.path else data_dir / AZURE_CONV
        if not path.is_file() and not args.synthetic_fallback:
            raise WorkloadError(f"trace file {path} is absent; pass --synthetic-fallback for a synthetic stand-in")
        rows, origin = workloads.trace_rows(path if path.is_file() else None, n or 10000)
        return workloads.trace(rows, n or 10000, prompt_scale=args.prompt_scale,
                               output_scale=args.output_scale or 4.0, max_prompt=args.max_prompt,
                               max_output=args.max_output, start_s=args.trace_start, origin=origin)
    if kind in ("offline", "poisson"):  # poisson: at 1 req/s, rescaled to --rate / --load
        return workloads.uniform(n or 256, parse_range(args.prompt_len, "--prompt-len"),
                                 parse_range(args.output_len, "--output-len"), 1.0 if kind == "poisson" else None,
                                 args.seed)
    if kind == "requests":
        if not args.path:
            raise WorkloadError("requests needs a FILE argument (a bench run's requests.json)")
        workload = workloads.from_requests_json(args.path, args.run)
        return workload.head(n) if n else workload
    return workloads.from_bench(_bench_workload(args, kind, n or 256, data_dir))


def _bench_workload(args: argparse.Namespace, kind: str, n: int, data_dir: Path):
    """``prompts`` and ``jsonl`` through the bench's loaders (they need the default model's tokenizer)."""
    from ..bench.runner import _load_tokenizer
    from ..bench.workloads import arena_workload, jsonl_workload
    from ..config import EngineConfig

    tokenizer = _load_tokenizer(EngineConfig())
    if kind == "jsonl":
        if not args.path:
            raise WorkloadError("jsonl needs a FILE argument")
        return jsonl_workload(Path(args.path), tokenizer, len(tokenizer))
    questions = Path(args.path) if args.path else data_dir / ARENA_QUESTIONS
    return arena_workload(questions, questions.parent / ARENA_ANSWERS, tokenizer, num_requests=n,
                          output_scale=args.output_scale or 1.0, max_prompt=args.max_prompt,
                          max_output=args.max_output, seed=args.seed)


def _floats(text: str | None, name: str) -> list[float]:
    if not text:
        return []
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected numbers like 0.5,0.8, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{name}: values must be > 0")
    return values


def validate(args: argparse.Namespace) -> None:
    for name in ("num_requests", "replicas", "max_batch_size", "max_kv_tokens", "max_prefill_tokens", "max_queue",
                 "plan_max", "autoscale_max", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1")
    if not [name for name in args.systems.split(",") if name.strip()]:
        raise ValueError("--systems: name at least one")
    if args.load and args.rate:
        raise ValueError("--load and --rate: give one")
    if args.plan_p95 is not None and args.plan_p95 <= 0:
        raise ValueError("--plan-p95: must be > 0 s")


# --- the run -------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    validate(args)
    path = cost_model_path(args.cost_model)
    model = costs.load(path)
    if args.save_cost_model:
        costs.save(model, args.save_cost_model)
    policy = load_policy(args, path)
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    systems = {name: system(name, policy) for name in names}
    base = load_workload(args)
    autoscale = (Autoscale(args.autoscale_target, args.autoscale_max, args.startup_s, args.autoscale_interval)
                 if args.autoscale_target else None)
    cluster = Cluster(args.replicas, args.balancer, autoscale)
    slo = SLO(args.slo_ttft or None, args.slo_tpot or None, args.slo_e2e or None)
    result: dict[str, Any] = {
        "cost_model": {"path": str(path), **model.as_dict()}, "policy": policy.to_dict(),
        "workload": base.summary(), "cluster": {"replicas": cluster.replicas, "balancer": cluster.balancer,
                                               "autoscale": vars(autoscale) if autoscale else None},
        "slo": slo.as_dict(), "points": []}
    rates = [(None, r) for r in _floats(args.rate, "--rate")]
    loads = _floats(args.load, "--load")
    if loads:
        capacity = rtc_capacity(base, systems.get("baton") or next(iter(systems.values())), model)
        result["rtc_capacity_req_per_s"] = {"one_replica": capacity, "cluster": capacity * cluster.replicas,
                                            "source": "simulated: rtc, the first 256 requests at t=0"}
        rates = [(load, load * capacity * cluster.replicas) for load in loads]
    for load, rate in rates or [(None, None)]:
        workload = base.at_rate(rate, args.seed) if rate else base
        point: dict[str, Any] = {"load": load, "rate_req_per_s": rate or workload.offered_rate, "systems": {}}
        for name, sys_ in systems.items():
            summary = summarize(run_cluster(workload, sys_, model, cluster, not args.exact, args.workers), slo)
            if args.plan_p95:
                summary["replicas_needed"] = replicas_needed(workload, sys_, model, cluster, metric=args.plan_metric,
                                                             target_s=args.plan_p95, max_replicas=args.plan_max,
                                                             workers=args.workers)
            point["systems"][name] = summary
        result["points"].append(point)
    return result


def print_report(result: dict[str, Any]) -> None:
    w = result["workload"]
    model = result["cost_model"]
    print(f"workload {w['name']}: {w['num_requests']} requests, prompt mean {w['prompt_tokens_mean']:.0f}, "
          f"output mean {w['output_tokens_mean']:.0f} tokens")
    print(f"cost model {model['path']}: {costs.describe(costs.StepCost(**{k: model[k] for k in costs.FIELDS}))}")
    print(f"{'load':>5} {'rate':>8} {'system':>6} {'req/s':>8} {'tok/s':>9} {'TTFT p50':>9} {'p95':>8} {'p99':>8} "
          f"{'E2E p50':>8} {'p95':>8} {'p99':>8} {'goodput':>7} {'refused':>7} {'replicas':>8} {'needed':>6} {'wall s':>6}")
    for point in result["points"]:
        for name, s in point["systems"].items():
            needed = (s.get("replicas_needed") or {}).get("replicas", "")
            print(f"{_f(point['load'], '{:.2f}'):>5} {_f(point['rate_req_per_s'], '{:.3f}'):>8} {name:>6} "
                  f"{_f(s['requests_per_s'], '{:.3f}'):>8} {_f(s['output_tokens_per_s'], '{:.1f}'):>9} "
                  + " ".join(f"{_f(s[k], '{:.2f}'):>8}" for k in ("ttft_p50_s", "ttft_p95_s", "ttft_p99_s",
                                                                 "e2e_p50_s", "e2e_p95_s", "e2e_p99_s"))
                  + f" {s['goodput_fraction']:>7.2f} {sum(s['refused'].values()):>7} {s['replicas_final']:>8} "
                  f"{str(needed):>6} {s['simulator_wall_s']:>6.1f}")


def _f(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def run_simulate(args: argparse.Namespace) -> int:
    try:
        result = run(args)
    except (ValueError, WorkloadError, OSError) as error:
        print(f"simulate: {error}", file=sys.stderr)
        return 2
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"results: {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_simulate(build_parser().parse_args(argv))


__all__ = ["add_simulate_arguments", "build_parser", "run_simulate", "main"]
