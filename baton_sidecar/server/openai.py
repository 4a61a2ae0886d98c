"""OpenAI-compatible request parsing and response shapes.

Parsing is pure: a JSON body in, a checked ``ParsedRequest`` out, or an ``APIError`` naming the
offending field. Unknown fields are ignored (as vLLM and OpenAI do); known fields whose values
Baton cannot honour (``n`` other than 1, ``echo``, penalties, tools, ...) are refused by name rather
than silently dropped, so a client never gets a different answer than it asked for.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from baton_sidecar.engine.request import RequestValidationError, SamplingParams, TokenLogprob

MAX_STOP_SEQUENCES = 16
MAX_LOGPROBS = 20
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


@dataclass(frozen=True)
class ParsedRequest:
    """One checked generation request. ``kind`` is "completion" or "chat"."""

    kind: str
    model: str | None
    prompt: str | list[int] | None = None  # completions
    messages: list[dict[str, str]] | None = None  # chat, content flattened to text
    max_tokens: int | None = None  # None: completions default, or the rest of the context for chat
    max_tokens_field: str = "max_tokens"  # the body field it came from, for errors about it
    sampling: Mapping[str, Any] = field(default_factory=dict)  # SamplingParams kwargs except max_tokens
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # top-N alternatives; None = off
    user: str | None = None
    priority: int | None = None
    sla_class: str | None = None

    @property
    def operation(self) -> str:
        """``gen_ai.operation.name`` of the GenAI semantic conventions."""
        return "chat" if self.kind == "chat" else "text_completion"

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        try:
            return SamplingParams(max_tokens=max_tokens, logprobs=self.logprobs, **self.sampling)
        except RequestValidationError as exc:
            raise bad_request(exc.field, exc.message) from None


# -- body decoding ---------------------------------------------------------------------------------

# A body can only decode to a string holding a UTF-16 surrogate (which no tokenizer or UTF-8 encoder
# accepts) through a \uD800-\uDFFF escape, UTF-8-encoded surrogate bytes (ED A0-BF, which json
# decodes with "surrogatepass"), or a UTF-16/32 body; only those bodies are searched for one. The
# byte scan costs about half of json.loads on an ASCII body, a few microseconds on a typical one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE_UTF8 = re.compile(rb"\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_KEY_IN_PARAM = 64


def decode_json_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise APIError(400, "request body is empty; expected a JSON object", param="body",
                       code="invalid_json")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", param="body",
                       code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is not valid JSON: nested too deeply", param="body",
                       code="invalid_json") from None
    except ValueError:  # an integer literal over Python's int parsing limit
        raise APIError(400, f"request body is not valid JSON: an integer has more than "
                            f"{sys.get_int_max_str_digits()} digits", param="body",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", param="body", code="invalid_json")
    if _may_hold_surrogates(raw):
        where = _lone_surrogate(body)
        if where is not None:
            param, in_key = where
            what = "an object key contains" if in_key else "contains"
            raise bad_request(param, f"{what} an unpaired UTF-16 surrogate (\\ud800-\\udfff); "
                                     "text must be valid Unicode")
    return body


def _may_hold_surrogates(raw: bytes) -> bool:
    return (_SURROGATE_ESCAPE.search(raw) is not None
            or (raw.find(b"\xed") >= 0 and _SURROGATE_UTF8.search(raw) is not None)  # memchr first
            or json.detect_encoding(raw) not in ("utf-8", "utf-8-sig"))


def _lone_surrogate(body: dict[str, Any]) -> tuple[str, bool] | None:
    """(path, in a key) of the first string, in document order, holding a surrogate code point.

    json combines a valid escaped pair (an emoji as \\ud83d\\ude00) into one code point, so any
    surrogate left in a decoded string is unpaired. Iterative: the body may nest ~1000 deep.
    """
    def has(text: str) -> bool:
        return not text.isascii() and _SURROGATE.search(text) is not None

    def join(path: str, step: str | int) -> str:
        if isinstance(step, int):
            return f"{path}[{step}]"
        if len(step) > _MAX_KEY_IN_PARAM:
            step = step[:_MAX_KEY_IN_PARAM] + "..."
        return f"{path}.{step}" if path else step

    stack = [("", iter(body.items()))]
    while stack:
        path, children = stack[-1]
        for step, child in children:
            if isinstance(step, str) and has(step):
                return path or "body", True
            if isinstance(child, str):
                if has(child):
                    return join(path, step), False
            elif isinstance(child, (dict, list)):
                items = child.items() if isinstance(child, dict) else enumerate(child)
                stack.append((join(path, step), iter(items)))
                break
        else:
            stack.pop()
    return None


# -- typed field access ----------------------------------------------------------------------------

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def _is_int(v: object) -> bool:
    """An integer that fits the engine's int64 tensors (JSON allows any size)."""
    return isinstance(v, int) and not isinstance(v, bool) and INT64_MIN <= v <= INT64_MAX


def _is_number(v: object) -> bool:
    """A finite number; an integer past the float range is not one (isfinite would overflow)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    return math.isfinite(v) if isinstance(v, float) else abs(v) <= sys.float_info.max


def _opt(body: Mapping[str, Any], name: str, check: Callable[[Any], bool], what: str) -> Any:
    """``body[name]`` if present and not null, checked; None otherwise."""
    value = body.get(name)
    if value is None:
        return None
    if not check(value):
        if what == "an integer":
            what = "a 64-bit integer"
        raise bad_request(name, f"must be {what}", code="invalid_type")
    return value


def _opt_int(body, name, lo: int | None = None, hi: int | None = None) -> int | None:
    value = _opt(body, name, _is_int, "an integer")
    if value is not None and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad_request(name, f"must be {bounds}")
    return value


def _opt_number(body, name) -> float | None:
    return _opt(body, name, _is_number, "a number")


def _opt_bool(body, name) -> bool | None:
    return _opt(body, name, lambda v: isinstance(v, bool), "a boolean")


def _opt_str(body, name) -> str | None:
    return _opt(body, name, lambda v: isinstance(v, str), "a string")


def _refuse_unsupported(body: Mapping[str, Any], kind: str) -> None:
    """Fields Baton understands but cannot honour: refuse non-default values by name."""
    n = _opt_int(body, "n")
    if n is not None and n != 1:
        raise bad_request("n", "only n=1 is supported", code="unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        v = _opt_number(body, name)
        if v not in (None, 0, 0.0):
            raise bad_request(name, "is not supported (only 0)", code="unsupported_value")
    if body.get("logit_bias"):
        raise bad_request("logit_bias", "is not supported", code="unsupported_value")
    if kind == "completion":
        best_of = _opt_int(body, "best_of")
        if best_of is not None and best_of != 1:
            raise bad_request("best_of", "only best_of=1 is supported", code="unsupported_value")
        if _opt_bool(body, "echo"):
            raise bad_request("echo", "is not supported", code="unsupported_value")
        if _opt_str(body, "suffix"):
            raise bad_request("suffix", "is not supported", code="unsupported_value")
    else:
        if body.get("tools") or body.get("functions"):
            name = "tools" if body.get("tools") else "functions"
            raise bad_request(name, "tool calling is not supported", code="unsupported_value")
        fmt = body.get("response_format")
        if fmt is not None:
            if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
                raise bad_request("response_format", "must be an object with a string `type`",
                                  code="invalid_type")
            if fmt["type"] != "text":
                raise bad_request("response_format", "only type 'text' is supported",
                                  code="unsupported_value")


def _common(body: Mapping[str, Any], kind: str) -> dict[str, Any]:
    _refuse_unsupported(body, kind)
    model = _opt_str(body, "model")
    stream = bool(_opt_bool(body, "stream"))
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad_request("stream_options", "must be an object", code="invalid_type")
        if not stream:
            raise bad_request("stream_options", "is only allowed when stream is true")
        inc = opts.get("include_usage")
        if inc is not None and not isinstance(inc, bool):
            raise bad_request("stream_options.include_usage", "must be a boolean", code="invalid_type")
        include_usage = bool(inc)

    sampling: dict[str, Any] = {}
    for name in ("temperature", "top_p"):
        v = _opt_number(body, name)
        if v is not None:
            sampling[name] = float(v)
    top_k = _opt_int(body, "top_k")
    if top_k is not None:
        sampling["top_k"] = 0 if top_k == -1 else top_k  # vLLM spells "disabled" as -1
    seed = _opt_int(body, "seed")
    if seed is not None:
        sampling["seed"] = seed
    ignore_eos = _opt_bool(body, "ignore_eos")
    if ignore_eos is not None:
        sampling["ignore_eos"] = ignore_eos
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad_request("stop", "must be a string or a list of strings", code="invalid_type")
        if len(stop) > MAX_STOP_SEQUENCES:
            raise bad_request("stop", f"at most {MAX_STOP_SEQUENCES} sequences")
        if any(s == "" for s in stop):
            raise bad_request("stop", "must not contain empty strings")
        sampling["stop"] = tuple(stop)
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(_is_int(t) and t >= 0 for t in stop_ids):
            raise bad_request("stop_token_ids", "must be a list of non-negative integers",
                              code="invalid_type")
        sampling["stop_token_ids"] = tuple(stop_ids)

    return dict(
        model=model, stream=stream, include_usage=include_usage, sampling=sampling,
        user=_opt_str(body, "user"),
        priority=_opt_int(body, "priority"),
        sla_class=_opt_str(body, "sla_class"),
    )


def _max_tokens(body: Mapping[str, Any], names: Sequence[str]) -> int | None:
    """The first of ``names`` given; every one given is checked, the one that loses too."""
    values = [_opt_int(body, name, lo=1) for name in names]
    return next((v for v in values if v is not None), None)


def parse_completion(body: Mapping[str, Any], vocab_size: int | None = None) -> ParsedRequest:
    """POST /v1/completions. ``prompt`` is a string or a list of token ids (or a one-element batch)."""
    common = _common(body, "completion")
    if "prompt" not in body or body["prompt"] is None:
        raise bad_request("prompt", "is required", code="missing_field")
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request("prompt", "only one prompt per request is supported",
                              code="unsupported_value")
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not all(_is_int(t) for t in prompt):
            raise bad_request("prompt", "must be a string or a list of integer token ids",
                              code="invalid_type")
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in prompt):
            raise bad_request("prompt", f"token ids must be in [0, {vocab_size})")
    elif not isinstance(prompt, str):
        raise bad_request("prompt", "must be a string or a list of integer token ids",
                          code="invalid_type")
    if len(prompt) == 0:
        raise bad_request("prompt", "must not be empty")
    logprobs = _opt_int(body, "logprobs", lo=0, hi=MAX_LOGPROBS)
    return _checked(ParsedRequest(kind="completion", prompt=prompt, logprobs=logprobs,
                                  max_tokens=_max_tokens(body, ("max_tokens",)), **common))


def _message_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                raise bad_request(f"{where}[{j}]", "only text content parts are supported",
                                  code="unsupported_value")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(where, "must be a string or a list of text parts", code="invalid_type")


def parse_chat(body: Mapping[str, Any]) -> ParsedRequest:
    """POST /v1/chat/completions: ``messages`` in, rendered later with the tokenizer's template."""
    common = _common(body, "chat")
    messages = body.get("messages")
    if messages is None:
        raise bad_request("messages", "is required", code="missing_field")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "must be a non-empty list", code="invalid_type")
    flat: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(where, "must be an object", code="invalid_type")
        role = msg.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise bad_request(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}")
        content = msg.get("content")
        if content is None and role == "assistant":
            content = ""
        flat.append({"role": "system" if role == "developer" else role,
                     "content": _message_text(content, f"{where}.content")})
    want_logprobs = _opt_bool(body, "logprobs")
    top = _opt_int(body, "top_logprobs", lo=0, hi=MAX_LOGPROBS)
    if top is not None and not want_logprobs:
        raise bad_request("top_logprobs", "requires logprobs to be true")
    logprobs = (top or 0) if want_logprobs else None
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"))
    cap_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else (
        "max_tokens")
    return _checked(ParsedRequest(kind="chat", messages=flat, logprobs=logprobs,
                                  max_tokens=max_tokens, max_tokens_field=cap_field, **common))


def _checked(parsed: ParsedRequest) -> ParsedRequest:
    """Range checks live in ``SamplingParams``; run them now so every refusal happens at parse time."""
    parsed.sampling_params(parsed.max_tokens or 1)
    return parsed


# -- response shapes -------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str | None) -> str | None:
    """Engine reasons in OpenAI's vocabulary (a cancelled request never reaches a client)."""
    return {"stop": "stop", "length": "length"}.get(reason or "", reason)


class LogprobFormatter:
    """Engine ``TokenLogprob``s as OpenAI's completion or chat logprobs objects."""

    def __init__(self, token_text: Callable[[int], str]) -> None:
        self._text = token_text

    def completion(self, items: Sequence[TokenLogprob], text_offset: int) -> dict[str, Any]:
        tokens, lps, tops, offsets = [], [], [], []
        for item in items:
            tok = self._text(item.token_id)
            tokens.append(tok)
            lps.append(item.logprob)
            tops.append({self._text(t): lp for t, lp in item.top})
            offsets.append(text_offset)
            text_offset += len(tok)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": offsets}

    def chat(self, items: Sequence[TokenLogprob]) -> dict[str, Any]:
        def entry(token_id: int, lp: float) -> dict[str, Any]:
            tok = self._text(token_id)
            return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}

        return {"content": [dict(entry(i.token_id, i.logprob),
                                 top_logprobs=[entry(t, lp) for t, lp in i.top]) for i in items],
                "refusal": None}


def completion_body(rid: str, created: int, model: str, text: str, reason: str | None,
                    logprobs: dict | None, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                         "finish_reason": finish_reason(reason)}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, created: int, model: str, text: str, reason: str | None,
                     logprobs: dict | None, with_usage: bool) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                          "finish_reason": finish_reason(reason)}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def chat_body(rid: str, created: int, model: str, text: str, reason: str | None,
              logprobs: dict | None, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": logprobs, "finish_reason": finish_reason(reason)}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, created: int, model: str, delta: dict, reason: str | None,
               logprobs: dict | None, with_usage: bool) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                          "finish_reason": finish_reason(reason)}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(rid: str, created: int, model: str, kind: str, prompt_tokens: int,
                completion_tokens: int) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def model_list(name: str, created: int, max_model_len: int | None) -> dict:
    entry = {"id": name, "object": "model", "created": created, "owned_by": "baton"}
    if max_model_len:
        entry["max_model_len"] = max_model_len
    return {"object": "list", "data": [entry]}


def now() -> int:
    return int(time.time())


def sse(obj: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
