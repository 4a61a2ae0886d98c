"""From sampled tokens to what callers see: stop checks, detokenization, ``RequestOutput`` deltas.

``OutputProcessor`` appends each sampled token to its request, decides whether it ends the
request (stop token ids, EOS, stop strings, ``max_tokens``, the model's context) and builds
the delta to stream. It decides nothing about rows, queues or when a delta is delivered:
that is the scheduler's (``update_from_output``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from .detokenizer import IncrementalDetokenizer
from .grammar import RowGrammar
from .logits import RowLogits, bad_word_ids
from .request import Request, RequestOutput, RequestStatus, TokenLogprob
from .sampler import RowSampler, SampledToken


@dataclass
class Tracked:
    """Engine-side companions of one request, kept until it has neither a queue entry nor a row."""

    request: Request
    sampler: RowSampler
    detokenizer: IncrementalDetokenizer
    stop_ids: frozenset[int]
    events: list[tuple[str, float]] = field(default_factory=list)  # not yet delivered
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # scored, for the next delta only

    @property
    def grammar(self) -> RowGrammar | None:
        return self.sampler.processors.grammar if self.sampler.processors is not None else None

    def event(self, name: str, at: float | None = None) -> None:
        self.events.append((name, time.monotonic() if at is None else at))


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: frozenset[int], max_model_len: int,
                 device: torch.device, vocab_size: int) -> None:
        self.tokenizer = tokenizer  # the engine thread's own copy
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.device = device
        self.vocab_size = vocab_size  # the logits' width
        self.finished_by_reason: Counter[str] = Counter()

    def track(self, request: Request) -> Tracked:
        params = request.params
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        processors = None
        if params.processed:
            banned = bad_word_ids(self.tokenizer, params.bad_words) + list(params.bad_words_ids)
            processors = RowLogits(params, request.prompt_token_ids, frozenset(stop_ids), banned,
                                   self.vocab_size, self.device, request.grammar)
        return Tracked(request, RowSampler(params, self.device, processors, request.index),
                       IncrementalDetokenizer(self.tokenizer, params.stop), frozenset(stop_ids),
                       events=[("queued", request.times.arrival)])

    def apply_token(self, tracked: Tracked, token: SampledToken) -> RequestOutput:
        """Append one token; the delta to stream (the final one if the token ends the request)."""
        request = tracked.request
        request.append_token(token.token_id)
        tracked.sampler.advance(token.token_id)
        logprob = token.logprob if request.params.logprobs is not None else None  # a ranked row's is not reported
        if token.logprob is not None and request.params.ranks_choices:
            request.cumulative_logprob += token.logprob.logprob
        if request.times.first_token is None:
            request.times.first_token = time.monotonic()
            tracked.event("first_token", request.times.first_token)
        status = self._stop_status(tracked, token.token_id)
        if status is not None:
            error = f"grammar: {tracked.grammar.error}" if status is RequestStatus.FINISHED_ERROR else None
            return self.finish(tracked, status, error, last_token=SampledToken(token.token_id, logprob))
        return self._delta(tracked, (token.token_id,), (logprob,) if logprob else None)

    def finish(self, tracked: Tracked, status: RequestStatus, error: str | None = None,
               last_token: SampledToken | None = None) -> RequestOutput:
        """End the request; its final delta (carrying ``last_token`` when a token ended it)."""
        request = tracked.request
        request.finish(status, error)
        tracked.event("finished", request.times.finished)
        self.finished_by_reason[status.finish_reason] += 1
        token_ids = (last_token.token_id,) if last_token else ()
        logprobs = (last_token.logprob,) if last_token and last_token.logprob else None
        return self._delta(tracked, token_ids, logprobs, final=True)

    def final(self, tracked: Tracked) -> RequestOutput:
        """A closing delta for a request already finished (nothing new in it)."""
        return self._delta(tracked, (), None, final=True)

    def _stop_status(self, tracked: Tracked, token_id: int) -> RequestStatus | None:
        request = tracked.request
        if token_id in tracked.stop_ids:
            return RequestStatus.FINISHED_STOPPED
        if token_id not in self.eos_token_ids or request.params.ignore_eos:
            tracked.detokenizer.add(token_id)
        if tracked.detokenizer.stopped:
            return RequestStatus.FINISHED_STOPPED
        grammar = tracked.grammar
        if grammar is not None and grammar.done:  # complete: only EOS could follow
            return RequestStatus.FINISHED_ERROR if grammar.error else RequestStatus.FINISHED_STOPPED
        if len(request.output_token_ids) >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def _delta(tracked: Tracked, token_ids: tuple[int, ...], logprobs: tuple[TokenLogprob, ...] | None,
               final: bool = False) -> RequestOutput:
        request = tracked.request
        events, tracked.events = tuple(tracked.events), []
        prompt_logprobs, tracked.prompt_logprobs = tracked.prompt_logprobs, None
        ranked = final and request.params.ranks_choices
        return RequestOutput(
            request_id=request.request_id, token_ids=token_ids,
            text=tracked.detokenizer.take_delta(final), logprobs=logprobs,
            finished=final, finish_reason=request.status.finish_reason if final else None,
            error=request.error, prompt_tokens=request.num_prompt_tokens,
            completion_tokens=len(request.output_token_ids), num_preemptions=request.num_preemptions,
            times=request.times, events=events, index=request.index,
            prompt_token_ids=tuple(request.prompt_token_ids) if prompt_logprobs is not None else None,
            prompt_logprobs=prompt_logprobs, cumulative_logprob=request.cumulative_logprob if ranked else None)
