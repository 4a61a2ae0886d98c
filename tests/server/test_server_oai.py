"""Request parsing (oai_request, json_body) and response shapes (oai_response); no model."""

import json

import pytest

from baton_sidecar.server import json_body
from baton_sidecar.server import oai_response as shapes
from baton_sidecar.server.errors import APIError
from baton_sidecar.server.json_body import decode_json_body
from baton_sidecar.server.oai_request import parse_chat, parse_completion


def err(fn, *args):
    with pytest.raises(APIError) as info:
        fn(*args)
    assert info.value.status == 400
    return info.value


def test_completion_minimal_defaults():
    p = parse_completion({"model": "m", "prompt": "hi"})
    assert p.kind == "completion" and p.prompt == "hi" and p.params.max_tokens == 16  # OpenAI's
    assert not p.stream and p.logprobs is None and p.operation == "text_completion"
    assert p.params.temperature == 1.0 and p.params.top_k == 0


def test_completion_all_fields():
    p = parse_completion({
        "model": "m", "prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0, "top_p": 0.5,
        "top_k": -1, "seed": 7, "stop": "x", "n": 1, "logprobs": 3, "user": "u", "priority": -2,
        "ignore_eos": True, "sla_class": "batch", "stream": True,
        "stream_options": {"include_usage": True}, "stop_token_ids": [2], "unknown_field": 1},
        vocab_size=10)
    assert p.prompt == [1, 2, 3] and p.params.max_tokens == 5 and p.logprobs == 3
    params = p.params
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.0, 0.5, 0, 7)
    assert params.stop == ("x",) and params.ignore_eos and params.stop_token_ids == (2,)
    assert p.user == "u" and p.priority == -2 and p.sla_class == "batch"
    assert p.stream and p.include_usage
    assert params.greedy and params.logprobs == 3



def test_completion_single_element_batch_is_unwrapped():
    assert parse_completion({"prompt": ["one"]}).prompt == "one"
    assert parse_completion({"prompt": [[5, 6]]}).prompt == [5, 6]
    assert err(parse_completion, {"prompt": ["a", "b"]}).param == "prompt"


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [1, True]}, "prompt"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_k": 1.5}, "top_k"),
    ({"prompt": "x", "seed": "s"}, "seed"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": "x", "stop": ["a", ""]}, "stop"),
    ({"prompt": "x", "stop": ["a"] * 17}, "stop"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": "1"}, "n"),
    ({"prompt": "x", "best_of": 0}, "best_of"),
    ({"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    ({"prompt": "x", "best_of": 3, "stream": True}, "best_of"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}},
     "stream_options.include_usage"),
    ({"prompt": "x", "user": 5}, "user"),
    ({"prompt": "x", "priority": "high"}, "priority"),
    ({"prompt": "x", "sla_class": 1}, "sla_class"),
    ({"prompt": "x", "ignore_eos": "no"}, "ignore_eos"),
    ({"prompt": "x", "model": 3}, "model"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "logit_bias": {"x": 2}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"1": "2"}}, "logit_bias"),
    ({"prompt": "x", "min_tokens": 20}, "min_tokens"),
    ({"prompt": "x", "bad_words": [""]}, "bad_words"),
    ({"prompt": "x", "guided_choice": []}, "guided_choice"),
    ({"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"prompt": "x", "structured_outputs": {"json": 5}}, "structured_outputs.json"),
    ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_completion_rejections_name_the_field(body, param):
    e = err(parse_completion, body)
    assert e.param == param and param in e.message
    assert e.body()["error"]["param"] == param and e.body()["error"]["type"] == "invalid_request_error"


def test_completion_token_ids_checked_against_vocab():
    assert err(parse_completion, {"prompt": [0, 99]}, 50).param == "prompt"


def test_chat_parse_and_defaults():
    p = parse_chat({"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}, {"role": "developer", "content": "d"}],
        "max_completion_tokens": 9, "max_tokens": 3, "logprobs": True, "top_logprobs": 2})
    assert p.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
                          {"role": "assistant", "content": ""}, {"role": "system", "content": "d"}]
    assert p.params.max_tokens == 9 and p.logprobs == 2 and p.operation == "chat"
    # No cap at all: the engine gives it the rest of the context.
    assert parse_chat({"messages": [{"role": "user", "content": "x"}]}).params.max_tokens is None
    assert parse_chat({"messages": [{"role": "user", "content": "x"}], "logprobs": True}).logprobs == 0
    assert parse_chat({"messages": [{"role": "user", "content": "x"}]}).logprobs is None


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 2}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1},
     "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools[0].function"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
     "response_format.type"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
     "response_format.json_schema"),
    ({"messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema.name"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 129}, "n"),
])
def test_chat_rejections_name_the_field(body, param):
    assert err(parse_chat, body).param == param


def test_sampling_params_range_errors_become_400_at_parse_time():
    assert err(parse_completion, {"prompt": "x", "top_p": 1.5}).param == "top_p"
    assert err(parse_chat, {"messages": [{"role": "user", "content": "x"}], "top_k": -2}).param == "top_k"


@pytest.mark.parametrize("raw", [b"", b"{", b"[1, 2]", b"\xff\xfe", b'"str"', b"null"])
def test_body_must_be_a_json_object(raw):
    e = err(decode_json_body, raw)
    assert e.param == "body" and e.code == "invalid_json"


def test_sse_framing():
    assert shapes.sse({"a": 1}) == b'data: {"a":1}\n\n'
    assert shapes.SSE_DONE == b"data: [DONE]\n\n"


def test_response_shapes():
    body = shapes.body("completion", "cmpl-1", 1, "m", [shapes.completion_choice(0, "hi", "length", None)], 3, 2)
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert body["choices"][0]["finish_reason"] == "length" and body["object"] == "text_completion"
    chunk = shapes.chunk("chat", "c", 1, "m", shapes.chat_delta(0, {"content": "x"}, None, None), with_usage=True)
    assert chunk["usage"] is None and chunk["object"] == "chat.completion.chunk"
    assert "usage" not in shapes.chunk("chat", "c", 1, "m", shapes.chat_delta(0, {}, "stop", None), False)
    u = shapes.usage_chunk("c", 1, "m", "chat", 4, 5)
    assert u["choices"] == [] and u["usage"]["total_tokens"] == 9
    json.dumps(shapes.model_list("m", 1, 2048))


def test_logprob_formatting():
    from baton_sidecar.engine.request import TokenLogprob

    fmt = shapes.LogprobFormatter(lambda i: {1: "ab", 2: "c"}[i])
    items = [TokenLogprob(1, -0.1, ((1, -0.1), (2, -2.0))), TokenLogprob(2, -0.3, ())]
    c = fmt.completion(items, 5)
    assert c == {"tokens": ["ab", "c"], "token_logprobs": [-0.1, -0.3],
                 "top_logprobs": [{"ab": -0.1, "c": -2.0}, {}], "text_offset": [5, 7]}
    ch = fmt.chat(items)["content"]
    assert ch[0]["token"] == "ab" and ch[0]["bytes"] == [97, 98]
    assert ch[0]["top_logprobs"][1] == {"token": "c", "logprob": -2.0, "bytes": [99]}


@pytest.mark.parametrize("raw, param, in_key", [
    (rb'{"prompt": "a\ud800b"}', "prompt", False),
    (rb'{"prompt": "\uDFFF"}', "prompt", False),  # upper-case hex, a lone low half
    (rb'{"prompt": "\ude00\ud83d"}', "prompt", False),  # halves in the wrong order
    (rb'{"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "\udbff"}]}',
     "messages[1].content", False),
    (rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}',
     "messages[0].content[0].text", False),
    (rb'{"prompt": "x", "stop": ["ok", "\ud800"]}', "stop[1]", False),
    (rb'{"prompt": "x", "user": "\ud800"}', "user", False),
    (rb'{"prompt": "x", "metadata": {"\ud800": 1}}', "metadata", True),
    (rb'{"\ud800": 1, "prompt": "x"}', "body", True),
    (b'{"prompt": "\xed\xa0\x80"}', "prompt", False),  # a surrogate as UTF-8 bytes, no escape
    ('{"prompt": "x", "user": "\ud800"}'.encode("utf-16", "surrogatepass"), "user", False),
])
def test_unpaired_surrogates_are_refused_naming_the_field(raw, param, in_key):
    e = err(decode_json_body, raw)
    assert e.param == param and e.code == "invalid_value" and e.type == "invalid_request_error"
    assert e.message.startswith(f"{param}: ") and "surrogate" in e.message
    assert ("object key" in e.message) == in_key
    json.dumps(e.body()).encode("utf-8")  # the answer itself encodes


def test_the_first_surrogate_in_document_order_is_named():
    raw = rb'{"stop": ["\ud800"], "messages": [{"role": "user", "content": "\ud800"}]}'
    assert err(decode_json_body, raw).param == "stop[0]"


@pytest.mark.parametrize("raw", [
    rb'{"prompt": "smile \ud83d\ude00", "user": "\uD83D\uDE00"}',  # escaped pairs: one code point
    '{"prompt": "smile \U0001F600 caf\u00e9"}'.encode(),  # plain UTF-8, no escape
    rb'{"prompt": "a \\ud800 backslash"}',  # an escaped backslash, not a surrogate escape
])
def test_valid_unicode_passes(raw):
    body = decode_json_body(raw)
    assert parse_completion(body).prompt == body["prompt"]
    body["prompt"].encode("utf-8")


def test_only_bodies_that_can_hold_a_surrogate_are_walked():
    assert not json_body._may_hold_surrogates('{"prompt": "line\\n caf\u00e9 \\u00e9 \\ud7ff"}'.encode())
    for raw in (rb'"\uD800"', rb'"\udc00"', b'"\xed\xa0\x80"', '"x"'.encode("utf-16")):
        assert json_body._may_hold_surrogates(raw), raw


def test_deep_nesting_is_invalid_json():
    e = err(decode_json_body, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert e.param == "body" and e.code == "invalid_json" and "nested" in e.message


def test_integer_over_the_digit_limit_is_invalid_json():
    e = err(decode_json_body, b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}")
    assert e.param == "body" and e.code == "invalid_json" and "digits" in e.message
    assert "set_int_max_str_digits" not in e.message


def test_chat_message_carries_refusal_null():
    body = shapes.body("chat", "c", 1, "m", [shapes.chat_choice(0, "hi", "stop", None)], 1, 1)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hi", "refusal": None}
    assert '"refusal": null' in json.dumps(body)
    fmt = shapes.LogprobFormatter(lambda i: "t")
    from baton_sidecar.engine.request import TokenLogprob
    assert fmt.chat([TokenLogprob(1, -0.5, ())])["refusal"] is None


@pytest.mark.parametrize("name", ["temperature", "top_p", "presence_penalty", "frequency_penalty"])
def test_an_integer_past_the_float_range_is_not_a_number(name):
    """json reads a 400-digit literal as an int no float holds; checking it must not overflow
    (math.isfinite raised OverflowError: a 500)."""
    for parse, body in ((parse_completion, {"prompt": "x"}),
                        (parse_chat, {"messages": [{"role": "user", "content": "x"}]})):
        e = err(parse, {**body, name: 10 ** 400})
        assert e.param == name and e.code == "invalid_type"
        assert err(parse, {**body, name: -10 ** 400}).param == name
    assert parse_completion({"prompt": "x", "temperature": 10 ** 300}).params.temperature == 1e300


@pytest.mark.parametrize("value, code", [("3", "invalid_type"), (0, "invalid_value"),
                                         (2.5, "invalid_type"), (10 ** 30, "invalid_type")])
def test_chat_max_tokens_is_checked_when_max_completion_tokens_wins(value, code):
    body = {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2,
            "max_tokens": value}
    e = err(parse_chat, body)
    assert e.param == "max_tokens" and e.code == code


def test_chat_records_which_field_set_the_token_cap():
    def field(**caps):
        body = {"messages": [{"role": "user", "content": "x"}], **caps}
        return parse_chat(body).max_tokens_field

    assert field(max_completion_tokens=9, max_tokens=3) == "max_completion_tokens"
    assert field(max_completion_tokens=None, max_tokens=3) == "max_tokens"
    assert field() == "max_tokens"
    assert parse_completion({"prompt": "x", "max_tokens": 3}).max_tokens_field == "max_tokens"
