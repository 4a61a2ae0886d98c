"""OpenAI-compatible request parsing: a decoded JSON body in, a checked ``ParsedRequest`` out.

Parsing is pure: it raises ``APIError`` naming the offending field, or returns the request with its
``SamplingParams`` built (once, here, so every range check happens at parse time). Unknown fields are
ignored (as vLLM and OpenAI do); known fields whose values Baton cannot honour (``suffix``, non-text
content parts, ...) are refused by name (``unsupported_value``) rather than silently dropped, so a client never
gets a different answer than it asked for; with an incumbent such a request goes there instead
(see ``eligibility``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from baton_sidecar.engine.request import (RequestValidationError, SamplingParams, is_int64,
                                          is_number)
from baton_sidecar.server.errors import bad_request
from baton_sidecar.server.chat_template import has_tool_messages, parse_tool_messages
from baton_sidecar.server.oai_structured import parse_structured
from baton_sidecar.server.tools import ToolRequest, parse_tools

MAX_STOP_SEQUENCES = 16
MAX_LOGPROBS = 20
MAX_CHOICES = 128  # OpenAI's bound on n; the engine's batch size bounds it further
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class ParsedRequest:
    """One checked generation request. ``kind`` is "completion" or "chat"."""

    kind: str
    model: str | None
    params: SamplingParams  # max_tokens None: the rest of the context (chat without a cap)
    prompt: str | list[int] | None = None  # completions
    messages: list[dict[str, Any]] | None = None  # chat, content flattened to text (chat_template.py)
    tools: ToolRequest | None = None  # chat: the tools offered and tool_choice
    tool_template: bool = False  # chat: tools, or tool calls and results in the messages
    max_tokens_field: str = "max_tokens"  # the body field the cap came from, for errors about it
    echo: bool = False  # completions: the prompt before each choice's text (and its logprobs)
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    priority: int | None = None
    sla_class: str | None = None

    @property
    def operation(self) -> str:
        """``gen_ai.operation.name`` of the GenAI semantic conventions."""
        return "chat" if self.kind == "chat" else "text_completion"

    @property
    def logprobs(self) -> int | None:
        """Top-N alternatives per token; None = off."""
        return self.params.logprobs


# -- typed field access ----------------------------------------------------------------------------

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
    value = _opt(body, name, is_int64, "an integer")
    if value is not None and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad_request(name, f"must be {bounds}")
    return value


def _opt_number(body, name) -> float | None:
    return _opt(body, name, is_number, "a number")


def _opt_bool(body, name) -> bool | None:
    return _opt(body, name, lambda v: isinstance(v, bool), "a boolean")


def _opt_str(body, name) -> str | None:
    return _opt(body, name, lambda v: isinstance(v, str), "a string")


def _refuse_unsupported(body: Mapping[str, Any], kind: str) -> None:
    """Fields Baton understands but cannot honour: refuse non-default values by name."""
    if kind == "completion":
        if _opt_str(body, "suffix"):
            raise bad_request("suffix", "is not supported", code="unsupported_value")


def _common(body: Mapping[str, Any], kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ParsedRequest fields, SamplingParams fields) both routes share."""
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
    sampling.update(_choices(body, kind, stream))
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
        if not isinstance(stop_ids, list) or not all(is_int64(t) and t >= 0 for t in stop_ids):
            raise bad_request("stop_token_ids", "must be a list of non-negative integers",
                              code="invalid_type")
        sampling["stop_token_ids"] = tuple(stop_ids)

    sampling.update(_processors(body))
    structured = parse_structured(body)
    if structured is not None:
        sampling["structured"] = structured
    fields = dict(model=model, stream=stream, include_usage=include_usage,
                  user=_opt_str(body, "user"), priority=_opt_int(body, "priority"),
                  sla_class=_opt_str(body, "sla_class"))
    return fields, sampling


def _logit_bias(body: Mapping[str, Any]) -> dict[int, float] | None:
    """OpenAI's ``logit_bias``: token ids as JSON object keys ("28"), numbers as values."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise bad_request("logit_bias", "must be an object mapping token ids to numbers",
                          code="invalid_type")
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 18):
            raise bad_request("logit_bias", f"keys must be token ids (non-negative integers), got {key!r}")
        if not is_number(value):
            raise bad_request("logit_bias", f"the bias of token {key} must be a number",
                              code="invalid_type")
        out[int(key)] = float(value)
    return out


def _processors(body: Mapping[str, Any]) -> dict[str, Any]:
    """Penalties, biases and bans as ``SamplingParams`` fields (their ranges are checked there)."""
    sampling: dict[str, Any] = {}
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        v = _opt_number(body, name)
        if v is not None:
            sampling[name] = float(v)
    bias = _logit_bias(body)
    if bias:
        sampling["logit_bias"] = bias
    min_tokens = _opt_int(body, "min_tokens", lo=0)
    if min_tokens is not None:
        sampling["min_tokens"] = min_tokens
    words = body.get("bad_words")
    if words is not None:
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise bad_request("bad_words", "must be a list of strings", code="invalid_type")
        sampling["bad_words"] = tuple(words)
    ids = body.get("bad_words_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(
                isinstance(seq, list) and all(is_int64(t) for t in seq) for seq in ids):
            raise bad_request("bad_words_ids", "must be a list of lists of token ids",
                              code="invalid_type")
        sampling["bad_words_ids"] = tuple(tuple(seq) for seq in ids)
    return sampling


def _choices(body: Mapping[str, Any], kind: str, stream: bool) -> dict[str, int]:
    """``n`` (both routes) and ``best_of`` (completions: >= n; with more than n, not streamed)."""
    fields = {}
    n = _opt_int(body, "n", lo=1, hi=MAX_CHOICES)
    if n is not None:
        fields["n"] = n
    best_of = _opt_int(body, "best_of", lo=1, hi=MAX_CHOICES) if kind == "completion" else None
    if best_of is not None:
        if best_of < (n or 1):
            raise bad_request("best_of", "must be >= n")
        if stream and best_of != (n or 1):
            raise bad_request("best_of", "best_of > n cannot be streamed (the best are known at the end)")
        fields["best_of"] = best_of
    return fields


def _sampling_params(sampling: dict[str, Any], max_tokens: int | None, logprobs: int | None,
                     vocab_size: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
    """The request's one ``SamplingParams``; its range checks become 400s naming the field."""
    try:
        params = SamplingParams(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                **sampling)
        if vocab_size is not None:
            params.check_vocab(vocab_size)
        return params
    except RequestValidationError as exc:
        raise bad_request(exc.field, exc.message) from None


def _max_tokens(body: Mapping[str, Any], names: Sequence[str], lo: int = 1) -> int | None:
    """The first of ``names`` given; every one given is checked, the one that loses too."""
    values = [_opt_int(body, name, lo=lo) for name in names]
    return next((v for v in values if v is not None), None)


def parse_completion(body: Mapping[str, Any], vocab_size: int | None = None) -> ParsedRequest:
    """POST /v1/completions. ``prompt`` is a string or a list of token ids (or a one-element batch),
    bounded by ``vocab_size`` when known."""
    common, sampling = _common(body, "completion")
    if "prompt" not in body or body["prompt"] is None:
        raise bad_request("prompt", "is required", code="missing_field")
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request("prompt", "only one prompt per request is supported",
                              code="unsupported_value")
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not all(is_int64(t) for t in prompt):
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
    # With echo, max_tokens 0 answers the prompt alone (and its logprobs: lm-eval's loglikelihood).
    echo = bool(_opt_bool(body, "echo"))
    max_tokens = _max_tokens(body, ("max_tokens",), lo=0 if echo else 1)
    if max_tokens is None:
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
    # SamplingParams allows max_tokens 0 only with prompt logprobs: echo without logprobs asks
    # for them (top 0) and the answer leaves them out.
    prompt_logprobs = (logprobs or 0) if echo and (logprobs is not None or max_tokens == 0) else None
    return ParsedRequest(kind="completion", prompt=prompt, echo=echo, **common,
                         params=_sampling_params(sampling, max_tokens, logprobs, vocab_size, prompt_logprobs))


def parse_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``messages``, checked and flattened to text (``chat_template.parse_tool_messages``)."""
    messages = body.get("messages")
    if messages is None:
        raise bad_request("messages", "is required", code="missing_field")
    return parse_tool_messages(messages)


def parse_chat(body: Mapping[str, Any], vocab_size: int | None = None) -> ParsedRequest:
    """POST /v1/chat/completions: ``messages`` in, rendered later with the tokenizer's template.
    Without ``max_completion_tokens`` or ``max_tokens`` it may use the rest of the context. Token
    ids (``logit_bias``, ``bad_words_ids``) are bounded by ``vocab_size`` when known."""
    common, sampling = _common(body, "chat")
    flat = parse_messages(body)
    tools = parse_tools(body)
    tool_template = tools is not None or has_tool_messages(flat)
    constraint = tools.structured() if tools is not None else None
    if constraint is not None:  # required or named: the arguments follow the functions' schemas
        if "structured" in sampling:
            raise bad_request("tool_choice", f"{tools.choice} tool calls cannot be combined with "
                                             f"{sampling['structured'].field}")
        sampling["structured"] = constraint
    want_logprobs = _opt_bool(body, "logprobs")
    top = _opt_int(body, "top_logprobs", lo=0, hi=MAX_LOGPROBS)
    if top is not None and not want_logprobs:
        raise bad_request("top_logprobs", "requires logprobs to be true")
    logprobs = (top or 0) if want_logprobs else None
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"))
    cap_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else (
        "max_tokens")
    return ParsedRequest(kind="chat", messages=flat, max_tokens_field=cap_field, tools=tools,
                         tool_template=tool_template,
                         params=_sampling_params(sampling, max_tokens, logprobs, vocab_size), **common)
