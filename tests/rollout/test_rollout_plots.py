"""The operator guide's rollout pictures: drawn from the recorded end-to-end runs (docs/data), whose
rounds must be the ones the status kept, on the steps the history shows."""

from __future__ import annotations

import importlib.util
import json

import pytest

from rollout_testlib import ROOT

DATA = ROOT / "docs" / "data"


def load_script():
    spec = importlib.util.spec_from_file_location("rollout_plots", ROOT / "scripts" / "rollout_plots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("scenario, final_weight", [("promote", 100), ("rollback", 0)])
def test_recorded_rollouts_draw_weight_and_p95_with_cis(scenario, final_weight, tmp_path) -> None:
    plots = load_script()
    recording = json.loads((DATA / f"rollout-{scenario}.json").read_text())
    data = plots.series(recording["rollout"])
    assert data["steps"][0][0] == 0 and data["steps"][-1][1] == final_weight
    step_weights = {w for _, w, _ in data["steps"]}
    for arm in ("baton", "incumbent"):
        points = data["arms"][arm]
        assert points, f"no rounds for {arm}"
        for t, p95, low, high, result in points:
            assert t >= 0 and low <= p95 <= high and result in ("pass", "fail", "inconclusive")
    assert {r["weight"] for r in recording["rollout"]["analyses"]} <= step_weights
    path = plots.plot(recording, tmp_path)
    assert path.name == f"rollout-{scenario}.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
