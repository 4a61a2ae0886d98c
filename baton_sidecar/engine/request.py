"""Requests, their sampling parameters and what the engine streams back.

Token lists change only through ``Request`` methods; ``RequestStatus`` is ordered so that
``status >= FINISHED`` means "done, whatever the reason".
"""

from __future__ import annotations

import enum
import math
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

if TYPE_CHECKING:
    from .grammar import RowGrammar


class RequestValidationError(ValueError):
    """Bad user input. ``field`` names the offending request field (for HTTP 400 bodies)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


class AdmissionError(RuntimeError):
    """The engine refused a request. ``reason`` is one of ``REASONS``.

    queue_full    -> HTTP 429 with Retry-After (try later)
    too_large     -> HTTP 400 (can never fit this engine's KV budget or context)
    shutting_down -> HTTP 503 (draining)
    """

    REASONS = ("queue_full", "too_large", "shutting_down")

    def __init__(self, reason: str, message: str, retry_after_s: float | None = None) -> None:
        assert reason in self.REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


# As vLLM's _SAMPLING_EPS. Sampling that cold is greedy but for float error, and below ~1e-37
# logits / temperature overflows float32 into NaN probabilities (the last token id, every step).
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: to the end of the model's context (``Request.max_tokens``)
    temperature: float = 1.0  # 0 (or anything under GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled; at or above the vocabulary it keeps every token (the sampler clamps)
    seed: int | None = None  # per-request generator: same tokens whatever else is batched
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; N = chosen token's logprob plus top-N alternatives
    # Logits processors (engine/logits.py), in vLLM's order: bans, min_tokens, logit_bias, penalties.
    presence_penalty: float = 0.0  # OpenAI's: minus this once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the token's count in the output
    repetition_penalty: float = 1.0  # vLLM's / transformers': prompt + output tokens, / if > 0 else *
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), a mapping accepted; clamped to ±100
    min_tokens: int = 0  # stop tokens (EOS included unless ignore_eos) are masked until this many
    bad_words: tuple[str, ...] = ()  # vLLM's: each word tokenized, with and without a leading space
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # transformers': the last id is banned after the rest
    structured: StructuredOutput | None = None  # a grammar the output must follow (engine/grammar.py)

    def __post_init__(self) -> None:
        def bad(name: str, message: str) -> None:
            raise RequestValidationError(name, message)

        self._normalise()

        if self.max_tokens is not None and (not is_int64(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1")
        if not is_number(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a number >= 0")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be a number in (0, 1]")
        if not is_int64(self.top_k) or not 0 <= self.top_k < 2**31:
            bad("top_k", "must be an integer in [0, 2**31)")
        if self.seed is not None and (not is_int64(self.seed) or not 0 <= self.seed < 2**63):
            bad("seed", "must be an integer in [0, 2**63)")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if not all(is_int64(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        if self.logprobs is not None and (not is_int64(self.logprobs) or not 0 <= self.logprobs <= 20):
            bad("logprobs", "must be an integer in [0, 20]")
        self._check_processors(bad)

    def _normalise(self) -> None:
        """Mappings and lists in, tuples stored: the params stay a hashable value."""
        bias = self.logit_bias
        if isinstance(bias, Mapping):
            bias = tuple(bias.items())
        if isinstance(bias, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in bias):
            # Clamped as vLLM does (OpenAI documents the same range).
            bias = tuple((t, max(-100.0, min(100.0, float(b)))) if is_number(b) else (t, b) for t, b in bias)
        object.__setattr__(self, "logit_bias", bias)
        for name in ("stop", "stop_token_ids", "bad_words"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.bad_words_ids, (list, tuple)):
            object.__setattr__(self, "bad_words_ids", tuple(
                tuple(ids) if isinstance(ids, (list, tuple)) else ids for ids in self.bad_words_ids))

    def _check_processors(self, bad: Callable[[str, str], None]) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                bad(name, "must be a number in [-2, 2]")
        if not is_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= 2**31:
            bad("repetition_penalty", "must be a number > 0")
        if not isinstance(self.logit_bias, tuple) or not all(
                is_int64(t) and t >= 0 and is_number(b) for t, b in self.logit_bias):
            bad("logit_bias", "must map token ids (integers >= 0) to numbers")
        if not is_int64(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be at most max_tokens ({self.max_tokens})")
        if not isinstance(self.bad_words, tuple) or not all(isinstance(w, str) and w.strip() for w in self.bad_words):
            bad("bad_words", "must be non-blank strings")
        if not isinstance(self.bad_words_ids, tuple) or not all(
                isinstance(ids, tuple) and ids and all(is_int64(t) and t >= 0 for t in ids)
                for ids in self.bad_words_ids):
            bad("bad_words_ids", "must be non-empty lists of token ids (integers >= 0)")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            bad("structured", "must be a StructuredOutput")

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the request names must exist: ``RequestValidationError`` naming the field."""
        if any(t >= vocab_size for t, _ in self.logit_bias):
            raise RequestValidationError("logit_bias", f"token ids must be in [0, {vocab_size})")
        if any(t >= vocab_size for ids in self.bad_words_ids for t in ids):
            raise RequestValidationError("bad_words_ids", f"token ids must be in [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def processed(self) -> bool:
        """Whether any logits processor applies (rows without one skip them all)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens or self.bad_words or self.bad_words_ids
                    or self.structured is not None)


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the whole output, compiled by ``engine/grammar.py`` (llguidance).

    ``kind``: "json" (``spec`` a JSON schema, as text), "json_object" (any JSON object; ``spec``
    unused), "regex", "choice" (``spec`` a JSON list of strings), "grammar" (Lark or GBNF).
    ``field`` is the request field it came from, named by errors about it.
    """

    KINDS = ("json", "json_object", "regex", "choice", "grammar")

    kind: str
    spec: str = ""
    field: str = "structured"

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS or not isinstance(self.spec, str):
            raise RequestValidationError(self.field, f"kind must be one of {', '.join(self.KINDS)}")


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def is_int64(value: object) -> bool:
    """An integer (not a bool) that fits the engine's int64 tensors; JSON allows any size."""
    return isinstance(value, int) and not isinstance(value, bool) and INT64_MIN <= value <= INT64_MAX


def is_number(value: object) -> bool:
    """A finite number; an integer past the float range is not one (isfinite would overflow)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return math.isfinite(value) if isinstance(value, float) else abs(value) <= sys.float_info.max


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # split off the batch; K/V swapped to host or dropped for recompute
    # Anything from here on is finished.
    FINISHED_STOPPED = 10  # EOS, stop token id or stop string
    FINISHED_LENGTH = 11  # max_tokens or the model's context
    FINISHED_CANCELLED = 12
    FINISHED_ERROR = 13

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_CANCELLED: "cancelled",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) alternatives, best first


@dataclass
class RequestTimes:
    """Wall-clock stamps (time.monotonic) for latency metrics and tracing events."""

    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None

    @property
    def queue_s(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival


@dataclass(frozen=True)
class RequestOutput:
    """One delta streamed to the caller; the last one has ``finished=True``.

    ``text`` is the new text since the previous delta (stop strings already cut off).
    """

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None
    finished: bool = False
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    num_preemptions: int = 0
    times: RequestTimes | None = None
    events: tuple[tuple[str, float], ...] = ()  # (name, monotonic time): queued, prefilled, preempted, ...


@dataclass(eq=False)  # identity equality: membership tests never compare token lists
class Request:
    """A request's full state inside the engine (owned by the engine thread).

    ``num_computed_tokens`` counts the tokens whose K/V the engine holds: prefill (whole, or
    chunk by chunk) raises it to ``num_prefill_tokens``, each decode step adds one, a
    recompute preemption resets it to 0 (a swap keeps it: the K/V waits on host memory).
    While the request has a row in the batch it is ``num_tokens - 1``: the last sampled
    token is pending, fed at the next decode step.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens, or what is left of the context when that is None
    priority: int = 0  # lower = more urgent (vLLM's convention)
    sla_class: str | None = None
    deadline: float | None = None  # absolute time.monotonic() by which it should finish
    times: RequestTimes = field(default_factory=RequestTimes)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    num_computed_tokens: int = 0
    error: str | None = None
    grammar: RowGrammar | None = None  # its matcher when params.structured is set (made at submit)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens a (re)prefill computes: the prompt, or after a recompute preemption
        everything but the pending last token."""
        return self.num_tokens - 1 if self.output_token_ids else len(self.prompt_token_ids)

    def prefill_token_ids(self, start: int = 0, stop: int | None = None) -> list[int]:
        """Tokens ``[start, stop)`` of what a prefill computes (see ``num_prefill_tokens``)."""
        stop = self.num_prefill_tokens if stop is None else stop
        return self.all_token_ids[start:stop]

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def finish(self, status: RequestStatus, error: str | None = None) -> None:
        assert status.finished, status
        self.status = status
        self.error = error
        self.times.finished = time.monotonic()
