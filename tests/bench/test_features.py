"""``--scenario features``: the feature assignment, the engine system applying it, the summary.

The tiny model runs ``n`` and penalties (its word-level vocabulary has no JSON punctuation);
the whole scenario, JSON schemas included, runs on the real model. No timing is asserted.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from baton_sidecar.bench import cli
from baton_sidecar.bench.inputs import WorkloadOptions
from baton_sidecar.bench.metrics import SLO, RequestRecord
from baton_sidecar.bench.plans import features
from baton_sidecar.bench.runner import Runner
from baton_sidecar.bench.systems import EngineSystem, SystemRun, request_params
from baton_sidecar.bench.workloads import BenchRequest, Features, TokenSource, Workload, offline_workload
from baton_sidecar.config import EngineConfig, Limits, PolicyConfig


def _base(n: int = 20) -> Workload:
    return offline_workload(TokenSource.synthetic(96, seed=1, size=2000), n, (3, 12), (2, 7), seed=2)


def test_assign_features_is_seeded_disjoint_and_keeps_the_requests():
    base = _base()
    mixed = features.assign_features(base, seed=3)
    assert mixed.requests == features.assign_features(base, seed=3).requests
    assert mixed.requests != features.assign_features(base, seed=4).requests
    kinds = [features.feature_class(r) for r in mixed.requests]
    assert {k: kinds.count(k) for k in features.CLASSES} == {"plain": 8, "json": 6, "n": 2, "penalties": 4}
    for before, after in zip(base.requests, mixed.requests):
        assert (after.prompt_token_ids, after.arrival_s) == (before.prompt_token_ids, before.arrival_s)
        kind = features.feature_class(after)
        if kind == "json":
            assert after.max_tokens == features.JSON_MAX_TOKENS and json.loads(after.features.json_schema)
        else:
            assert after.max_tokens == before.max_tokens
        assert after.choices == (features.N_CHOICES if kind == "n" else 1)
    assert mixed.total_output_tokens == sum(r.max_tokens * r.choices for r in mixed.requests)


def test_request_params_apply_the_features_only_when_asked():
    schema = features.SCHEMAS[0]
    json_row = BenchRequest(0, (5, 6), 40, features=Features("json", json_schema=schema))
    params = request_params(json_row)
    assert params.structured.kind == "json" and params.structured.spec == schema
    assert not params.ignore_eos and params.max_tokens == 40 and params.temperature == 0
    n_row = BenchRequest(1, (5,), 4, features=Features("n", n=3, temperature=0.8, seed=9))
    assert (request_params(n_row).n, request_params(n_row).temperature, request_params(n_row).seed) == (3, 0.8, 9)
    penalized = request_params(BenchRequest(2, (5,), 4, features=Features("penalties", **features.PENALTIES)))
    assert (penalized.presence_penalty, penalized.frequency_penalty, penalized.repetition_penalty) == (0.5, 0.3, 1.1)
    assert penalized.ignore_eos
    for request in (json_row, n_row):
        plain = request_params(request, features=False)
        assert plain.ignore_eos and plain.n == 1 and plain.structured is None and plain.temperature == 0


def test_engine_system_runs_choices_and_penalties_on_the_tiny_model(tiny_model):
    requests = [BenchRequest(0, (5, 6, 7), 6, features=Features("n", n=3, temperature=0.8, seed=1)),
                BenchRequest(1, (8, 9), 5, features=Features("penalties", **features.PENALTIES)),
                BenchRequest(2, (10, 11, 12), 4)]
    workload = Workload("t", requests)
    policy = PolicyConfig(limits=Limits(max_batch_size=8))
    seen: list[int] = []
    run = EngineSystem("baton", tiny_model, EngineConfig(), policy, keep_outputs=True).run(workload, seen.append)
    assert sum(seen) == workload.total_output_tokens == 18 + 5 + 4
    n_record = run.records[0]
    assert n_record.error is None and n_record.choices == 3 and n_record.output_tokens == 18
    assert len(n_record.token_times_s) == 6  # latency follows choice 0
    assert len(run.outputs[0]) == 3 and all(run.outputs[0])
    assert [r.output_tokens for r in run.records[1:]] == [5, 4]
    plain = EngineSystem("baton", tiny_model, EngineConfig(), policy, use_features=False).run(workload, seen.append)
    assert plain.records[0].choices == 1 and plain.records[0].output_tokens == 6 and plain.outputs == {}


class _FakeEngine:
    """Records the workload it was given; every choice yields max_tokens tokens (no model)."""

    def __init__(self, json_tokens: dict[int, int] | None = None, use_features: bool = True):
        self.json_tokens, self.use_features, self.seen = json_tokens or {}, use_features, []

    def run(self, workload, progress):
        self.seen.append(workload)
        records = []
        for r in workload.requests:
            choices = r.choices if self.use_features else 1
            record = RequestRecord(r.index, 0.0, r.prompt_len, r.max_tokens, choices=choices)
            record.output_tokens = self.json_tokens.get(r.index, r.max_tokens * choices)
            record.token_times_s = [0.1 * (i + 1) for i in range(min(record.output_tokens, r.max_tokens))]
            record.finished_s = record.token_times_s[-1]
            records.append(record)
        outputs = {r.index: ['{"a": 1}'] * record.choices for r, record in zip(workload.requests, records)}
        return SystemRun("fake", records, outputs=outputs)


def test_plain_run_matches_the_json_lengths_of_the_mixed_run():
    workload = features.assign_features(_base(10))
    json_rows = [r.index for r in workload.requests if features.feature_class(r) == "json"]
    mixed = features.RecordingMixed(_FakeEngine({i: 7 + i for i in json_rows}))
    plain = features.MatchedPlain(_FakeEngine(use_features=False), mixed.json_tokens)
    with pytest.raises(ValueError, match="mixed first"):
        plain.run(workload, lambda n: None)
    mixed.run(workload, lambda n: None)
    plain.run(workload, lambda n: None)
    sent = {r.index: r for r in plain.engine.seen[0].requests}
    assert all(sent[i].max_tokens == 7 + i and sent[i].features == workload.requests[i].features for i in json_rows)
    assert all(sent[r.index] == r for r in workload.requests if r.index not in json_rows)


def test_summary_compares_each_class_with_the_plain_run():
    workload = features.assign_features(_base(10))
    runs = {"mixed": _FakeEngine().run(workload, None), "plain": _FakeEngine(use_features=False).run(workload, None)}
    runs["plain"].outputs = {i: ["other"] for i in runs["plain"].outputs}
    result = {"systems": {"mixed": {"output_tokens_per_s": 9.0}, "plain": {"output_tokens_per_s": 10.0}}}
    features.summarize(workload, runs, SLO(), result)
    scenario = result["scenario"]
    assert scenario["throughput_ratio"] == pytest.approx(0.9)
    assert scenario["plain_rows_tpot_p50_ratio"] == pytest.approx(1.0)
    assert set(scenario["classes"]) == set(result["by_feature"]["mixed"]) == set(features.CLASSES)
    assert scenario["checks"] == {"json_rows": 3, "json_parsed": 3, "n_rows": 1, "n_rows_with_all_choices": 1,
                                  "penalty_rows": 2, "penalty_rows_changed": 2}
    n_class = scenario["classes"]["n"]
    assert n_class["requests"] == 1 and n_class["output_tokens"]["mixed"] == 3 * n_class["output_tokens"]["plain"]


def test_cli_selects_the_features_plan(tmp_path, tiny_model):
    args = cli.build_parser().parse_args(["--scenario", "features", "-n", "10", "--data-dir", str(tmp_path),
                                          "--synthetic-fallback", "--no-progress"])
    runner = Runner(cli.run_options(args))
    runner.loaded, runner.tokenizer = tiny_model, tiny_model.tokenizer
    plan = cli.make_plan(args, runner)
    assert list(plan.systems) == list(features.LABELS) and plan.kind == "features" and plan.baseline == "plain"
    assert plan.loads == () and {r.arrival_s for r in plan.workload.requests} == {0.0}
    assert len(plan.workload.requests) == 10


@pytest.mark.model
def test_features_scenario_on_the_real_model(tmp_path, real_model):
    args = cli.build_parser().parse_args(["--scenario", "features", "--no-progress", "--no-plots"])
    runner = Runner(cli.run_options(args))
    runner.loaded, runner.tokenizer = real_model, real_model.tokenizer
    options = WorkloadOptions(num_requests=7, prompt_range=(8, 24), output_range=(3, 5), data_dir=tmp_path,
                              synthetic_fallback=True)
    plan = features.plan(runner, options)
    result = runner.execute(plan)
    assert set(result["systems"]) == {"mixed", "plain"}
    assert all(s["completed"] == 7 for s in result["systems"].values())
    scenario = result["scenario"]
    assert {"throughput_ratio", "plain_rows_tpot_p50_ratio", "plain_rows_tpot_p95_ratio", "classes"} <= set(scenario)
    assert [f["name"].split(":")[0] for f in result["floors"]] == ["features", "features"]
    checks = scenario["checks"]
    assert (checks["json_rows"], checks["n_rows"], checks["penalty_rows"]) == (2, 1, 1)
    assert checks["json_parsed"] == 2 and checks["n_rows_with_all_choices"] == 1
    mixed = {r.index: r for r in runner.runs["mixed"].records}
    plain = {r.index: r for r in runner.runs["plain"].records}
    for request in plan.workload.requests:
        kind, texts = features.feature_class(request), runner.runs["mixed"].outputs[request.index]
        if kind == "json":  # every constrained answer parses and follows its schema
            jsonschema.validate(json.loads(texts[0]), json.loads(request.features.json_schema))
            assert plain[request.index].output_tokens == mixed[request.index].output_tokens  # same work
        elif kind == "n":
            assert len(texts) == 3 and mixed[request.index].output_tokens == 3 * request.max_tokens
