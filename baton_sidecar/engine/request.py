"""Requests, their sampling parameters and what the engine streams back.

Token lists change only through ``Request`` methods; ``RequestStatus`` is ordered so that
``status >= FINISHED`` means "done, whatever the reason".
"""

from __future__ import annotations

import dataclasses
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
    # Choices: ``best_of`` (default ``n``) are generated from one prefill, forked into that many
    # rows; the ``n`` with the highest cumulative logprob are returned (``best_choices``).
    n: int = 1
    best_of: int | None = None
    # Logprobs of the prompt's tokens (top-N alternatives each), scored by its own prefill
    # forward. With it, ``max_tokens`` may be 0: prefill only, nothing generated.
    prompt_logprobs: int | None = None
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

        lowest = 0 if self.prompt_logprobs is not None else 1
        if self.max_tokens is not None and (not is_int64(self.max_tokens) or self.max_tokens < lowest):
            bad("max_tokens", "must be an integer >= 1 (0 only with prompt_logprobs)")
        if not is_int64(self.n) or not 1 <= self.n <= MAX_CHOICES:
            bad("n", f"must be an integer in [1, {MAX_CHOICES}]")
        if self.best_of is not None and (not is_int64(self.best_of) or not self.n <= self.best_of <= MAX_CHOICES):
            bad("best_of", f"must be an integer in [n, {MAX_CHOICES}]")
        if self.prompt_logprobs is not None and (
                not is_int64(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= 20):
            bad("prompt_logprobs", "must be an integer in [0, 20]")
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

    @property
    def num_sequences(self) -> int:
        """Choices generated: ``best_of``, or ``n``. Each is a row of the batch."""
        return self.n if self.best_of is None else self.best_of

    @property
    def ranks_choices(self) -> bool:
        """More choices are generated than returned: each needs its cumulative logprob."""
        return self.num_sequences > self.n


MAX_CHOICES = 128  # OpenAI's bound on ``n``; the batch size bounds it further (admission.py)


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
    """One delta of one choice streamed to the caller; each choice's last has ``finished=True``.

    ``text`` is the new text since the previous delta (stop strings already cut off).
    ``request_id`` is the choice's own id (``choice_id``): the caller's for choice 0.
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
    index: int = 0  # the choice (0 .. num_sequences - 1)
    # On a choice's first delta, when ``prompt_logprobs`` was asked: the prompt's ids and the
    # logprobs of its tokens 1 .. P-1 (the first token has none: nothing precedes it).
    prompt_token_ids: tuple[int, ...] | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    cumulative_logprob: float | None = None  # on a final delta when choices are ranked (best_of)


def choice_id(request_id: str, index: int) -> str:
    """The engine-wide id of choice ``index`` of a request: the caller's id for choice 0."""
    return request_id if index == 0 else f"{request_id}#{index}"


def collect(deltas: list[RequestOutput], params: SamplingParams) -> RequestOutput:
    """One choice's deltas as a single output: all its tokens, text and logprobs."""
    first, last = deltas[0], deltas[-1]
    logprobs = [lp for out in deltas for lp in out.logprobs or ()]
    return dataclasses.replace(
        last, token_ids=tuple(t for out in deltas for t in out.token_ids), text="".join(out.text for out in deltas),
        logprobs=tuple(logprobs) if params.logprobs is not None else None,
        prompt_token_ids=first.prompt_token_ids, prompt_logprobs=first.prompt_logprobs)


def best_choices(finals: list[RequestOutput], n: int) -> list[RequestOutput]:
    """``best_of``: the ``n`` choices with the highest cumulative logprob (ties: lower index
    first), re-indexed 0 .. n-1, as vLLM ranks them. Each output needs ``cumulative_logprob``."""
    ranked = sorted(finals, key=lambda out: (-(out.cumulative_logprob or 0.0), out.index))[:n]
    return [dataclasses.replace(out, index=i) for i, out in enumerate(ranked)]


@dataclass(eq=False)  # identity equality: membership tests never compare token lists
class Request:
    """A request's full state inside the engine (owned by the engine thread).

    ``num_computed_tokens`` counts the tokens whose K/V the engine holds: prefill (whole, or
    chunk by chunk) raises it to ``num_prefill_tokens``, each decode step adds one, a
    recompute preemption resets it to 0 (a swap keeps it: the K/V waits on host memory).
    While the request has a row in the batch it is ``num_tokens - 1``: the last sampled
    token is pending, fed at the next decode step.

    A request with ``n`` (or ``best_of``) > 1 is choice 0 of a group: until its first prefill
    it carries the other choices in ``forks``; that prefill's row is copied into one row per
    choice (one prefill for all), after which every choice is a request of its own (own
    tokens, sampler, preemptions), and ``forks`` is empty.
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
    index: int = 0  # the choice it is
    parent_id: str | None = None  # choice 0's id, for choices >= 1
    forks: list[Request] = field(default_factory=list)  # choices 1.. until its first prefill
    cumulative_logprob: float = 0.0  # summed over sampled tokens; kept only when choices are ranked

    @property
    def group_id(self) -> str:
        """The caller's id: choice 0's."""
        return self.parent_id or self.request_id

    @property
    def num_rows(self) -> int:
        """Rows it takes in the batch once it joins: itself and its pending forks."""
        return 1 + len(self.forks)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Its next prefill scores the prompt: asked for, and not delivered yet (a
        recompute re-prefill after the first token has them already)."""
        return self.params.prompt_logprobs is not None and not self.output_token_ids

    def fork(self) -> None:
        """Create choices 1 .. num_sequences - 1, waiting inside this one for its prefill; each
        constrained choice gets its own copy of the grammar matcher."""
        self.forks = [
            Request(choice_id(self.request_id, i), self.prompt_token_ids, self.params, self.max_tokens,
                    priority=self.priority, sla_class=self.sla_class, deadline=self.deadline,
                    times=RequestTimes(arrival=self.times.arrival), index=i, parent_id=self.request_id,
                    grammar=self.grammar.fork() if self.grammar is not None else None)
            for i in range(1, self.params.num_sequences)]

    def release_forks(self) -> None:
        """After its first prefill: the forks have rows (or ended) of their own."""
        self.forks = []

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
