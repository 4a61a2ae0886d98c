"""The synchronous engine step: plan (scheduler) -> execute (runner) -> apply (here).

``EngineCore`` is owned by one thread. It tracks each request's sampler, detokenizer and
pending events, and turns sampled tokens into ``RequestOutput`` deltas. Finished rows leave
the batch in the same step (re-batching); in run-to-completion mode they ride along and
their final output is held until the whole batch is done.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import EngineConfig, PolicyConfig
from ..model import LoadedModel
from . import row_padding
from .detokenizer import IncrementalDetokenizer
from .request import Request, RequestOutput, RequestStatus, TokenLogprob
from .runner import ChunkedPrefill, ModelRunner, Prefilled, SwappedRow
from .sampler import RowSampler, SampledToken, sample
from .scheduler import BatchView, Scheduler, StepPlan

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    swapped: int = 0
    batch_size: int = 0
    padding_ratio: float = 0.0
    kv_tokens_used: int = 0  # padded slots of the live window
    kv_tokens_capacity: int = 0  # the policy's KV-token budget
    kv_bytes_allocated: int = 0
    swapped_bytes: int = 0  # K/V of swapped-out rows on host memory
    steps: int = 0
    preemptions_total: int = 0
    # Summed over decode steps: the live window's slots, and how many of them were padding
    # (a rate of the two gives the exact padding ratio over any interval).
    kv_slots_total: int = 0
    kv_padding_slots_total: int = 0
    refusals_by_reason: dict[str, int] = field(default_factory=dict)
    finished_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class _Tracked:
    """Engine-side companions of one request."""

    request: Request
    sampler: RowSampler
    detokenizer: IncrementalDetokenizer
    stop_ids: frozenset[int]
    events: list[tuple[str, float]] = field(default_factory=list)
    held_final: RequestOutput | None = None  # run-to-completion: delivered when the batch ends


def _tokens_to_prefill(request: Request) -> list[int]:
    """A recompute-resumed request re-prefills everything but its pending (last) token."""
    return request.all_token_ids[:-1] if request.output_token_ids else request.prompt_token_ids


class EngineCore:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, policy: PolicyConfig) -> None:
        self.loaded = loaded
        # The engine thread's own copy: a fast tokenizer's Rust state is not safe to share
        # with the server threads that tokenize prompts meanwhile.
        self.tokenizer = copy.deepcopy(loaded.tokenizer)
        self.config = config
        self.run_to_completion = config.batching == "run_to_completion"
        padded_rows = row_padding.calibrate(loaded.model, loaded.device) if config.decode_row_padding == "auto" else {}
        self.runner = ModelRunner(loaded, padded_rows)
        self.scheduler = Scheduler(policy, run_to_completion=self.run_to_completion)
        self.tracked: dict[str, _Tracked] = {}
        self.swapped_kv: dict[str, SwappedRow] = {}
        self.chunking: dict[str, ChunkedPrefill] = {}  # long prompts being prefilled chunk by chunk
        self.riding: set[str] = set()  # run-to-completion rows that are done but still in the batch
        # Called mid-step with the outputs produced so far (prefills' first tokens); without
        # it everything is returned by ``step``. Set by AsyncEngine.
        self.publish_early: Callable[[list[RequestOutput]], None] | None = None
        self.steps = 0
        self.preemptions_total = 0
        self.kv_slots_total = 0
        self.kv_padding_slots_total = 0
        self.finished_by_reason: Counter[str] = Counter()

    @property
    def policy(self) -> PolicyConfig:
        return self.scheduler.policy

    def apply_policy(self, policy: PolicyConfig) -> None:
        """Takes effect at the next step; in-flight requests keep their tokens."""
        self.scheduler.policy = policy

    # --- intake ---------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        params = request.params
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.loaded.eos_token_ids
        self.tracked[request.request_id] = _Tracked(
            request, RowSampler(params, self.runner.device),
            IncrementalDetokenizer(self.tokenizer, params.stop), frozenset(stop_ids),
            events=[("queued", request.times.arrival)])
        self.scheduler.add(request)

    def abort(self, request_id: str) -> list[RequestOutput]:
        tracked = self.tracked.get(request_id)
        if tracked is None or tracked.request.status.finished:
            return []
        return [self._finish(tracked, RequestStatus.FINISHED_CANCELLED)]

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # --- one step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        now = time.monotonic()
        cache = self.runner.cache
        # The oldest chunked prompt gets this step's next chunk (see _advance_chunked_prefill).
        chunking = next(iter(self.chunking.values()), None)
        chunk = 0 if chunking is None else len(chunking.tokens) - chunking.done
        view = BatchView(cache.rows, cache.length, self.runner.num_cached_tokens(),
                         prefill_reserved=min(chunk, self.scheduler.prefill_token_limit))
        plan = self.scheduler.schedule(now, view)
        outputs: list[RequestOutput] = []
        self._preempt(plan)
        self._resume(plan.resume)
        if plan.prefill:
            self._start_prefills(plan.prefill, outputs)
        self._advance_chunked_prefill(outputs)
        if outputs and self.publish_early is not None:
            self.publish_early(outputs)  # newcomers' first tokens need not wait for the decode pass
            outputs = []
        if self.runner.num_rows:
            self._decode(outputs)
        self._release_finished_rtc_batch(outputs)
        self.runner.shrink_if_sparse(self.policy.padding.compaction_threshold)
        self.steps += 1
        return outputs

    def _preempt(self, plan: StepPlan) -> None:
        for request in plan.preempt:
            rid = request.request_id
            mode = plan.preemption_mode
            if rid in self.chunking:  # not in the batch yet: start its prefill over later
                del self.chunking[rid]
                mode = "recompute"
            elif mode == "swap":
                self.swapped_kv[rid] = self.runner.swap_out(rid)
            else:
                self.runner.remove([rid])
            self.scheduler.on_preempted(request, mode)
            self.tracked[rid].events.append(("preempted", time.monotonic()))
            self.preemptions_total += 1

    def _resume(self, requests: list[Request]) -> None:
        for request in requests:
            self.runner.swap_in(request.request_id, self.swapped_kv.pop(request.request_id))
            self.scheduler.on_running(request)
            self.tracked[request.request_id].events.append(("resumed", time.monotonic()))

    def _start_prefills(self, requests: list[Request], outputs: list[RequestOutput]) -> None:
        """Prefill short newcomers together now; long ones are chunked over the next steps."""
        now = time.monotonic()
        budget = self.scheduler.prefill_token_limit
        whole = []
        for request in requests:
            if request.times.first_scheduled is None:
                request.times.first_scheduled = now
                self.tracked[request.request_id].events.append(("scheduled", now))
            tokens = _tokens_to_prefill(request)
            if len(tokens) > budget:
                self.chunking[request.request_id] = ChunkedPrefill(request, tokens)
                self.scheduler.on_running(request)
            else:
                whole.append(request)
        if whole:
            try:
                prefilled = self.runner.prefill([r.request_id for r in whole],
                                                [_tokens_to_prefill(r) for r in whole])
            except Exception as error:  # only these requests fail; the running batch is untouched
                self._fail(whole, f"prefill failed: {error}", outputs)
                return
            self._join_batch(whole, prefilled, outputs)

    def _advance_chunked_prefill(self, outputs: list[RequestOutput]) -> None:
        """One chunk of the oldest long prompt per step, so the batch keeps decoding meanwhile."""
        if not self.chunking:
            return
        state = next(iter(self.chunking.values()))
        rid = state.request.request_id
        try:
            prefilled = self.runner.prefill_chunk(state, self.scheduler.prefill_token_limit)
        except Exception as error:
            del self.chunking[rid]
            self._fail([state.request], f"prefill failed: {error}", outputs)
            return
        if prefilled is not None:  # the last chunk is done
            del self.chunking[rid]
            self._join_batch([state.request], prefilled, outputs)

    def _fail(self, requests: list[Request], error: str, outputs: list[RequestOutput]) -> None:
        log.error("%s (requests %s)", error, [r.request_id for r in requests])
        for request in requests:
            outputs.append(self._finish(self.tracked[request.request_id], RequestStatus.FINISHED_ERROR,
                                        error=error))

    def _join_batch(self, requests: list[Request], prefilled: Prefilled, outputs: list[RequestOutput]) -> None:
        """Sample prefilled requests' first token, then embed the unfinished ones into the batch."""
        stamp = time.monotonic()
        fresh = [i for i, r in enumerate(requests) if not r.output_token_ids]
        sampled = dict(zip(fresh, sample(prefilled.last_logits[fresh],
                                         [self.tracked[requests[i].request_id].sampler for i in fresh])))
        embed_rows, next_tokens = [], []
        for i, request in enumerate(requests):
            tracked = self.tracked[request.request_id]
            tracked.events.append(("prefilled" if i in sampled else "resumed", stamp))
            self.scheduler.on_running(request)
            if i in sampled:
                output = self._apply_token(tracked, sampled[i])
                if output is not None:
                    outputs.append(output)
                if tracked.request.status.finished:
                    continue
                next_tokens.append(sampled[i].token_id)
            else:
                next_tokens.append(request.output_token_ids[-1])
            embed_rows.append(i)
        self.runner.embed(prefilled, embed_rows, next_tokens)

    def _decode(self, outputs: list[RequestOutput]) -> None:
        slots = self.runner.cache.num_slots()
        self.kv_slots_total += slots
        self.kv_padding_slots_total += slots - self.runner.num_cached_tokens()
        try:
            logits = self.runner.decode()  # [B, V]
        except Exception as error:  # a batch-wide failure: every running request ends with it
            log.exception("decode step failed")
            for rid in list(self.runner.row_ids):
                tracked = self.tracked.get(rid)
                if tracked is not None and not tracked.request.status.finished:
                    outputs.append(self._finish(tracked, RequestStatus.FINISHED_ERROR,
                                                error=f"decode failed: {error}"))
            self._clear_batch(outputs)
            return
        row_ids = list(self.runner.row_ids)
        samplers = [self.tracked[rid].sampler for rid in row_ids]
        tokens = sample(logits, samplers)
        next_tokens, leaving = [], []
        for rid, token in zip(row_ids, tokens):
            next_tokens.append(token.token_id)
            if rid in self.riding:
                continue  # run-to-completion: a finished row rides along, its tokens discarded
            tracked = self.tracked[rid]
            output = self._apply_token(tracked, token)
            if output is not None:
                outputs.append(output)
            if tracked.request.status.finished and not self.run_to_completion:
                leaving.append(rid)
        self.runner.set_next_tokens(next_tokens)
        if leaving:
            self.runner.remove(leaving)  # finished rows leave in the same step

    # --- applying tokens ------------------------------------------------------------------

    def _apply_token(self, tracked: _Tracked, token: SampledToken) -> RequestOutput | None:
        """Append one token; return the delta to deliver (None when it is held back)."""
        request = tracked.request
        request.append_token(token.token_id)
        now = time.monotonic()
        if request.times.first_token is None:
            request.times.first_token = now
            tracked.events.append(("first_token", now))
        status = self._stop_status(tracked, token.token_id)
        if status is not None:
            return self._finish(tracked, status, last_token=token)
        return self._delta(tracked, (token.token_id,), (token.logprob,) if token.logprob else None)

    def _stop_status(self, tracked: _Tracked, token_id: int) -> RequestStatus | None:
        request = tracked.request
        if token_id in tracked.stop_ids:
            return RequestStatus.FINISHED_STOPPED
        if token_id not in self.loaded.eos_token_ids or request.params.ignore_eos:
            tracked.detokenizer.add(token_id)
        if tracked.detokenizer.stopped:
            return RequestStatus.FINISHED_STOPPED
        if len(request.output_token_ids) >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.loaded.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _delta(self, tracked: _Tracked, token_ids: tuple[int, ...],
               logprobs: tuple[TokenLogprob, ...] | None, final: bool = False) -> RequestOutput:
        request = tracked.request
        events, tracked.events = tuple(tracked.events), []
        return RequestOutput(
            request_id=request.request_id, token_ids=token_ids,
            text=tracked.detokenizer.take_delta(final), logprobs=logprobs,
            finished=final, finish_reason=request.status.finish_reason if final else None,
            error=request.error, prompt_tokens=request.num_prompt_tokens,
            completion_tokens=len(request.output_token_ids), num_preemptions=request.num_preemptions,
            times=request.times, events=events)

    def _finish(self, tracked: _Tracked, status: RequestStatus, error: str | None = None,
                last_token: SampledToken | None = None) -> RequestOutput | None:
        """End a request and return its final delta (None while run-to-completion holds it).

        A cancelled row leaves the batch here; rows that stop or hit their length are
        removed by the caller, all in one go after the step.
        """
        request, rid = tracked.request, tracked.request.request_id
        in_batch = rid in self.runner.row_ids
        request.finish(status, error)
        tracked.events.append(("finished", request.times.finished))
        self.finished_by_reason[status.finish_reason] += 1
        token_ids = (last_token.token_id,) if last_token else ()
        logprobs = (last_token.logprob,) if last_token and last_token.logprob else None
        output = self._delta(tracked, token_ids, logprobs, final=True)
        self.swapped_kv.pop(rid, None)
        self.chunking.pop(rid, None)
        if self.run_to_completion and in_batch:
            self.riding.add(rid)  # the row (and its scheduler entry) stays until the batch is done
            if status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
                tracked.held_final = output
                return None
            return output
        self.scheduler.remove(request)
        del self.tracked[rid]
        if in_batch and status == RequestStatus.FINISHED_CANCELLED:
            self.runner.remove([rid])
        return output

    def _release_finished_rtc_batch(self, outputs: list[RequestOutput]) -> None:
        """Run-to-completion: once every row is done, deliver the held results and clear the batch."""
        if self.run_to_completion and self.runner.num_rows and self.riding.issuperset(self.runner.row_ids):
            self._clear_batch(outputs)

    def _clear_batch(self, outputs: list[RequestOutput]) -> None:
        """Remove every row; deliver what run-to-completion held back."""
        for rid in self.riding:
            tracked = self.tracked.pop(rid, None)
            if tracked is not None:
                self.scheduler.remove(tracked.request)
                if tracked.held_final is not None:
                    outputs.append(tracked.held_final)
        self.riding.clear()
        self.runner.remove(list(self.runner.row_ids))

    def fail_all(self, error: str) -> list[RequestOutput]:
        """Last resort after an unexpected step failure: end every request, reset the batch."""
        outputs = []
        for tracked in list(self.tracked.values()):
            if not tracked.request.status.finished:
                tracked.request.finish(RequestStatus.FINISHED_ERROR, error)
                self.finished_by_reason["error"] += 1
            output = tracked.held_final or self._delta(tracked, (), None, final=True)
            outputs.append(output)
            self.scheduler.remove(tracked.request)
        self.tracked.clear()
        self.chunking.clear()
        self.swapped_kv.clear()
        self.riding.clear()
        self.runner.reset()
        return outputs

    # --- observability ----------------------------------------------------------------------

    def stats(self) -> EngineStats:
        cache = self.runner.cache
        return EngineStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            swapped=len(self.scheduler.swapped), batch_size=cache.rows,
            padding_ratio=cache.padding_ratio(), kv_tokens_used=cache.num_slots(),
            kv_tokens_capacity=self.policy.limits.max_kv_tokens,
            kv_bytes_allocated=cache.allocated_bytes(),
            swapped_bytes=sum(s.kv.nbytes() for s in self.swapped_kv.values()),
            steps=self.steps, preemptions_total=self.preemptions_total,
            kv_slots_total=self.kv_slots_total, kv_padding_slots_total=self.kv_padding_slots_total,
            finished_by_reason=dict(self.finished_by_reason))

