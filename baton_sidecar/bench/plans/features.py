"""``--scenario features``: a mixed-feature workload against the same requests sent plain.

48 requests (prompts 10-130, outputs 16-128 tokens), all at t=0 (Poisson with ``--rate``).
A seeded, disjoint share of them carries engine features (``FRACTIONS``): 30% a JSON schema
(one of ``SCHEMAS``), 10% ``n`` = 3 (sampled at temperature 0.8, seeded), 20% penalties
(presence 0.5, frequency 0.3, repetition 1.1); the rest are plain. Two runs of Baton's engine
(rebatch) take the identical prompts at the identical arrivals:

- ``mixed`` (runs first): each request with its features;
- ``plain``: every request plain (greedy, EOS ignored, one choice), features left out.

Throughput is output tokens per second of makespan, every generated token counted, so an
``n`` = 3 request yields 3 x ``max_tokens``. A JSON row stops when its schema is complete
(EOS is then the only token allowed, so it keeps EOS; its ``max_tokens`` is only a cap, at
least ``JSON_MAX_TOKENS`` so that no schema is cut short). In the plain run the same row
produces exactly as many tokens as it did under its schema in the latest mixed run
(``MatchedPlain``): every row does the same work in both runs, and only the features differ
(the grammar masks, the penalties, the two extra sampled rows of each ``n`` request).
tokens/s mixed / plain is then what the feature mix costs. TPOT (p50, p95) is per class of
row, each class against the same requests in the plain run; the floors hold the throughput
ratio and the plain rows' TPOT p50 (``floors.py``). ``scenario.checks`` shows the features
were applied: JSON rows that parse, ``n`` rows with 3 choices, penalty rows whose text
differs from the plain run's.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Mapping

from ..inputs import WorkloadOptions, build_workload, token_source
from ..metrics import SLO, makespan_s, ratio
from ..metrics import summarize as summarize_records
from ..runner import Plan, Runner
from ..workloads import Features, Workload

NUM_REQUESTS = 48
OUTPUT_RANGE = (16, 128)
JSON_MAX_TOKENS = 128  # above the longest answer the bounded schemas allow with this tokenizer
FRACTIONS = {"json": 0.3, "n": 0.1, "penalties": 0.2}  # of the requests, disjoint; the rest plain
CLASSES = ("plain", *FRACTIONS)
LABELS = ("mixed", "plain")  # the two runs, in run order (plain matches mixed's JSON lengths)
PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.1}
N_CHOICES, N_TEMPERATURE = 3, 0.8

_NAME = {"type": "string", "maxLength": 24}
_WORD = {"type": "string", "maxLength": 12}


def _object(properties: dict[str, Any]) -> str:
    """A closed object schema (every property required), as compact JSON text."""
    return json.dumps({"type": "object", "properties": properties, "required": list(properties),
                       "additionalProperties": False}, separators=(",", ":"))


# The shapes JSON-mode traffic uses (enums, bounded integers, nested objects, short arrays);
# every string and array is bounded so that a small model's answer ends well within budget.
SCHEMAS = (
    _object({"name": _NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    _object({"label": {"enum": ["positive", "negative", "neutral"]},
             "confidence": {"type": "integer", "minimum": 0, "maximum": 100}}),
    _object({"product": _NAME, "rating": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
             "pros": {"type": "array", "items": _WORD, "minItems": 1, "maxItems": 3}}),
    _object({"city": _NAME, "country": {"type": "string", "pattern": "^[A-Z]{2}$"},
             "population": {"type": "integer", "minimum": 0, "maximum": 99999999}}),
    _object({"title": _NAME, "author": {"type": "object", "properties": {"first": _WORD, "last": _WORD},
                                        "required": ["first", "last"], "additionalProperties": False},
             "in_print": {"type": "boolean"}}),
)


def plan(runner: Runner, workload: WorkloadOptions) -> Plan:
    """The plain and mixed runs of Baton's engine on the same requests."""
    from ..systems import EngineSystem

    runner.load(["baton"])
    source = token_source(runner.tokenizer, workload, runner.notes)
    options = replace(workload, num_requests=workload.num_requests or NUM_REQUESTS,
                      output_range=workload.output_range or OUTPUT_RANGE)
    base = build_workload("poisson" if options.rate else "offline", options, runner.tokenizer, source,
                          runner.notes)
    requests = assign_features(base, options.seed)
    config = replace(runner.options.engine_config, batching="rebatch")
    engines = {label: EngineSystem("baton", runner.loaded, config, runner.options.policy,
                                   use_features=label == "mixed", keep_outputs=True) for label in LABELS}
    mixed = RecordingMixed(engines["mixed"])
    systems = {"mixed": mixed, "plain": MatchedPlain(engines["plain"], mixed.json_tokens)}
    return Plan(title="scenario: features", kind="features", systems=systems, workload=requests,
                baseline="plain", finish=partial(_finish, runner, requests))


@dataclass
class RecordingMixed:
    """The mixed run; records what each JSON row produced (``json_tokens``) for ``MatchedPlain``."""

    engine: Any  # EngineSystem, features applied
    json_tokens: dict[int, int] = field(default_factory=dict)  # request index -> output tokens, latest run

    def run(self, workload: Workload, progress):
        run = self.engine.run(workload, progress)
        json_rows = {r.index for r in workload.requests if feature_class(r) == "json"}
        self.json_tokens.clear()
        self.json_tokens.update({r.index: r.output_tokens for r in run.records if r.index in json_rows and r.ok})
        return run


@dataclass
class MatchedPlain:
    """The plain run; each JSON row's ``max_tokens`` is its output in the latest mixed run
    (``json_tokens``, shared with ``RecordingMixed``; a row it lacks keeps its own)."""

    engine: Any  # EngineSystem, features left out
    json_tokens: dict[int, int]

    def run(self, workload: Workload, progress):
        if any(feature_class(r) == "json" for r in workload.requests) and not self.json_tokens:
            raise ValueError("the plain run matches the mixed run's JSON lengths: run mixed first")
        requests = [replace(r, max_tokens=max(1, self.json_tokens.get(r.index, r.max_tokens)))
                    if feature_class(r) == "json" else r for r in workload.requests]
        return self.engine.run(Workload(workload.name, requests, workload.description), progress)


def assign_features(workload: Workload, seed: int = 0) -> Workload:
    """A seeded, disjoint ``FRACTIONS`` share of the requests gets each feature; the rest stay plain."""
    rng = random.Random(seed + 13)
    order = list(range(len(workload.requests)))
    rng.shuffle(order)
    kind_of: dict[int, str] = {}
    start = 0
    for kind, fraction in FRACTIONS.items():
        count = int(round(fraction * len(order)))
        kind_of.update(dict.fromkeys(order[start:start + count], kind))
        start += count
    requests = []
    for i, request in enumerate(workload.requests):
        kind = kind_of.get(i)
        if kind == "json":
            request = replace(request, max_tokens=max(request.max_tokens, JSON_MAX_TOKENS),
                              features=Features("json", json_schema=SCHEMAS[i % len(SCHEMAS)]))
        elif kind == "n":
            request = replace(request, features=Features("n", n=N_CHOICES, temperature=N_TEMPERATURE,
                                                         seed=seed * 100_003 + i))
        elif kind == "penalties":
            request = replace(request, features=Features("penalties", **PENALTIES))
        requests.append(request)
    return Workload(workload.name, requests, {**workload.description, "feature_fractions": FRACTIONS,
                                              "json_max_tokens": JSON_MAX_TOKENS})


def feature_class(request) -> str:
    return request.features.kind if request.features else "plain"


# --- the summary ----------------------------------------------------------------------------------

def _finish(runner: Runner, workload: Workload, result: dict[str, Any]) -> None:
    summarize(workload, runner.runs, runner.options.slo, result)


def summarize(workload: Workload, runs: Mapping[str, Any], slo: SLO, result: dict[str, Any]) -> None:
    """``by_feature`` (each run's summary per class of row) and ``scenario`` (ratios, checks).

    ``runs``: label -> ``SystemRun`` (records and choice texts) of the plain and mixed runs.
    """
    kinds = {r.index: feature_class(r) for r in workload.requests}
    by_feature = {}
    for label in LABELS:
        records, duration = runs[label].records, makespan_s(runs[label].records)
        by_feature[label] = {kind: summarize_records([r for r in records if kinds[r.index] == kind], slo, duration)
                             for kind in CLASSES if kind in kinds.values()}
    classes = {kind: _class_entry(by_feature["plain"][kind], by_feature["mixed"][kind])
               for kind in by_feature["mixed"]}
    tps = {label: result["systems"][label].get("output_tokens_per_s") for label in LABELS}
    plain_rows = classes.get("plain", {})
    result["by_feature"] = by_feature
    result["scenario"] = {
        "name": "features", "fractions": FRACTIONS,
        "throughput": "output tokens / makespan, every choice's tokens counted; json rows end with their "
                      "schema, and produce as many tokens in the plain run",
        "output_tokens_per_s": tps, "throughput_ratio": ratio(tps["mixed"], tps["plain"]),
        "plain_rows_tpot_p50_ratio": plain_rows.get("tpot_p50_ratio"),
        "plain_rows_tpot_p95_ratio": plain_rows.get("tpot_p95_ratio"),
        "classes": classes, "checks": checks(workload, runs)}


def _class_entry(plain: dict[str, Any], mixed: dict[str, Any]) -> dict[str, Any]:
    """One class of rows in both runs: counts, output tokens, TPOT and mixed / plain ratios."""
    entry: dict[str, Any] = {"requests": mixed["num_requests"]}
    for key in ("completed", "output_tokens", "tpot_p50_s", "tpot_p95_s", "ttft_p50_s", "e2e_p50_s"):
        entry[key] = {"plain": plain.get(key), "mixed": mixed.get(key)}
    entry["tpot_p50_ratio"] = ratio(mixed.get("tpot_p50_s"), plain.get("tpot_p50_s"))
    entry["tpot_p95_ratio"] = ratio(mixed.get("tpot_p95_s"), plain.get("tpot_p95_s"))
    return entry


def checks(workload: Workload, runs: Mapping[str, Any]) -> dict[str, int]:
    """Evidence that the mixed run applied each feature (from the choices' texts)."""
    mixed, plain = runs["mixed"].outputs, runs["plain"].outputs
    by_kind: dict[str, list[int]] = {kind: [] for kind in FRACTIONS}
    for request in workload.requests:
        if request.features:
            by_kind[request.features.kind].append(request.index)
    return {
        "json_rows": len(by_kind["json"]),
        "json_parsed": sum(_parses(mixed.get(i, [""])[0]) for i in by_kind["json"]),
        "n_rows": len(by_kind["n"]),
        "n_rows_with_all_choices": sum(len(mixed.get(i, ())) == N_CHOICES for i in by_kind["n"]),
        "penalty_rows": len(by_kind["penalties"]),
        "penalty_rows_changed": sum(mixed.get(i) != plain.get(i) for i in by_kind["penalties"]),
    }


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
