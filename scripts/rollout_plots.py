"""The operator guide's rollout pictures, from recorded runs (``make docs-plots``).

A recording is what ``tests/rollout/test_rollout_e2e.py`` writes with ``BATON_RECORD_ROLLOUTS=DIR``:
``{"scenario", "rollout": status.rollout}``. The picture has two panels over the seconds since the
rollout started: Baton's traffic weight (a step line, from ``history``), and each arm's e2e p95 with its
95% CI as error bars, one point per analysis round (``analyses``), marked by whether the round passed.

Usage::

    python scripts/rollout_plots.py docs/data/rollout-promote.json docs/data/rollout-rollback.json --out docs/img
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any

COLOURS = {"baton": "tab:blue", "incumbent": "tab:orange"}


def seconds(stamp: str, start: datetime.datetime) -> float:
    moment = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return (moment - start).total_seconds()


def series(rollout: dict[str, Any]) -> dict[str, Any]:
    """Plot-ready data: the weight's steps and each arm's rounds, in seconds since the first step."""
    history = rollout["history"]
    start = datetime.datetime.fromisoformat(history[0]["time"].replace("Z", "+00:00"))
    steps = [(seconds(h["time"], start), h["weight"], h["action"]) for h in history]
    arms: dict[str, list[tuple[float, float, float, float, str]]] = {arm: [] for arm in COLOURS}
    for entry in rollout.get("analyses") or []:
        for arm, point in (entry.get("arms") or {}).items():
            if "p95" in point:
                low, high = point["ci95"]
                arms[arm].append((seconds(entry["time"], start), point["p95"], low, high, entry["result"]))
    return {"steps": steps, "arms": arms}


def plot(recording: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(recording["rollout"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, gridspec_kw={"height_ratios": [1, 2]})
    end = max([t for t, *_ in data["steps"]] + [p[0] for points in data["arms"].values() for p in points]) + 5
    times = [t for t, _, _ in data["steps"]] + [end]
    weights = [w for _, w, _ in data["steps"]]
    top.step(times, weights + weights[-1:], where="post", color="tab:blue")
    for t, w, action in data["steps"]:
        top.annotate(action, (t, w), textcoords="offset points", xytext=(2, 4), fontsize=8)
    top.set_ylabel("Baton weight (%)")
    top.set_ylim(-5, 110)
    for offset, (arm, points) in zip((-0.15, 0.15), data["arms"].items()):  # side by side, not on top
        if not points:
            continue
        t, p95, low, high, results = zip(*points)
        t = [x + offset for x in t]
        errors = [[v - lo for v, lo in zip(p95, low)], [hi - v for v, hi in zip(p95, high)]]
        bottom.errorbar(t, p95, yerr=errors, fmt="o", color=COLOURS[arm], capsize=3, label=f"{arm} e2e p95 (95% CI)")
        failed = [(x, y) for x, y, r in zip(t, p95, results) if r == "fail"]
        if failed and arm == "baton":  # a round fails as a whole; marked once, on Baton's point
            bottom.plot(*zip(*failed), "x", color="tab:red", markersize=10, label="failed round")
    bottom.set_xlabel("seconds since the rollout started")
    bottom.set_ylabel("e2e latency p95 (s)")
    bottom.legend(fontsize=8)
    fig.suptitle(f"Rollout: {recording['scenario']} (phase {recording['rollout'].get('phase')})")
    fig.tight_layout()
    path = out / f"rollout-{recording['scenario']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recordings", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.recordings:
        print(plot(json.loads(path.read_text()), args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
