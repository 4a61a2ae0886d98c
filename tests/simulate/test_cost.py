"""The step cost model: fitting, reading bench files, the shipped models, the budget's view."""

from __future__ import annotations

import json
import random

import pytest

from baton_sidecar.engine.budget import HEADROOM, StepBudget
from baton_sidecar.engine.step_cost import FORWARD, decode_shape, prompt_shape
from baton_sidecar.simulate import cost as costs
from baton_sidecar.simulate.cli import MODELS_DIR, SHIPPED
from baton_sidecar.simulate.cost import SchedulerCost, StepCost, StepWork

TRUE = StepCost(forward_s=0.050, row_s=0.004, pair_s=5e-6, token_s=0.003, gap_s=0.0002)


def steps_json(n: int = 300, seed: int = 0, noise: float = 0.0) -> list[dict]:
    """``steps.json`` entries of an engine whose steps cost exactly ``TRUE`` (times ``1 + noise``)."""
    rng = random.Random(seed)
    t, entries = 0.0, []
    for _ in range(n):
        rows, length = rng.randint(0, 32), rng.randint(20, 600)
        prompt = rng.choice([0, 0, 0, rng.randint(1, 512)])
        fused = bool(prompt and rows and rng.random() < 0.5)
        work = costs.step_work({"rows": rows, "length": length, "prefill_tokens": prompt, "fused": fused})
        seconds = TRUE.work_seconds(work) * (1 + rng.uniform(-noise, noise))
        if not (rows or prompt):
            continue
        t += TRUE.gap_s + seconds
        entries.append({"t": t, "step_s": seconds, "rows": rows, "length": length, "prefill_tokens": prompt,
                        "prefill_s": 0.0 if fused else 0.01, "fused": fused})
    return entries


def test_fit_recovers_the_coefficients_and_the_loop_gap():
    model = costs.fit_steps({"baton": steps_json()})
    for name in costs.COEFFICIENTS:
        assert getattr(model, name) == pytest.approx(getattr(TRUE, name), rel=1e-6)
    assert model.gap_s == pytest.approx(TRUE.gap_s)
    assert model.source["fit"]["median_relative_error"] < 1e-9


def test_fit_keeps_total_time_under_noise_and_a_stall_does_not_bend_it():
    entries = steps_json(noise=0.3, seed=1)
    calm = costs.fit_steps({"baton": [dict(e) for e in entries]})
    entries[5]["step_s"] *= 20  # the machine stalled
    model = costs.fit_steps({"baton": entries})
    assert model.source["fit"]["outliers_left_out"] >= 1
    predicted = sum(model.work_seconds(costs.step_work(e)) for e in entries)
    assert predicted == pytest.approx(sum(e["step_s"] for e in entries), rel=1e-9)  # the stall's time included
    ratios = [getattr(model, name) / getattr(calm, name) for name in costs.COEFFICIENTS]
    assert max(ratios) / min(ratios) < 1.02  # spread over every coefficient alike, not into one


def test_step_work_reads_fused_separate_and_older_entries():
    assert costs.step_work({"rows": 4, "length": 9, "prefill_tokens": 30, "fused": True}) == StepWork(1, 4, 9, 30)
    assert costs.step_work({"rows": 4, "length": 9, "prefill_tokens": 30, "fused": False}) == StepWork(2, 4, 9, 30)
    assert costs.step_work({"rows": 0, "length": 0, "prefill_tokens": 30}) == StepWork(1, 0, 0, 30)
    # Before the ``fused`` key: prompts with no prefill time of their own rode in the decode forward.
    assert costs.step_work({"rows": 2, "length": 9, "prefill_tokens": 8, "prefill_s": 0.0}).forwards == 1
    assert costs.step_work({"rows": 2, "length": 9, "prefill_tokens": 8, "prefill_s": 0.3}).forwards == 2


def test_load_reads_a_model_file_or_a_steps_json_and_names_bad_input(tmp_path):
    path = tmp_path / "model.json"
    costs.save(TRUE, path)
    assert costs.load(path).as_dict() == TRUE.as_dict()
    (tmp_path / "steps.json").write_text(json.dumps({"baton": steps_json()}))
    assert costs.load(tmp_path).row_s == pytest.approx(TRUE.row_s, rel=1e-6)  # a bench output directory
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "something else"}))
    for bad in (tmp_path / "bad.json", tmp_path / "absent.json"):
        with pytest.raises(ValueError, match="--cost-model"):
            costs.load(bad)
    with pytest.raises(ValueError, match="row_s"):
        StepCost(forward_s=0.1, row_s=-1, pair_s=0, token_s=0)


def test_the_budget_asks_the_fitted_model_through_scheduler_cost():
    """``StepBudget`` predicts shapes with the decode rows inside; ``SchedulerCost`` must price
    them exactly as the simulated step will be priced."""
    adapter = SchedulerCost(TRUE)
    rows, context = 12, 340
    adapter.set_batch(rows, context)
    for fused in (True, False):
        base = FORWARD + decode_shape(rows, context)
        prompt = prompt_shape(0, 100, True)
        shape = base + prompt if fused else base + FORWARD + prompt
        assert adapter.predict(shape) == pytest.approx(TRUE.seconds(1 + (not fused), rows, context, 100))
    target = (TRUE.seconds(1, rows, context, 200) + 1e-12) / HEADROOM  # 200 prompt tokens just fit
    budget = StepBudget(512, adapter, target_s=target, rows=rows, context=context, fused=True)
    assert budget.room(0, 400).count == 200  # the largest prompt part the step-time target allows


def test_shipped_models_load_and_the_gpu_model_is_its_published_observations_fitted():
    for name in SHIPPED.values():
        model = costs.load(MODELS_DIR / name)
        assert model.forward_s > 0 and model.source
    data = json.loads((MODELS_DIR / SHIPPED["gpu"]).read_text())
    assert "PUBLISHED" in data["source"]["what"] and data["source"]["numbers_from"].startswith("https://")
    observed = data["observations"]
    refit = costs.fit([StepWork(o["forwards"], o["rows"], o["context"], o["prompt_tokens"]) for o in observed],
                      [o["seconds"] for o in observed], data["gap_s"], data["fixed"])
    for name in costs.COEFFICIENTS:
        assert getattr(refit, name) == pytest.approx(data[name], rel=1e-9)
    assert costs.suggested_policy(MODELS_DIR / SHIPPED["gpu"])["limits"]["max_batch_size"] == 256
