"""The before-the-pilot pictures regenerate from the recorded results in docs/data."""

from __future__ import annotations

import json
from pathlib import Path

from baton_sidecar.simulate import plots

DATA = Path(__file__).resolve().parents[2] / "docs" / "data"


def test_the_guides_pictures_regenerate_from_its_recorded_results(tmp_path):
    validation = json.loads((DATA / "pilot-validation.json").read_text())
    planning = json.loads((DATA / "pilot-planning.json").read_text())
    assert {r["system"] for r in validation} == {"baton", "rtc"} and len(validation) == 12
    # The guide's claim: with each run's own cost model, every prediction within 20% (15.4% at worst).
    assert max(abs(r["own_e2e_p95_error"]) for r in validation) <= 0.20
    assert plots.main([str(DATA / "pilot-validation.json"), str(DATA / "pilot-planning.json"),
                       "--out", str(tmp_path)]) == 0
    for name in ("pilot-validation.png", "pilot-replicas.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    needed = {p["rate_req_per_s"]: p["systems"]["rtc"]["replicas_needed"]["replicas"] for p in planning["points"]}
    assert needed == {10.0: 5, 20.0: 10, 40.0: 20, 80.0: 40}  # the guide's table
