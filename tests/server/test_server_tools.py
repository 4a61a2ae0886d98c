"""Tool calling over HTTP with the real ``openai`` client and the real model: ``tool_choice``
required (five signatures), named, auto and none, streamed and not, and tool results fed back."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import requests

from server_helpers import MODEL_NAME
from tool_helpers import SIGNATURES, tools_body

pytestmark = pytest.mark.model

ASK = [{"role": "user", "content": "What is the weather in Paris? Use the tools."}]


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", timeout=120, max_retries=0) as c:
        yield c


def schema_of(name: str) -> dict:
    signature = next(s for s in SIGNATURES if s["name"] == name)
    return signature.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}


def streamed_calls(chunks) -> tuple[str, list[tuple[str, str]], str | None]:
    """(content, [(name, arguments)], finish_reason) put back together from a chat stream."""
    content, calls, reason = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for part in choice.delta.tool_calls or ():
                if part.id is not None:
                    calls[part.index] = [part.function.name, part.function.arguments or ""]
                else:
                    calls[part.index][1] += part.function.arguments or ""
            reason = choice.finish_reason or reason
    return content, [tuple(c) for c in calls.values()], reason


@pytest.mark.parametrize("name", [s["name"] for s in SIGNATURES])
def test_required_calls_parse_and_validate_for_five_signatures(client, name):
    tools = tools_body(name)
    whole = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=tools, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=120, temperature=0)
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls", message
    assert len(message.tool_calls) == 1 and message.tool_calls[0].function.name == name
    arguments = json.loads(message.tool_calls[0].function.arguments)
    jsonschema.validate(arguments, schema_of(name))
    assert message.tool_calls[0].id.startswith("call_")
    chunks = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=tools, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=120, temperature=0, stream=True)
    content, calls, reason = streamed_calls(chunks)
    assert calls == [(name, message.tool_calls[0].function.arguments)] and reason == "tool_calls"


def test_a_named_choice_returns_that_function_with_valid_arguments(client):
    tools = tools_body()
    whole = client.chat.completions.create(
        model=MODEL_NAME, messages=ASK, tools=tools, max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = whole.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and whole.choices[0].message.content is None
    jsonschema.validate(json.loads(call.function.arguments), schema_of("get_weather"))
    assert whole.choices[0].finish_reason == "stop"  # OpenAI's rule for a named function


def test_auto_and_none_stream_as_they_answer_whole(client):
    tools = tools_body("get_weather", "add")
    for choice in ("auto", "none"):
        whole = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=tools, tool_choice=choice,
                                               max_tokens=60, temperature=0)
        chunks = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=tools, tool_choice=choice,
                                                max_tokens=60, temperature=0, stream=True)
        content, calls, reason = streamed_calls(chunks)
        message = whole.choices[0].message
        assert content == (message.content or "")
        assert calls == [(c.function.name, c.function.arguments) for c in message.tool_calls or ()]
        assert reason == whole.choices[0].finish_reason
        if choice == "none":
            assert not message.tool_calls


def test_tool_results_go_back_into_the_conversation(client, engine):
    tools = tools_body("get_weather")
    first = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=tools, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=80, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    conversation = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21, "sky": "clear"})}]
    answer = client.chat.completions.create(model=MODEL_NAME, messages=conversation, tools=tools,
                                            max_tokens=30, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The prompt really carried the call and its result.
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens + 20


def test_bad_tools_are_400s_naming_the_field(client):
    for kwargs, param in (({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
                           "tools[0].function.name"),
                          ({"tools": tools_body("add"), "tool_choice": {"type": "function",
                                                                        "function": {"name": "nope"}}},
                           "tool_choice.function.name"),
                          ({"tool_choice": "required"}, "tool_choice"),
                          ({"tools": tools_body("add"), "tool_choice": "required",
                            "response_format": {"type": "json_object"}}, "tool_choice")):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=4, **kwargs)
        assert info.value.body["param"] == param, (kwargs, info.value.body)


def test_chat_template_replaces_the_models_for_chat_and_tokenize(make_server, engine, tmp_path):
    from baton_sidecar.config import ServerConfig
    from baton_sidecar.server.serve import read_chat_template

    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    path = tmp_path / "template.jinja"
    path.write_text(template)
    assert read_chat_template(str(path)) == template == read_chat_template(template)
    with pytest.raises(ValueError):
        read_chat_template("no/such/file.jinja")
    url, _ = make_server(server=ServerConfig(served_model_name=MODEL_NAME, chat_template=template))
    tokens = requests.post(url + "/tokenize", json={"messages": ASK}, timeout=30).json()["tokens"]
    assert tokens == engine.tokenizer.encode(f"<user>{ASK[0]['content']}\n<assistant>", add_special_tokens=False)
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0) as client:
        answer = client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=2, temperature=0)
    assert answer.usage.prompt_tokens == len(tokens)


def test_logprobs_beside_tool_calls_cover_every_token_streamed_or_not(client):
    """Streamed text can be held back while a tag is read; its tokens' logprobs go out later,
    none lost: as many as the answer has tokens, both ways."""
    tools = tools_body("get_weather")
    kwargs = dict(model=MODEL_NAME, messages=ASK, tools=tools, tool_choice="required", parallel_tool_calls=False,
                  max_tokens=60, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kwargs)
    assert len(whole.choices[0].logprobs.content) == whole.usage.completion_tokens
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [lp.token for lp in streamed] == [lp.token for lp in whole.choices[0].logprobs.content]
    assert all(len(lp.top_logprobs) == 2 for lp in streamed)
