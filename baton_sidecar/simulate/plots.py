"""The before-the-pilot guide's two pictures, from recorded results (``make pilot-plots``).

- predicted against measured E2E p95 by load: ``validate.py --json`` rows (real bench runs and
  the simulator's prediction of each, with the run's own cost model and the shared one);
- replicas needed against request rate: a ``simulate ... --plan-p95 X --json`` result.

Usage::

    python -m baton_sidecar.simulate.plots docs/data/pilot-validation.json docs/data/pilot-planning.json --out docs/img
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLOURS = {"baton": "tab:blue", "rtc": "tab:red", "cb": "tab:green"}


def plot_validation(rows: list[dict], out: Path) -> Path:
    """One panel per workload: measured E2E p95 (dots) and predicted (own model: line; shared: dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({r["run"].rsplit("-", 1)[0] for r in rows if r.get("load")})
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 3.6), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        for system in sorted({r["system"] for r in rows}):
            mine = sorted((r for r in rows if r["run"].startswith(workload + "-") and r["system"] == system),
                          key=lambda r: float(r["load"]))
            if not mine:
                continue
            loads = [float(r["load"]) for r in mine]
            colour = COLOURS.get(system)
            ax.plot(loads, [r["measured_e2e_p95_s"] for r in mine], "o", color=colour, label=f"{system} measured")
            ax.plot(loads, [r["own_e2e_p95_s"] for r in mine], "-", color=colour, label=f"{system} simulated")
            ax.plot(loads, [r["shared_e2e_p95_s"] for r in mine], ":", color=colour,
                    label=f"{system} simulated, shared model")
        ax.set_title(f"{workload}: E2E p95, measured vs simulated")
        ax.set_xlabel("load (share of run-to-completion capacity)")
        ax.set_ylabel("E2E p95 (s)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = out / "pilot-validation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_replicas(result: dict, out: Path) -> Path:
    """Replicas needed for the planned p95 target at each rate, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import matplotlib.ticker  # noqa: F401  (used through matplotlib.ticker)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    target = None
    for system in COLOURS:
        points = [(p["rate_req_per_s"], p["systems"][system]["replicas_needed"])
                  for p in result["points"] if system in p["systems"]]
        points = [(rate, needed["replicas"]) for rate, needed in points if needed and needed.get("replicas")]
        if not points:
            continue
        target = target or next(p["systems"][system]["replicas_needed"]["target_s"] for p in result["points"]
                                if system in p["systems"])
        ax.plot(*zip(*points), "o-", color=COLOURS[system], label=system)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers, not powers of two
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xticks([p["rate_req_per_s"] for p in result["points"]])
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("replicas needed")
    ax.set_title(f"replicas for E2E p95 <= {target:g} s")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    path = out / "pilot-replicas.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m baton_sidecar.simulate.plots", description=__doc__)
    parser.add_argument("validation", type=Path, help="validate.py --json output")
    parser.add_argument("planning", type=Path, help="simulate --plan-p95 --json output")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(plot_validation(json.loads(args.validation.read_text()), args.out))
    print(plot_replicas(json.loads(args.planning.read_text()), args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
