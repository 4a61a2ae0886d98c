"""Tool calling with the real default model's tokenizer: the Hermes template renders tools, calls
and results; the ``required`` and named grammars compile and the model's constrained answers
read back as calls, streamed or not."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from baton_sidecar.engine.grammar import GrammarCompiler, apply_bitmask
from baton_sidecar.server.chat_template import (hermes_template, parse_tool_messages, pick_template,
                                                render_tool_chat)
from baton_sidecar.server.errors import APIError
from baton_sidecar.server.tools import parse_tools
from tool_helpers import SIGNATURES, random_pieces, streamed, tools_body, without_ids

pytestmark = pytest.mark.model
MAX_NEW_TOKENS = 40
CHOICES = ["required"] + [{"type": "function", "function": {"name": s["name"]}} for s in SIGNATURES]


@pytest.fixture(scope="module")
def compiler(real_model):
    vocab = real_model.model.get_output_embeddings().out_features
    compiler = GrammarCompiler(real_model.tokenizer, vocab, real_model.eos_token_ids)
    yield compiler
    compiler.close()


def _conversation(question: str) -> list[dict]:
    return parse_tool_messages([{"role": "system", "content": "You call functions."},
                                {"role": "user", "content": question}])


@torch.no_grad()
def _constrained_answer(real_model, compiler, request, question: str) -> str:
    """Greedy decoding under the request's grammar: what the engine would answer. The prompt is
    short (the grammar does the work; a CPU test pays per token); tokens the grammar forces go
    in one forward pass."""
    tokenizer, model = real_model.tokenizer, real_model.model
    row = compiler.compile(request.structured()).matcher()
    ids = render_tool_chat(tokenizer, _conversation(question), None)
    cache, inputs, out = DynamicCache(config=model.config), ids, []
    while len(out) < MAX_NEW_TOKENS and not row.done:
        step = model(input_ids=torch.tensor([inputs], device=real_model.device), past_key_values=cache,
                     use_cache=True, logits_to_keep=1)
        logits = apply_bitmask(step.logits[:, -1, :].float(), compiler.fill_bitmasks([row]))
        token = int(logits.argmax(-1))
        if token in real_model.eos_token_ids:
            break
        row.advance(token)
        inputs = [token] + list(row.matcher.compute_ff_tokens())
        for forced in inputs[1:]:
            row.advance(forced)
        out += inputs
    return tokenizer.decode(out)


@pytest.fixture(scope="module")
def answers(real_model, compiler):
    """(tool_choice, the model's constrained answer) for required and each named function."""
    questions = ["What is the weather in Paris?", "Add 2 and 3.", "Ping the server.",
                 "Find the docs about kv cache.", "Book a room for Ann for two nights."]
    out = []
    for i, choice in enumerate(CHOICES):
        # one call each: greedy decoding of a small model would repeat calls until cut short
        request = parse_tools({"tools": tools_body(), "tool_choice": choice, "parallel_tool_calls": False})
        out.append((choice, _constrained_answer(real_model, compiler, request, questions[i % 5])))
    return out


def test_the_grammars_compile_for_five_signatures(compiler):
    for choice in CHOICES:
        structured = parse_tools({"tools": tools_body(), "tool_choice": choice}).structured()
        assert compiler.compile(structured) is not None
    assert len(SIGNATURES) == 5


def test_a_schema_the_grammar_engine_refuses_names_its_tool(compiler):
    from baton_sidecar.engine.request import RequestValidationError

    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "(unclosed"}}, "required": ["x"]}}}]
    request = parse_tools({"tools": tools_body("add") + bad, "tool_choice": {"type": "function",
                                                                             "function": {"name": "f"}}})
    with pytest.raises(RequestValidationError) as err:
        compiler.compile(request.structured())
    assert err.value.field == "tools[1].function.parameters"


def test_constrained_answers_read_back_as_valid_calls(answers):
    schemas = {s["name"]: s.get("parameters", {"type": "object"}) for s in SIGNATURES}
    for choice, text in answers:
        request = parse_tools({"tools": tools_body(), "tool_choice": choice, "parallel_tool_calls": False})
        result = request.parse(text)
        assert result.content is None and result.tool_calls, (choice, text)
        for call in result.tool_calls:
            name = call["function"]["name"]
            if isinstance(choice, dict):
                assert name == choice["function"]["name"]
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[name])
        expected = "tool_calls" if choice == "required" else "stop"
        assert request.finish_reason("stop", bool(result.tool_calls)) == expected


@settings(max_examples=60, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2 ** 32))
def test_streamed_answers_equal_finished_ones(answers, data, seed):
    choice, text = data.draw(st.sampled_from(answers))
    request = parse_tools({"tools": tools_body(), "tool_choice": choice})
    folded, _, called = streamed(request, random_pieces(text, random.Random(seed), most=4))
    assert without_ids(folded) == without_ids(request.parse(text)) and called


def test_an_auto_answer_streams_as_it_reads(real_model):
    """Unconstrained: whatever the small model writes, streaming and reading agree."""
    request = parse_tools({"tools": tools_body()})
    ids = render_tool_chat(real_model.tokenizer, _conversation("Add 2 and 3 with the add tool."),
                           request.openai_tools())
    with torch.no_grad():
        out = real_model.model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)
    text = real_model.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    for seed in range(20):
        folded, _, _ = streamed(request, random_pieces(text, random.Random(seed)))
        assert without_ids(folded) == without_ids(request.parse(text))


# -- the template -------------------------------------------------------------------------------------

def test_the_template_renders_tools_calls_and_results(real_model):
    tokenizer = real_model.tokenizer
    assert "tools" not in tokenizer.chat_template  # SmolLM2's own template knows no tools
    assert pick_template(tokenizer) == hermes_template()
    assert pick_template(tokenizer, "{{ 'x' }}") == "{{ 'x' }}"
    messages = parse_tool_messages([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Nice?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Nice", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18"},
        {"role": "tool", "tool_call_id": "call_2", "content": "21"},
        {"role": "assistant", "content": "18 and 21."},
        {"role": "user", "content": "And 2 + 3?"}])
    tools = parse_tools({"tools": tools_body("get_weather", "add")}).openai_tools()
    text = tokenizer.decode(render_tool_chat(tokenizer, messages, tools))
    system = text[:text.index("<|im_end|>")]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n")
    assert f"<tools>\n{json.dumps(tools[0])}\n{json.dumps(tools[1])}\n</tools>" in system
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in system
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", '
            '"arguments": {"city": "Nice", "unit": "celsius"}}\n</tool_call><|im_end|>\n') in text
    assert ("<|im_start|>user\n<tool_response>\n18\n</tool_response>\n<tool_response>\n21\n"
            "</tool_response><|im_end|>\n<|im_start|>assistant\n18 and 21.<|im_end|>\n") in text
    assert text.endswith("<|im_start|>user\nAnd 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    # what the template shows the model is what the Hermes reader takes back
    start = text.index('<tool_call>\n{"name": "get_weather"')
    block = text[start:text.index("<|im_end|>", start)]
    assert without_ids(parse_tools({"tools": tools}).parse(block)) == (None, [
        ("get_weather", '{"city": "Paris", "unit": "celsius"}'),
        ("get_weather", '{"city": "Nice", "unit": "celsius"}')])


def test_without_tools_the_template_is_plain_chatml(real_model):
    tokenizer = real_model.tokenizer
    text = tokenizer.decode(render_tool_chat(tokenizer, [{"role": "user", "content": "hi"}], None))
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_that_refuses_is_a_400(real_model):
    with pytest.raises(APIError) as err:
        render_tool_chat(real_model.tokenizer, [{"role": "user", "content": "hi"}], None,
                         template="{{ raise_exception('no') }}")
    assert err.value.param == "messages"
