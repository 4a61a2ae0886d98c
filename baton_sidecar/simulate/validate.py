"""Predicted against measured: replay bench runs in the simulator and compare their latencies.

    python -m baton_sidecar.simulate.validate /tmp/bench/trace-0.5 /tmp/bench/trace-0.8 [--json OUT]

For every engine run (``baton``, ``rtc``) in the given bench output directories, the
simulator replays that run's own requests at the times they were submitted
(``requests.json``) and its prediction is set against what the bench measured
(``result.json``), with two cost models:

- ``shared``: one model fitted from every step of every directory given, the same for all
  loads and systems;
- ``own``: a model fitted from that run's steps alone, which takes out the machine's drift
  between runs on a shared CPU.

The last column is that drift: the run's measured step time over what the shared model
predicts for the same steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..bench.metrics import SLO
from ..config import Limits, PolicyConfig
from . import cost as costs
from .cluster import simulate, system
from .metrics import summarize
from .workload import from_requests_json

ENGINE_SYSTEMS = ("baton", "rtc")


def engine_runs(directory: Path) -> list[tuple[str, str, float | None, dict[str, Any]]]:
    """(label, system, load, measured summary) of each engine run of a bench output directory."""
    result = json.loads((directory / "result.json").read_text())
    points = [(f"@{load}", point.get("load"), point["systems"]) for load, point in (result.get("loads") or {}).items()]
    if not points:
        points = [("", (result.get("workload") or {}).get("load"), result["systems"])]
    return [(f"{name}{suffix}", name, load, summary) for suffix, load, systems in points
            for name, summary in systems.items() if name in ENGINE_SYSTEMS]


def bench_policy(directory: Path) -> PolicyConfig:
    """The limits the bench ran with (result.json's ``policy``); everything else the default."""
    limits = json.loads((directory / "result.json").read_text()).get("policy") or {}
    return PolicyConfig(limits=Limits(**{k: v for k, v in limits.items() if k in Limits.__dataclass_fields__}))


def compare(directories: list[Path]) -> list[dict[str, Any]]:
    steps = {f"{d.name}/{label}": entries for d in directories
             for label, entries in json.loads((d / "steps.json").read_text()).items()}
    shared = costs.fit_steps(steps, ", ".join(str(d) for d in directories))
    rows = []
    for directory in directories:
        policy = bench_policy(directory)
        for label, name, load, measured in engine_runs(directory):
            workload = from_requests_json(directory / "requests.json", label)
            own = costs.fit_steps({label: steps[f"{directory.name}/{label}"]})
            entries = [e for e in steps[f"{directory.name}/{label}"] if e.get("rows") or e.get("prefill_tokens")]
            slowdown = (sum(e["step_s"] for e in entries)
                        / sum(shared.work_seconds(costs.step_work(e)) for e in entries))
            row = {"run": directory.name, "system": name, "load": load,
                   "measured_e2e_p95_s": measured["e2e_p95_s"], "measured_ttft_p95_s": measured["ttft_p95_s"],
                   "steps_time_vs_shared_model": slowdown}
            for which, model in (("shared", shared), ("own", own)):
                predicted = summarize(simulate(workload, system(name, policy), model), SLO())
                row[f"{which}_e2e_p95_s"] = predicted["e2e_p95_s"]
                row[f"{which}_ttft_p95_s"] = predicted["ttft_p95_s"]
                row[f"{which}_e2e_p95_error"] = predicted["e2e_p95_s"] / measured["e2e_p95_s"] - 1
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directories", nargs="+", type=Path, help="bench output directories (--out)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = compare(args.directories)
    print("| run | system | load | measured E2E p95 s | shared model | error | own run's model | error | "
          "run's steps / shared model |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['system']} | {r['load'] or '-'} | {r['measured_e2e_p95_s']:.2f} | "
              f"{r['shared_e2e_p95_s']:.2f} | {r['shared_e2e_p95_error']:+.0%} | {r['own_e2e_p95_s']:.2f} | "
              f"{r['own_e2e_p95_error']:+.0%} | {r['steps_time_vs_shared_model']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
