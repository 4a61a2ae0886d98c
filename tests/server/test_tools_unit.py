"""Tool calling without a model: request checks, the output constraints, reading answers back,
and streamed answers equal to finished ones."""

from __future__ import annotations

import json
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baton_sidecar.server.chat_template import has_tool_messages, parse_tool_messages
from baton_sidecar.server.errors import APIError
from baton_sidecar.server.json_stream import JsonRewriter
from baton_sidecar.server.tool_stream import ToolCallStream
from baton_sidecar.server.tools import ToolRequest, parse_tools
from tool_helpers import random_pieces, streamed, tools_body, without_ids

ID_RE = re.compile(r"^call_[0-9a-f]{24}$")


def _request(choice=None, *names):
    body = {"tools": tools_body(*names)}
    if choice is not None:
        body["tool_choice"] = choice
    return parse_tools(body)


def _named(name):
    return {"type": "function", "function": {"name": name}}


# -- request checks ----------------------------------------------------------------------------------

def test_defaults_and_choices():
    assert parse_tools({}) is None
    assert parse_tools({"tools": []}) is None  # vLLM: no tools
    assert parse_tools({"tool_choice": "none"}) is None
    req = _request()
    assert (req.choice, req.named) == ("auto", None)
    assert [t.name for t in req.tools] == ["get_weather", "add", "ping", "search-docs", "book_room"]
    assert _request("required").choice == "required"
    assert (_request(_named("add")).choice, _request(_named("add")).named) == ("named", "add")
    # a tool may be called like a mode: the object form still names the tool
    auto_tool = parse_tools({"tools": [{"type": "function", "function": {"name": "auto"}}],
                             "tool_choice": _named("auto")})
    assert (auto_tool.choice, auto_tool.named) == ("named", "auto")


@pytest.mark.parametrize("body, param, code", [
    ({"tools": {}}, "tools", "invalid_type"),
    ({"tools": ["x"]}, "tools[0]", "invalid_type"),
    ({"tools": [{"type": "retrieval", "function": {"name": "a"}}]}, "tools[0].type", "invalid_value"),
    ({"tools": [{"type": "function"}]}, "tools[0].function", "missing_field"),
    ({"tools": [{"type": "function", "function": "a"}]}, "tools[0].function", "invalid_type"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name", "missing_field"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]},
     "tools[0].function.name", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]},
     "tools[0].function.name", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "a", "description": 3}}]},
     "tools[0].function.description", "invalid_type"),
    ({"tools": [{"type": "function", "function": {"name": "a", "parameters": []}}]},
     "tools[0].function.parameters", "invalid_type"),
    ({"tools": [{"type": "function", "function": {"name": "a", "strict": "yes"}}]},
     "tools[0].function.strict", "invalid_type"),
    ({"tools": tools_body("add") * 2}, "tools[1].function.name", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]},
     "tools", "invalid_value"),
    ({"tools": tools_body(), "tool_choice": "always"}, "tool_choice", "invalid_value"),
    ({"tools": tools_body(), "tool_choice": 1}, "tool_choice", "invalid_type"),
    ({"tools": tools_body(), "tool_choice": {"type": "x"}}, "tool_choice.type", "invalid_value"),
    ({"tools": tools_body(), "tool_choice": {"type": "function"}}, "tool_choice.function", "missing_field"),
    ({"tools": tools_body(), "tool_choice": {"type": "function", "function": {}}},
     "tool_choice.function.name", "missing_field"),
    ({"tools": tools_body(), "tool_choice": _named("nope")}, "tool_choice.function.name", "invalid_value"),
    ({"tool_choice": "auto"}, "tool_choice", "invalid_value"),  # OpenAI: tool_choice needs tools
    ({"tool_choice": "required", "tools": []}, "tool_choice", "invalid_value"),
    ({"functions": [{"name": "a"}]}, "functions", "unsupported_value"),
    ({"function_call": "auto"}, "function_call", "unsupported_value"),
])
def test_rejections_name_the_field(body, param, code):
    with pytest.raises(APIError) as err:
        parse_tools(body)
    assert (err.value.status, err.value.param, err.value.code) == (400, param, code)
    assert err.value.message.startswith(param + ":")


# -- output constraints ------------------------------------------------------------------------------

def test_required_schema_is_vllms_array_of_calls():
    out = _request("required").structured()
    assert (out.kind, out.field) == ("json", "tools")
    schema = json.loads(out.spec)
    assert schema["type"] == "array" and schema["minItems"] == 1
    items = schema["items"]["anyOf"]
    assert [i["properties"]["name"]["enum"] for i in items] == [
        ["get_weather"], ["add"], ["ping"], ["search-docs"], ["book_room"]]
    assert all(i["required"] == ["name", "parameters"] for i in items)
    assert items[2]["properties"]["parameters"] == {"type": "object", "properties": {},
                                                    "additionalProperties": False}
    # $defs move to the root, where #/$defs/person resolves
    person = tools_body("book_room")[0]["function"]["parameters"]["$defs"]["person"]
    assert schema["$defs"] == {"person": person}
    assert "$defs" not in items[4]["properties"]["parameters"]
    assert "$defs" in tools_body("book_room")[0]["function"]["parameters"]  # the request is untouched


def test_named_schema_is_the_parameters_in_their_order():
    out = _request(_named("get_weather")).structured()
    assert out.field == "tools[0].function.parameters"
    assert list(json.loads(out.spec)["properties"]) == ["city", "unit"]
    assert json.loads(_request(_named("ping")).structured().spec) == {
        "type": "object", "properties": {}, "additionalProperties": False}  # no parameters: none
    assert _request().structured() is None and _request("none").structured() is None


def test_parallel_tool_calls_false_keeps_one_call():
    body = {"tools": tools_body(), "parallel_tool_calls": False}
    required = parse_tools({**body, "tool_choice": "required"})
    assert json.loads(required.structured().spec)["maxItems"] == 1
    assert "maxItems" not in json.loads(_request("required").structured().spec)
    auto = parse_tools(body)
    text = ('<tool_call>{"name": "ping", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
    assert without_ids(auto.parse(text)) == (None, [("ping", "{}")])
    assert without_ids(streamed(auto, list(text))[0]) == (None, [("ping", "{}")])
    with pytest.raises(APIError) as err:
        parse_tools({**body, "parallel_tool_calls": "no"})
    assert err.value.param == "parallel_tool_calls"


def test_conflicting_defs_are_a_400():
    a = {"type": "function", "function": {"name": "a", "parameters": {"$defs": {"x": {"type": "string"}}}}}
    b = {"type": "function", "function": {"name": "b", "parameters": {"$defs": {"x": {"type": "integer"}}}}}
    with pytest.raises(APIError) as err:
        parse_tools({"tools": [a, b], "tool_choice": "required"}).structured()
    assert err.value.param == "tools[1].function.parameters"


# -- reading answers back ------------------------------------------------------------------------------

def test_hermes_answers():
    req = _request()
    text = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Nic\\u00e9",'
            '"unit":"celsius"}}\n</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}'
            '</tool_call> trailing text is dropped')
    result = req.parse(text)
    assert result.content == "Checking.\n"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in result.tool_calls] == [
        ("get_weather", {"city": "Nicé", "unit": "celsius"}), ("add", {"a": 1, "b": 2})]
    assert result.tool_calls[0]["function"]["arguments"] == '{"city": "Nicé", "unit": "celsius"}'
    assert all(ID_RE.match(c["id"]) and c["type"] == "function" for c in result.tool_calls)
    assert req.finish_reason("stop", True) == "tool_calls"
    # an unclosed last block counts; no content before the block is None
    assert without_ids(req.parse('<tool_call>{"name": "ping", "arguments": {}}')) == (None, [("ping", "{}")])
    # plain text, and a block that is no call, stay content (vLLM)
    for text in ("just text", "x <tool_call>{oops}</tool_call>", '<tool_call>{"name": "add"}</tool_call>'):
        assert without_ids(req.parse(text)) == (text, [])
    assert req.finish_reason("length", False) == "length"


def test_required_named_and_none_answers():
    req = _request("required")
    text = '[{"name": "add", "parameters": {"a": 1, "b": 2}}, {"name": "ping", "parameters": {}}]'
    assert without_ids(req.parse(text)) == (None, [("add", '{"a": 1, "b": 2}'), ("ping", "{}")])
    assert req.finish_reason("stop", True) == "tool_calls"
    assert req.finish_reason("length", True) == "length"
    assert without_ids(req.parse('[{"name": "add", "param')) == ('[{"name": "add", "param', [])
    named = _request(_named("add"))
    assert without_ids(named.parse('{"a": 1,  "b": 2}')) == (None, [("add", '{"a": 1,  "b": 2}')])
    assert named.finish_reason("stop", True) == "stop"  # OpenAI: a named call ends with "stop"
    assert without_ids(_request("none").parse("<tool_call>{}")) == ("<tool_call>{}", [])


# -- streaming -----------------------------------------------------------------------------------------

def test_stream_deltas_have_openai_shapes():
    req = _request()
    text = 'Hi <tool_call>{"name": "add", "arguments": {"a": 10, "b": 2}}</tool_call>'
    _, deltas, called = streamed(req, list(text))
    assert called
    head = next(i for i, d in enumerate(deltas) if "tool_calls" in d)
    assert all(set(d) == {"content"} for d in deltas[:head])
    assert "".join(d["content"] for d in deltas[:head]) == "Hi "
    first = deltas[head]["tool_calls"][0]
    assert ID_RE.match(first.pop("id"))
    assert first == {"index": 0, "type": "function", "function": {"name": "add", "arguments": ""}}
    pieces = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[head + 1:]]
    assert len(pieces) > 3 and "".join(pieces) == '{"a": 10, "b": 2}'  # arguments arrive as they come
    assert all(set(d["tool_calls"][0]) == {"index", "function"} for d in deltas[head + 1:])
    # one feed's deltas come merged: a whole answer at once is content, a call, its arguments
    _, deltas, _ = streamed(req, [text])
    assert [list(d) for d in deltas] == [["content"], ["tool_calls"], ["tool_calls"]]


def test_a_partial_tag_is_held_until_known():
    stream = ToolCallStream(_request())
    assert stream.feed("a <tool") == [{"content": "a "}]
    assert stream.feed("box") == [{"content": "<toolbox"}]
    assert stream.feed("<tool_c") == []
    assert stream.finish() == [{"content": "<tool_c"}]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
FORMATS = st.sampled_from([{}, {"indent": 1}, {"separators": (",", ":")}, {"ensure_ascii": False},
                           {"indent": "\t", "ensure_ascii": False}])


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES, fmt=FORMATS, seed=st.integers(0, 2 ** 32))
def test_json_rewriter_writes_what_json_dumps_writes(value, fmt, seed):
    text = json.dumps(value, **fmt)
    rewriter, out = JsonRewriter(), []
    for piece in random_pieces(text + " tail", random.Random(seed)):
        got, used = rewriter.feed(piece)
        out.append(got)
        if rewriter.done:
            break
    out.append(rewriter.flush())
    assert not rewriter.error
    assert "".join(out) == json.dumps(json.loads(text), ensure_ascii=False)


ARGUMENTS = st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=4)
CONTENT = st.text(alphabet=st.sampled_from(list("ab <>/_tolcaxyz\n")), max_size=12)


@st.composite
def hermes_answers(draw):
    """An auto answer: content, then blocks written as a model might (blanks, key order, escapes)."""
    parts = [draw(CONTENT.filter(lambda c: "<tool_call>" not in c))]
    for _ in range(draw(st.integers(0, 3))):
        call = {"name": draw(st.sampled_from(["add", "ping", "search-docs"])), "arguments": draw(ARGUMENTS)}
        if draw(st.booleans()):
            call = {"arguments": call["arguments"], "name": call["name"]}
        parts.append("<tool_call>" + draw(st.sampled_from(["", "\n"])) + json.dumps(call, **draw(FORMATS))
                     + draw(st.sampled_from(["", "\n"])) + "</tool_call>" + draw(st.sampled_from(["", "\n"])))
    if draw(st.booleans()) and len(parts) > 1:
        parts[-1] = parts[-1].replace("</tool_call>", "")  # cut before its closing tag
    return "".join(parts)


@settings(max_examples=300, deadline=None)
@given(text=hermes_answers(), parallel=st.booleans(), seed=st.integers(0, 2 ** 32))
def test_streamed_hermes_answers_equal_finished_ones(text, parallel, seed):
    req = parse_tools({"tools": tools_body(), "parallel_tool_calls": parallel})
    whole = req.parse(text)
    folded, _, called = streamed(req, random_pieces(text, random.Random(seed)))
    assert without_ids(folded) == without_ids(whole)
    assert called == bool(whole.tool_calls)


@settings(max_examples=200, deadline=None)
@given(calls=st.lists(st.tuples(st.sampled_from(["add", "ping"]), ARGUMENTS), min_size=1, max_size=3),
       fmt=FORMATS, seed=st.integers(0, 2 ** 32))
def test_streamed_required_and_named_answers_equal_finished_ones(calls, fmt, seed):
    rng = random.Random(seed)
    text = json.dumps([{"name": n, "parameters": a} for n, a in calls], **fmt)
    req = _request("required")
    assert without_ids(streamed(req, random_pieces(text, rng))[0]) == without_ids(req.parse(text))
    named = _request(_named("add"))
    args = json.dumps(calls[0][1], **fmt)
    assert without_ids(streamed(named, random_pieces(args, rng))[0]) == without_ids(named.parse(args))


def test_a_bad_first_block_streams_as_content():
    req = _request()
    for text in ('ok <tool_call>{"name": 5, "arguments": {}}</tool_call>', "<tool_call> not json",
                 "<tool_call>"):
        folded, _, called = streamed(req, list(text))
        assert without_ids(folded) == without_ids(req.parse(text)) == (text, []) and not called


# -- messages ------------------------------------------------------------------------------------------

def test_tool_messages_keep_what_templates_read():
    msgs = parse_tool_messages([
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": "add 1 and 2"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"}])
    assert msgs == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "add 1 and 2"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "content": "3", "tool_call_id": "call_1", "name": "add"}]
    assert has_tool_messages(msgs) and not has_tool_messages(msgs[:2])


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "tool", "content": "3"}], "messages[0].tool_call_id"),
    ([{"role": "assistant", "tool_calls": {}}], "messages[0].tool_calls"),
    ([{"role": "assistant", "tool_calls": [{"type": "function"}]}], "messages[0].tool_calls[0].function"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}],
     "messages[0].tool_calls[0].function.name"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "a", "arguments": "{nope"}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
])
def test_bad_tool_messages_name_the_field(messages, param):
    with pytest.raises(APIError) as err:
        parse_tool_messages(messages)
    assert err.value.param == param


def test_tool_request_is_a_plain_value():
    req = _request("required", "add")
    assert req == ToolRequest(req.tools, "required")
    assert req.openai_tools() == tools_body("add")
