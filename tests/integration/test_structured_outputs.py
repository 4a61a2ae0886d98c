"""With the real model: structured outputs (llguidance grammars) inside the re-batched batch.

Every constrained answer must parse and validate; plain rows beside them must keep their
greedy output; a constrained row resumes after preemption exactly as if never preempted.
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from baton_sidecar.config import EngineConfig, Limits, PolicyConfig, PreemptionPolicy, PrefillPolicy
from baton_sidecar.engine import AsyncEngine, RequestValidationError, SamplingParams, StructuredOutput
from parity import assert_same_greedy, solo_generate
from schemas import SCHEMAS

pytestmark = pytest.mark.model

MAX_TOKENS = 160


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def json_params(schema: dict, **kwargs) -> SamplingParams:
    kwargs.setdefault("temperature", 0)
    return SamplingParams(max_tokens=MAX_TOKENS, structured=StructuredOutput("json", json.dumps(schema)),
                          **kwargs)


@pytest.fixture
async def engine(real_model):
    engine = AsyncEngine(real_model, EngineConfig(), PolicyConfig(limits=Limits(max_batch_size=16)))
    await engine.start()
    yield engine
    await engine.shutdown(drain_timeout_s=5)


async def test_twenty_schemas_validate_beside_plain_rows(real_model, engine):
    tok = real_model.tokenizer
    plain_prompts = [chat_ids(tok, p) for p in ("What is the capital of France?", "Count to five.")]
    plain_refs = [solo_generate(real_model, p, 24) for p in plain_prompts]

    async def constrained(i, prompt, schema):
        await asyncio.sleep(0.02 * i)  # arrivals spread over the running batch
        params = json_params(schema, temperature=0 if i % 2 else 0.8, seed=i)
        await engine.compile_grammar(params.structured)
        return await engine.generate(chat_ids(tok, prompt), params)

    jobs = [constrained(i, prompt, schema) for i, (prompt, schema) in enumerate(SCHEMAS)]
    jobs += [engine.generate(p, SamplingParams(temperature=0, max_tokens=24)) for p in plain_prompts]
    outs = await asyncio.gather(*jobs)
    for (prompt, schema), out in zip(SCHEMAS, outs):
        assert out.finish_reason == "stop", (prompt, out.text, out.finish_reason)
        jsonschema.validate(json.loads(out.text), schema)
    for prompt, out, want in zip(plain_prompts, outs[len(SCHEMAS):], plain_refs):
        assert_same_greedy(real_model, prompt, list(out.token_ids), want)


@pytest.mark.parametrize("kind, spec, check", [
    ("regex", r"[0-9]{3}-[0-9]{4}", lambda text: re.fullmatch(r"[0-9]{3}-[0-9]{4}", text)),
    ("choice", json.dumps(["Paris", "London", "Berlin"]), lambda text: text in ("Paris", "London", "Berlin")),
    ("grammar", 'start: "The answer is " ("yes" | "no") "."',
     lambda text: text in ("The answer is yes.", "The answer is no.")),
    ("json_object", "", lambda text: isinstance(json.loads(text), dict)),
])
async def test_regex_choice_grammar_and_json_object(real_model, engine, kind, spec, check):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, structured=StructuredOutput(kind, spec))
    await engine.compile_grammar(params.structured)
    out = await engine.generate(chat_ids(real_model.tokenizer, "What is the capital of France?"), params)
    assert out.finish_reason == "stop" and check(out.text), out.text


async def test_an_invalid_spec_is_refused_naming_its_field(engine):
    for structured in (StructuredOutput("json", '{"type": "nonsense"}', "response_format.json_schema.schema"),
                       StructuredOutput("regex", "([a-z", "guided_regex"),
                       StructuredOutput("grammar", "start: missing_rule", "guided_grammar")):
        with pytest.raises(RequestValidationError) as caught:
            await engine.compile_grammar(structured)
        assert caught.value.field == structured.field
        with pytest.raises(RequestValidationError):  # submit without compiling first: same refusal
            engine.submit("Hi", SamplingParams(max_tokens=4, structured=structured))
    # The engine keeps serving.
    out = await engine.generate("Hi", SamplingParams(max_tokens=4, temperature=0))
    assert out.completion_tokens == 4


@pytest.mark.parametrize("mode", ["swap", "recompute"])
async def test_preempted_constrained_rows_resume_with_identical_output(real_model, mode):
    tok = real_model.tokenizer
    picked = [SCHEMAS[0], SCHEMAS[7], SCHEMAS[16]]
    requests = [(chat_ids(tok, prompt), json_params(schema)) for prompt, schema in picked]
    quiet = AsyncEngine(real_model, EngineConfig(), PolicyConfig())
    await quiet.start()
    try:
        alone = [await quiet.generate(p, params) for p, params in requests]
    finally:
        await quiet.shutdown(drain_timeout_s=5)

    # Token budget: the three rows join whole before the urgent requests come (a time budget
    # chunks prompts while rows decode, and a prompt caught mid-chunk is always recomputed).
    policy = PolicyConfig(limits=Limits(max_batch_size=3), prefill=PrefillPolicy(budget="tokens"),
                          preemption=PreemptionPolicy(mode=mode, max_preemptions_per_request=8))
    engine = AsyncEngine(real_model, EngineConfig(), policy)
    await engine.start()
    try:
        low = [asyncio.ensure_future(engine.generate(p, params, priority=10)) for p, params in requests]
        for _ in range(8):  # urgent arrivals while the constrained rows run
            await asyncio.sleep(0.2)
            await engine.generate("Hi", SamplingParams(max_tokens=3, temperature=0), priority=0)
        outs = await asyncio.gather(*low)
    finally:
        await engine.shutdown(drain_timeout_s=5)
    assert sum(out.num_preemptions for out in outs) >= 2
    for want, got in zip(alone, outs):
        assert got.token_ids == want.token_ids
