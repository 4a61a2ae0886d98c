"""Admission: whether the engine accepts a request at all. One rule, decided in ``submit``.

``AsyncEngine.submit`` runs on the event-loop thread and answers synchronously, in this
order (HTTP status as ``server/local.py`` maps it):

1. shutting down                                        -> AdmissionError shutting_down (503)
2. what no wait can change, against the current policy  -> RequestValidationError (400)
   the prompt (empty, bad token ids, as long as the context), priority, SLA class,
   deadline, a request id already in flight, prompt + max_tokens over the context, more
   choices (n, best_of) than the batch has rows, prompt logprobs on a model that cannot
   score them; the request's projected KV peak alone (all its choices' rows) over the
   budget -> AdmissionError too_large (400)
3. queue capacity                                       -> AdmissionError queue_full (429, Retry-After)
   ``queue_admits`` on one count, ``QueueCount``: requests accepted and not yet started.
   submit checks and raises it under a lock; the engine thread lowers it after each loop
   by the requests that were first scheduled or ended unstarted (cancelled, failed) in it
   (``EngineCore.started_total``). Mid-step the count may still include requests that step
   is starting, so it errs towards refusing, never towards more than ``max_queue``
   accepted and waiting. Preempted requests do not count: they were admitted already. A
   request with n choices counts once: it is one prefill.

Nothing after ``submit`` refuses: an accepted request waits until the scheduler admits it
into the batch (batch size, KV budget, prefill budget, padding policy, priorities), which
is scheduling, not admission (``scheduler.py``).
"""

from __future__ import annotations

import threading
import time

from ..config import Limits, PolicyConfig
from .request import AdmissionError, Request, RequestValidationError
from .decisions import projected_peak_slots

TOO_LARGE = "too_large"  # the refusal of what can never fit the batch; also an ended request's error prefix
URGENT_HEADROOM = 0.8  # low-urgency work is refused once the queue is this full


def queue_admits(queued: int, max_queue: int, priority: int) -> bool:
    """Bounded queue that refuses low-urgency work first.

    Urgent requests (priority <= 0) may fill the queue; others are refused once it is
    80% full, keeping headroom for urgent arrivals.
    """
    limit = max_queue if priority <= 0 else max(1, int(max_queue * URGENT_HEADROOM))
    return queued < limit


class QueueCount:
    """Requests accepted and not yet started: the one count queue-capacity refusals use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.queued = 0

    def enter(self, limits: Limits, priority: int) -> None:
        """Count one more request, or raise ``queue_full`` (event-loop thread)."""
        with self._lock:
            if not queue_admits(self.queued, limits.max_queue, priority):
                raise AdmissionError("queue_full", f"the waiting queue is full ({limits.max_queue})",
                                     retry_after_s=1.0)
            self.queued += 1

    def leave(self, n: int) -> None:
        """``n`` requests started or ended unstarted (engine thread)."""
        if n:
            with self._lock:
                self.queued -= n


def tokenize_prompt(tokenizer, prompt: str | list[int], max_model_len: int) -> list[int]:
    """A prompt's token ids, or ``RequestValidationError("prompt", ...)``."""
    if isinstance(prompt, str):
        if not prompt:
            raise RequestValidationError("prompt", "must not be empty")
        token_ids = tokenizer.encode(prompt, add_special_tokens=True)
        if not token_ids:  # only characters the tokenizer drops (SmolLM2: \x04, \x1d, ...)
            raise RequestValidationError("prompt", "encodes to no tokens")
    elif isinstance(prompt, (list, tuple)):
        token_ids = list(prompt)
        vocab = len(tokenizer)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in token_ids):
            raise RequestValidationError("prompt", f"token ids must be integers in [0, {vocab})")
    else:
        raise RequestValidationError("prompt", "must be a string or a list of token ids")
    if not token_ids:
        raise RequestValidationError("prompt", "must not be empty")
    if len(token_ids) >= max_model_len:
        raise RequestValidationError(
            "prompt", f"{len(token_ids)} tokens is longer than the model's context ({max_model_len})")
    return token_ids


def resolve_class(policy: PolicyConfig, priority: int | None, sla_class: str | None,
                  deadline_s: float | None) -> tuple[int, float | None]:
    """``(priority, absolute deadline)`` from the request's own values and its SLA class."""
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)):
        raise RequestValidationError("priority", "must be an integer")
    deadline = None
    if sla_class is not None:
        sla = policy.sla_classes.get(sla_class)
        if sla is None:
            raise RequestValidationError(
                "sla_class", f"unknown class {sla_class!r}; known: {sorted(policy.sla_classes)}")
        priority = sla.priority if priority is None else priority
        if sla.e2e_ms is not None:
            deadline = time.monotonic() + sla.e2e_ms / 1000
    if deadline_s is not None:
        if not isinstance(deadline_s, (int, float)) or deadline_s <= 0:
            raise RequestValidationError("deadline_s", "must be a positive number of seconds")
        deadline = time.monotonic() + deadline_s
    return (0 if priority is None else priority), deadline


def check_shape(num_prompt_tokens: int, max_tokens: int, max_model_len: int, limits: Limits,
                rows: int = 1, rows_field: str = "n") -> None:
    """Refuse what can never run: over the model's context (400), more rows (choices) than the
    batch holds (400 naming ``rows_field``) or, alone, over the KV budget."""
    total = num_prompt_tokens + max_tokens
    if total > max_model_len:
        raise RequestValidationError(
            "max_tokens", f"prompt ({num_prompt_tokens}) + max_tokens ({max_tokens}) exceeds the "
                          f"model's context ({max_model_len})")
    if rows > limits.max_batch_size:
        raise RequestValidationError(
            rows_field, f"{rows} choices need {rows} rows at once; the batch holds {limits.max_batch_size}")
    if projected_peak_slots([(num_prompt_tokens, max_tokens)] * rows) > limits.max_kv_tokens:
        what = f" x {rows} choices" if rows > 1 else ""
        raise AdmissionError(TOO_LARGE, f"prompt + max_tokens ({total}){what} can never fit the "
                                          f"KV-token budget ({limits.max_kv_tokens})")


def no_longer_fits(request: Request, limits: Limits) -> str:
    """The error of a queued request that a tighter policy left unable to run even alone; it starts
    with ``TOO_LARGE``, so the server answers it as admission answers ``too_large``."""
    to_go = request.max_tokens - len(request.output_token_ids)
    what = f" x {request.num_rows} choices" if request.num_rows > 1 else ""
    return (f"{TOO_LARGE}: prompt and tokens so far ({request.num_tokens}) + {to_go} more{what} no longer fit "
            f"the batch after a policy change (max_batch_size {limits.max_batch_size}, "
            f"max_kv_tokens {limits.max_kv_tokens})")
