"""The bodies ``test_server_fuzz`` sends: Hypothesis strategies for the two generation routes.

``fuzz_plan`` gives each kind of body a fixed number of examples (Hypothesis spreads the late
choices of one large strategy unevenly): valid bodies (every field the parser knows, drawn from
its valid domain, plus unknown fields); one bad field, for each field (wrong types, out of range,
NaN/Infinity literals, integers past int64 and past the float range, unpaired surrogates, nested
junk, text over the body limit, broken dependencies such as ``stream_options`` without
``stream``); chaos (any fields from anywhere); and raw bytes (random bytes, truncated JSON, JSON
non-objects, deep nesting, over-long integer literals, UTF-16/32/BOM/latin-1 encodings, padding
over the limit, gzip/deflate/corrupt/unsupported content-codings). Each goes with or without a
Content-Length (chunked) and under assorted Content-Types.

Cost: the model runs at ~25 tok/s on one CPU stream and prefills at ~3 ms a token, so whatever
could generate asks for at most ``MAX_GEN`` tokens (completions sometimes omit ``max_tokens``: 16),
prompts that could reach the model stay short, and long text reaches it only over the body limit.
A null or mid-sized token cap is never drawn for chat, whose default is the rest of the context.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from baton_sidecar.server.chat_template import CHAT_ROLES
from baton_sidecar.server.oai_request import MAX_LOGPROBS, MAX_STOP_SEQUENCES
from server_helpers import MODEL_NAME


EXAMPLES = 500  # at least, per route
LIMIT = 8 << 10  # max_body_bytes of the fuzzed sidecar, so bodies over it are cheap to draw
VOCAB, CONTEXT = 49152, 8192  # SmolLM2-135M's; checked against the engine in the test
MAX_GEN = 3  # the largest token cap a body may ask for
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"

# Reproducible (the same bodies on every run, nothing read from or written to an example
# database); each run of the plan sets its own max_examples.
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])

# -- values ----------------------------------------------------------------------------------------

INT64_MAX = (1 << 63) - 1
# Past int64, and past the float range (Python's json reads any integer literal exactly).
HUGE_INTS = st.sampled_from([1 << 63, -(1 << 63) - 1, 1 << 64, 10 ** 30, -10 ** 30, 10 ** 400,
                             -10 ** 400])
INTS = st.integers(-(1 << 63), INT64_MAX) | st.integers(-3, 30) | HUGE_INTS
FLOATS = st.floats(allow_nan=True, allow_infinity=True)  # json.dumps writes NaN/Infinity literals
ODD_STRINGS = st.sampled_from([
    "", " ", "NaN", "nan", "Infinity", "-inf", "1e999", "0", "-1", "1", "true", "null", "[]", "{}",
    "\x00", "\x1b[31m", "\r\n", "\u202e\u200b", "\ufeff", "\U0001F600\U0001F680", "e\u0301",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "{{ raise_exception('x') }}", "{% for %}",
    "\U0010FFFF", "\\ud800"])
EMOJI = st.text(st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), min_size=1,
                max_size=6)
CONTROL = st.text(st.characters(categories=["Cc"]), min_size=1, max_size=6)
# Short enough for any of them to reach the model cheaply (a few dozen tokens at most).
SHORT_TEXT = st.text(max_size=20) | ODD_STRINGS | EMOJI | CONTROL
NONEMPTY_TEXT = SHORT_TEXT.filter(bool)
LONE_SURROGATE = st.builds(lambda a, s, b: a + s + b, st.text(max_size=3),
                           st.characters(categories=["Cs"]), st.text(max_size=3))
# Text that cannot reach the model: its UTF-8 bytes alone are over the body limit (413).
OVERSIZED = st.builds(lambda s, n: s * n, NONEMPTY_TEXT.filter(lambda s: "\x00" not in s),
                      st.integers(LIMIT + 1, 2 * LIMIT))
# Long text for fields that never reach the model; under or over the limit.
LONG = OVERSIZED | st.builds(lambda s, n: s * n, NONEMPTY_TEXT, st.integers(200, LIMIT // 2))
TEXT = SHORT_TEXT | LONG | LONE_SURROGATE


def _json_values(text):
    return st.recursive(
        st.none() | st.booleans() | INTS | FLOATS | text,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
        max_leaves=8)


VALID_JUNK = _json_values(SHORT_TEXT)  # any JSON a valid body may carry in an unknown field
JUNK = _json_values(SHORT_TEXT | LONE_SURROGATE)
NOT_STR = st.booleans() | INTS | FLOATS | st.lists(
    SHORT_TEXT, max_size=2) | st.dictionaries(SHORT_TEXT, SHORT_TEXT, max_size=2)
NOT_BOOL = INTS | FLOATS | SHORT_TEXT | st.just([]) | st.just({})
NOT_NUMBER = SHORT_TEXT | st.booleans() | st.sampled_from(["1", "0.5", [1], {"v": 1}])
NOT_INT = NOT_NUMBER | FLOATS | HUGE_INTS | st.sampled_from([1.0, 2.5, -0.0])
# A token cap that is never a null or a valid value over MAX_GEN: an invalid cap is refused, so it
# never makes the model run long.
BAD_CAP = (st.integers(max_value=0) | st.integers(CONTEXT, INT64_MAX) | HUGE_INTS | NOT_INT
           | st.sampled_from([True, False, "2", 1.5, [2], {"max": 2}]))


def text_parts(text):
    return st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), min_size=1,
                    max_size=3)


# -- fields: (valid values, values from a wrong domain) --------------------------------------------

# Stop strings: some that three tokens of any text are likely to hold, and anything else.
STOP_TEXT = st.sampled_from([" ", "e", "\n", ".", ",", "the", "a", "s", " the", "I"]) | NONEMPTY_TEXT

COMMON = {
    "model": (st.sampled_from([MODEL_NAME, None]),
              st.sampled_from(["gpt-4o", MODEL_NAME.upper(), MODEL_NAME + " ", ""]) | NONEMPTY_TEXT
              | TEXT | NOT_STR),
    "temperature": (st.sampled_from([0, 0.0, 0.7, 1, 2.0]) | st.floats(0, 5),
                    st.floats(max_value=-1e-9) | st.sampled_from([math.nan, math.inf, -1])
                    | NOT_NUMBER),
    "top_p": (st.floats(0, 1, exclude_min=True) | st.just(1),
              st.sampled_from([0, -0.5, 1.0001, 2, 10 ** 30]) | SHORT_TEXT
              | FLOATS.filter(lambda f: not 0 < f <= 1)),
    "top_k": (st.integers(-1, 64) | st.sampled_from([0, VOCAB - 1, VOCAB, (1 << 31) - 1]),
              st.integers(max_value=-2) | st.integers(1 << 31, INT64_MAX) | NOT_INT),
    "seed": (st.integers(0, INT64_MAX), st.integers(max_value=-1) | NOT_INT),
    "stop": (STOP_TEXT | st.lists(STOP_TEXT, max_size=MAX_STOP_SEQUENCES),
             st.just("") | st.lists(SHORT_TEXT, min_size=MAX_STOP_SEQUENCES + 1, max_size=20)
             | st.lists(SHORT_TEXT | INTS | st.none(), min_size=1, max_size=3).map(
                 lambda some: some + [""])
             | st.lists(INTS, min_size=1, max_size=3)
             | st.dictionaries(SHORT_TEXT, SHORT_TEXT, min_size=1)
             | st.lists(LONE_SURROGATE, min_size=1, max_size=2) | INTS | FLOATS),
    "stop_token_ids": (st.lists(st.integers(0, VOCAB - 1) | st.integers(0, INT64_MAX), max_size=4),
                       st.lists(st.integers(max_value=-1) | HUGE_INTS | st.booleans() | SHORT_TEXT,
                                min_size=1, max_size=3) | INTS | SHORT_TEXT | st.just({})),
    "stream": (st.booleans(), NOT_BOOL),
    "user": (SHORT_TEXT | LONG, NOT_STR | LONE_SURROGATE),
    "priority": (st.integers(-(1 << 63), INT64_MAX) | st.integers(-5, 20), NOT_INT),
    "ignore_eos": (st.booleans(), NOT_BOOL),
    "sla_class": (st.sampled_from(["interactive", "batch"]),
                  st.sampled_from(["platinum", "Interactive", ""]) | TEXT | NOT_STR),
    "n": (st.integers(1, 3), st.sampled_from([0, -1, 129, "1", 1.5]) | HUGE_INTS),
    "presence_penalty": (st.floats(-2, 2), st.sampled_from([2.5, -3, "0", [0]]) | FLOATS.filter(
        lambda f: not -2 <= f <= 2) | HUGE_INTS),
    "frequency_penalty": (st.floats(-2, 2), st.sampled_from([2.01, -2.5, "0", [0]]) | FLOATS.filter(
        lambda f: not -2 <= f <= 2) | HUGE_INTS),
    "repetition_penalty": (st.floats(0.5, 2), st.sampled_from([0, -1, "1", [1]]) | HUGE_INTS),
    "logit_bias": (st.dictionaries(st.integers(0, VOCAB - 1).map(str), st.integers(-200, 200) | st.floats(-100, 100),
                                   max_size=3) | st.none(),
                   st.dictionaries(st.integers(VOCAB, INT64_MAX).map(str) | st.sampled_from(["-1", "a", "1.5", ""]),
                                   st.integers(-100, 100), min_size=1, max_size=2)
                   | st.dictionaries(st.integers(0, VOCAB - 1).map(str), NOT_NUMBER, min_size=1, max_size=2)
                   | st.sampled_from([[1], "x", 1, True])),
    "min_tokens": (st.integers(0, 1), st.integers(max_value=-1) | st.sampled_from([MAX_GEN + 20, "1", 1.5])),
    "bad_words": (st.lists(st.sampled_from(["the", "Paris", "hello world"]), max_size=2),
                  st.sampled_from(["the", [1], [""], [" "], {"a": 1}])),
    "guided_regex": (st.sampled_from(["[a-z]+", "yes|no", "[0-9]{3}"]),
                     st.sampled_from(["([a-z", "", 1, ["x"]])),
    "guided_choice": (st.lists(st.sampled_from(["yes", "no", "maybe"]), min_size=1, max_size=3),
                      st.sampled_from([[], "yes", [1], [""], {"a": 1}])),
    "structured_outputs": (st.sampled_from([{"json": {"type": "object"}}, {"choice": ["a", "b"]},
                                            {"json_object": True}, {"regex": "[a-z]{2}"}]),
                           st.sampled_from([{}, {"json": 5}, {"choice": []}, {"regex": "a", "choice": ["a"]},
                                            {"grammar": "start: nope"}, "json", [], {"json": {"type": "nope"}}])),
    "response_format": (st.sampled_from([{"type": "text"}, None, {"type": "json_object"},
                                         {"type": "json_schema", "json_schema": {
                                             "name": "n", "schema": {"type": "object", "properties": {
                                                 "a": {"type": "integer"}}}, "strict": True}}]),
                        st.sampled_from([{"type": 1}, {}, "text", [], {"type": "json_schema", "json_schema": {}},
                                         {"type": "xml"},
                                         {"type": "json_schema", "json_schema": {"name": "n", "schema": 5}},
                                         {"type": "json_schema", "json_schema": {
                                             "name": "n", "schema": {"type": "nonsense"}}}])
                        | st.dictionaries(SHORT_TEXT, JUNK, max_size=2)),
}

# Characters SmolLM2's tokenizer drops: a prompt of only these has no tokens (400).
DROPPED = "\x04\x06\x13\x14\x16\x1d"
PROMPT_TEXT = NONEMPTY_TEXT.filter(lambda s: s.strip(DROPPED))

COMPLETION_FIELDS = {
    **COMMON,
    "prompt": (PROMPT_TEXT | st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=16)
               | PROMPT_TEXT.map(lambda s: [s])
               | st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8).map(lambda l: [l]),
               st.sampled_from(["", [], [""], [[]], ["a", "b"], [[1], [2]], [1, "a"], [1.0], [True],
                                DROPPED, [DROPPED[::2]], "\x1d" * 5000])
               | st.lists(st.integers(VOCAB, INT64_MAX) | st.integers(max_value=-1) | HUGE_INTS,
                          min_size=1, max_size=3)
               | OVERSIZED | LONE_SURROGATE | INTS | FLOATS | st.dictionaries(SHORT_TEXT, JUNK)),
    # 1..MAX_GEN, or left out (the default of 16) for one body in ten
    "max_tokens": (st.integers(1, MAX_GEN), BAD_CAP),
    "logprobs": (st.integers(0, MAX_LOGPROBS) | st.none(),
                 st.integers(MAX_LOGPROBS + 1, 1000) | st.integers(max_value=-1) | NOT_INT),
    "best_of": (st.integers(1, 4), st.sampled_from([0, -1, 129, "1", 1.5])),
    "echo": (st.sampled_from([False, None, True]), st.sampled_from(["yes", 1])),
    "suffix": (st.sampled_from(["", None]), NONEMPTY_TEXT | NOT_STR),
}


def _message(role=st.sampled_from(CHAT_ROLES), content=SHORT_TEXT | text_parts(SHORT_TEXT)):
    def shaped(name):  # a tool result names the call it answers
        required = {"role": st.just(name), "content": content}
        if name == "tool":
            required["tool_call_id"] = SHORT_TEXT
        return st.fixed_dictionaries(required, optional={"name": SHORT_TEXT, "junk": VALID_JUNK})
    return role.flatmap(shaped)


_ASSISTANT_NULL = _message(st.just("assistant"), st.none())
_BAD_MESSAGE = (
    _message(st.sampled_from(["wizard", "User", "", "function", None, 1]) | SHORT_TEXT)
    | _message(content=INTS | FLOATS | st.dictionaries(SHORT_TEXT, JUNK, max_size=2))
    | _message(st.sampled_from(["system", "developer", "user", "tool"]), st.none())
    | _message(content=st.lists(st.sampled_from([
        {"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text"},
        {"type": "text", "text": 5}, {"text": "x"}, "part", None]), min_size=1, max_size=2))
    | _message(content=OVERSIZED | LONE_SURROGATE) | JUNK)

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}}

CHAT_FIELDS = {
    **COMMON,
    "messages": (st.lists(_message() | _ASSISTANT_NULL, min_size=1, max_size=3),
                 st.lists(_message(), max_size=2).flatmap(
                     lambda good: st.lists(_BAD_MESSAGE, min_size=1, max_size=2).map(
                         lambda bad: good + bad))
                 | st.sampled_from([[], "hi", {"role": "user", "content": "hi"}, [[]], None])
                 | JUNK),
    "max_tokens": (st.integers(1, MAX_GEN), BAD_CAP),
    "max_completion_tokens": (st.integers(1, MAX_GEN), BAD_CAP),
    "logprobs": (st.booleans(), st.integers(0, 5) | SHORT_TEXT | FLOATS),
    "top_logprobs": (st.integers(0, MAX_LOGPROBS),
                     st.integers(MAX_LOGPROBS + 1, 10 ** 6) | st.integers(max_value=-1) | NOT_INT),
    "tools": (st.sampled_from([[], None, [WEATHER], [WEATHER, {"type": "function", "function": {"name": "f"}}]]),
              st.sampled_from([[{"type": "function"}], [{"type": "function", "function": {"name": "bad name"}}],
                               [WEATHER, WEATHER], [{"type": "function", "function": {"name": "f", "parameters": 5}}],
                               "x", [1], {"a": 1}])),
    "tool_choice": (st.sampled_from(["none", "auto", "required", {"type": "function", "function": {"name": "weather"}}]),
                    st.sampled_from(["sometimes", 5, {"type": "function", "function": {"name": "nope"}},
                                     {"type": "function"}, []])),
    "functions": (st.sampled_from([[], None]), st.sampled_from([[{"name": "f"}], "x"])),
}

REQUIRED = {COMPLETIONS: "prompt", CHAT: "messages"}
CONSTRAINTS = ("response_format", "structured_outputs", "guided_regex", "guided_choice")
FIELDS = {COMPLETIONS: COMPLETION_FIELDS, CHAT: CHAT_FIELDS}
# Token caps: never replaced by free-form junk (a null or mid-sized value would be served slowly).
CAPS = {COMPLETIONS: ("max_tokens",), CHAT: ("max_tokens", "max_completion_tokens")}
KNOWN = set(COMPLETION_FIELDS) | set(CHAT_FIELDS) | {"stream_options"}
EXTRA_FIELDS = st.dictionaries(SHORT_TEXT.filter(lambda k: k not in KNOWN), VALID_JUNK, max_size=3)


# -- bodies ----------------------------------------------------------------------------------------

@dataclass
class Case:
    """One request: the bytes sent, the object they encode (None when they are not one), and how."""

    raw: bytes
    body: dict[str, Any] | None
    temper: str
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False


@st.composite
def _valid_body(draw, route: str) -> dict[str, Any]:
    fields = FIELDS[route]
    # Decisions first: Hypothesis draws late choices of a large example less evenly.
    stream = draw(st.sampled_from([None, False, True, True]))
    optional = sorted(set(fields) - {REQUIRED[route], *CAPS[route], "top_logprobs", "stream"})
    names = draw(st.lists(st.sampled_from(optional), unique=True, max_size=len(optional)))
    if route == COMPLETIONS:  # one body in ten leaves max_tokens out: the default of 16
        caps = draw(st.sampled_from([CAPS[route]] * 9 + [()]))
    else:  # at least one small cap
        caps = draw(st.sampled_from([("max_tokens",), ("max_completion_tokens",), CAPS[route]]))
    body = {REQUIRED[route]: draw(fields[REQUIRED[route]][0])}
    if stream is not None:
        body["stream"] = stream
    for name in (*names, *caps):
        body[name] = draw(fields[name][0])
    if body.get("logprobs") is True and draw(st.booleans()):
        body["top_logprobs"] = draw(fields["top_logprobs"][0])
    if stream and draw(st.booleans()):
        body["stream_options"] = draw(st.sampled_from(
            [{"include_usage": True}, {"include_usage": False}, {"include_usage": None}, {},
             {"include_usage": True, "continuous_usage_stats": True}]))
    if "best_of" in body:  # at least n, and exactly n when streamed
        body["best_of"] = body.get("n", 1) if stream else max(body["best_of"], body.get("n", 1))
    # tool_choice other than "none" needs tools (a named one, its tool); required and named choices
    # are output constraints of their own.
    choice = body.get("tool_choice")
    offered = {t["function"]["name"] for t in body.get("tools") or ()}
    named = choice["function"]["name"] if isinstance(choice, dict) else None
    constrained = any(body.get(k) not in (None, {"type": "text"}) for k in CONSTRAINTS)
    if choice not in (None, "none") and (not offered or (named and named not in offered)
                                         or (choice != "auto" and constrained)):
        del body["tool_choice"]
    # One output constraint per request (two are a 400 naming the second): keep the first drawn.
    constraints = [k for k in names if k in CONSTRAINTS and body[k] not in (None, {"type": "text"})]
    for name in constraints[1:]:
        del body[name]
    body.update(draw(EXTRA_FIELDS))
    return body


BAD_STREAM_OPTIONS = st.sampled_from([[], "usage", 1, True, {"include_usage": "yes"},
                                      {"include_usage": 1}, {"include_usage": [True]}])


@st.composite
def _invalid_value(draw, route: str, name: str, free: bool) -> Any:
    """A value for ``name`` from its wrong domain; with ``free``, from anywhere but a cap's."""
    if name == "stream_options":
        return draw(BAD_STREAM_OPTIONS | JUNK if free else BAD_STREAM_OPTIONS)
    valid, invalid = FIELDS[route][name]
    if not free or name in CAPS[route]:
        return draw(invalid)
    return draw(valid | invalid | JUNK)


@st.composite
def _one_bad(draw, route: str, name: str) -> dict[str, Any]:
    """A valid body but for ``name``: a value from its wrong domain, or a broken dependency."""
    body = draw(_valid_body(route))
    twist = draw(st.sampled_from([False] * 3 + [True]))
    if name == REQUIRED[route] and twist:
        del body[name]
    elif name == "stream_options" and twist:
        body.update(stream=False, stream_options={"include_usage": True})
    elif name == "top_logprobs" and twist:
        body.update(logprobs=False, top_logprobs=draw(st.integers(0, MAX_LOGPROBS)))
    else:
        body[name] = draw(_invalid_value(route, name, free=False))
    return body


@st.composite
def _chaos(draw, route: str) -> dict[str, Any]:
    """A valid body with any number of fields replaced by anything (a cap only by a bad value)."""
    body = draw(_valid_body(route))
    for name in draw(st.lists(st.sampled_from(_bad_names(route)), unique=True, min_size=1)):
        body[name] = draw(_invalid_value(route, name, free=True))
    return body


def _bad_names(route: str) -> list[str]:
    return sorted(FIELDS[route]) + ["stream_options"]


def _encode(body: dict[str, Any], ascii_only: bool) -> bytes:
    # A lone surrogate goes out as a \udXXX escape, or as its own UTF-8 bytes (ED A0 80 ...).
    return json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def _raw_case(draw, route: str, kind: str) -> Case:
    body = draw(_valid_body(route))
    sent: dict[str, Any] | None = None
    headers: dict[str, str] = {}
    if kind == "bytes":
        raw = draw(st.binary(max_size=64) | st.sampled_from(
            [b"", b" ", b"\x00", b"\xff\xfe", b"\xef\xbb\xbf", b"{", b"}", b"{}", b"[]", b"null",
             b"{'prompt': 'x'}", b'{"a":1}{"b":2}', b"\xef\xbb\xbf{}"]))
    elif kind == "truncated":
        full = _encode(body, draw(st.booleans()))
        raw = full[:draw(st.integers(0, len(full) - 1))]
    elif kind == "non_object":
        raw = json.dumps(draw(JUNK.filter(lambda v: not isinstance(v, dict)))).encode(
            "utf-8", "surrogatepass")
    elif kind == "deep":
        depth = draw(st.integers(1, 4000))
        close = depth if draw(st.booleans()) else draw(st.integers(0, depth))
        raw = (b'{"' + REQUIRED[route].encode() + b'": ' + b"[" * depth + b"]" * close + b"}")
    elif kind == "digits":
        digits = draw(st.sampled_from([b"9" * 19, b"9" * 400, b"9" * 4300, b"9" * 4301, b"1" * 6000,
                                       b"-" + b"9" * 5000, b"1." + b"0" * 5000, b"1e" + b"9" * 50]))
        field_name = draw(st.sampled_from(["max_tokens", "seed", "priority", "temperature"]))
        raw = _encode({k: v for k, v in body.items() if k != field_name}, True)[:-1]
        raw += b', "' + field_name.encode() + b'": ' + digits + b"}"
    elif kind == "literal":
        literal = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999",
                                        b"-0", b"1E400", b"0.0e0", b"tru", b"nul", b"01"]))
        field_name = draw(st.sampled_from(sorted(FIELDS[route])))
        raw = _encode({k: v for k, v in body.items() if k != field_name}, True)[:-1]
        raw += b', "' + field_name.encode() + b'": ' + literal + b"}"
    elif kind == "encoding":
        codec = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le",
                                      "utf-8-sig", "latin-1"]))
        text = json.dumps(body, ensure_ascii=draw(st.booleans()))
        try:
            raw, sent = text.encode(codec, "surrogatepass"), body
        except UnicodeEncodeError:  # latin-1 cannot hold every character: "?" instead
            raw = text.encode(codec, "replace")
    elif kind == "oversized":
        pad = draw(st.integers(LIMIT - 64, 3 * LIMIT))
        raw = _encode({**body, "padding": "x" * pad}, True)
        sent = {**body, "padding": "x" * pad}
    else:  # content-coding: a compressed body (served as its content), a corrupt one, or a
        # coding the server cannot decode (brotli, zstd: not installed) or does not know
        plain = _encode(body, True)
        coding = draw(st.sampled_from(["gzip", "deflate", "br", "zstd", "x-unknown", "gzip, gzip"]))
        if coding in ("gzip", "deflate") and draw(st.booleans()):
            raw, sent = (gzip.compress(plain) if coding == "gzip" else zlib.compress(plain)), body
        else:
            raw = plain[:draw(st.integers(0, len(plain)))]
        headers["Content-Encoding"] = coding
    return Case(raw, sent, f"raw {kind}", headers)


RAW_KINDS = ("bytes", "truncated", "non_object", "deep", "digits", "literal", "encoding",
             "oversized", "coding")


@st.composite
def _case(draw, route: str, temper: str, detail: str | None = None) -> Case:
    content_type = draw(st.sampled_from(["application/json", "application/json", None,
                                         "text/plain", "application/json; charset=latin-1",
                                         "multipart/form-data; boundary=x"]))
    chunked = draw(st.sampled_from([False] * 5 + [True]))
    ascii_only = draw(st.booleans())
    if temper == "raw":
        case = draw(_raw_case(route, detail))
    else:
        body = draw({"valid": _valid_body(route), "chaos": _chaos(route),
                     "bad": _one_bad(route, detail)}[temper])
        case = Case(_encode(body, ascii_only), body, f"{temper} {detail or ''}".strip())
    if content_type is not None:
        case.headers["Content-Type"] = content_type
    case.chunked = chunked
    return case


def fuzz_plan(route: str) -> list[tuple[st.SearchStrategy[Case], int]]:
    """(strategy, examples): a fixed share for each temper, each bad field and each raw kind, so
    the mix does not hang on how Hypothesis happens to spread one run's choices."""
    return ([(_case(route, "valid"), 150), (_case(route, "chaos"), 100)]
            + [(_case(route, "bad", name), 8) for name in _bad_names(route)]
            + [(_case(route, "raw", kind), 12) for kind in RAW_KINDS])
