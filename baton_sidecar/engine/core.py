"""The synchronous engine step: plan (scheduler) -> execute (here, on the runner) -> apply (scheduler).

``EngineCore`` is owned by one thread. One step::

    plan    = scheduler.schedule(now, batch view)            # StepPlan
    results = self._execute(plan)                            # runner work, sampling, deltas
    update  = scheduler.update_from_output(plan, results)    # state changes; who leaves; outputs
    runner.remove(update.leave); step_observer(StepRecord)   # if an observer is set

Execution never calls the scheduler: everything it needs is in the plan. The core keeps each
choice's sampler, detokenizer and pending events (``outputs.Tracked``), the choices of each
``n`` > 1 request (``groups``, for cancelling them together) and the swapped rows' K/V on host
memory.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import EngineConfig, PolicyConfig
from ..model import LoadedModel
from . import row_padding, step_cost
from .admission import no_longer_fits
from .grammar import GrammarCompiler
from .outputs import OutputProcessor, Tracked
from .request import Request, RequestOutput, RequestStatus
from .runner import ModelRunner, Prefilled, PromptPart, SwappedRow
from .sampler import SampledToken, sample
from .scheduler import BatchView, make_scheduler
from .step import Preemption, PrefillChunk, StepPlan, StepRecord, StepResults
from .step_cost import StepCostModel, executed_shape

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


class EngineCore:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, policy: PolicyConfig) -> None:
        self.loaded = loaded
        # The engine thread's own copy: a fast tokenizer's Rust state is not safe to share
        # with the server threads that tokenize prompts meanwhile.
        self.tokenizer = copy.deepcopy(loaded.tokenizer)
        self.config = config
        padded_rows = row_padding.calibrate(loaded.model, loaded.device) if config.decode_row_padding == "auto" else {}
        self.runner = ModelRunner(loaded, padded_rows)
        self.scheduler = make_scheduler(config.batching, policy)
        # The time budget's step cost model: a prior measured now, then fitted to every step.
        self.scheduler.step_cost = StepCostModel(step_cost.calibrate(loaded.model, loaded.device))
        # The logits' width; out_features, not weight.shape: an int8 head has no float weight.
        self.vocab_size = loaded.model.get_output_embeddings().out_features
        # Compiles structured-output grammars off this thread (AsyncEngine.compile_grammar);
        # the engine thread only fills masks from the requests' matchers.
        self.grammars = GrammarCompiler(loaded.tokenizer, self.vocab_size, loaded.eos_token_ids)
        self.outputs = OutputProcessor(self.tokenizer, loaded.eos_token_ids, loaded.max_model_len,
                                       self.runner.device, self.vocab_size)
        self.tracked: dict[str, Tracked] = {}  # by choice id
        self.groups: dict[str, list[Request]] = {}  # caller's id -> its choices, while any is tracked (n > 1)
        self.swapped_kv: dict[str, SwappedRow] = {}
        # Called mid-step with the outputs produced so far (prefills' first tokens); without
        # it everything is returned by ``step``. Set by AsyncEngine.
        self.publish_early: Callable[[list[RequestOutput]], None] | None = None
        # Called on this thread after every step. Unset, a step builds no record.
        self.step_observer: Callable[[StepRecord], None] | None = None
        self.steps = 0
        self.preemptions_total = 0
        self.kv_slots_total = 0
        self.kv_padding_slots_total = 0
        # Requests that left the queue of unstarted ones: first scheduled, or ended before
        # that. Cumulative; AsyncEngine's admission count follows it (see admission.py).
        self.started_total = 0

    @property
    def policy(self) -> PolicyConfig:
        return self.scheduler.policy

    def apply_policy(self, policy: PolicyConfig) -> list[RequestOutput]:
        """Takes effect at the next step; in-flight requests keep their tokens. Queued ones that no
        longer fit even alone end now, refused as admission would: queued, they would block the line."""
        self.scheduler.policy = policy
        outputs = []
        for request in self.scheduler.unfittable():
            outputs += self._end_choices([request, *request.forks], RequestStatus.FINISHED_ERROR,
                                         no_longer_fits(request, policy.limits))
        return outputs

    # --- intake ---------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """A new request; its pending forks (choices 1..) are tracked now, scheduled with it."""
        for choice in (request, *request.forks):
            self.tracked[choice.request_id] = self.outputs.track(choice)
        if request.forks:
            self.groups[request.request_id] = [request, *request.forks]
        self.scheduler.add(request)

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Between steps: cancel a request, every choice of it; rows leave now unless the
        scheduler keeps them."""
        tracked = self.tracked.get(request_id)
        choices = self.groups.get(request_id) or ([tracked.request] if tracked is not None else [])
        return self._end_choices([c for c in choices if not c.status.finished], RequestStatus.FINISHED_CANCELLED)

    def _end_choices(self, choices: list[Request], status: RequestStatus, error: str | None = None
                     ) -> list[RequestOutput]:
        """Between steps: end ``choices`` (unfinished), forget them, and let go of any rows they hold."""
        outputs = [self._end(self.tracked[c.request_id], status, error) for c in choices]
        self._remove_rows(self.scheduler.finish_requests(choices))
        self._forget(choices)
        return outputs

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # --- one step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        view = BatchView(self.runner.num_rows, self.runner.cache.length, self.runner.num_cached_tokens())
        plan = self.scheduler.schedule(time.monotonic(), view)
        results = StepResults()
        self._execute(plan, results)
        update = self.scheduler.update_from_output(plan, results)
        self._remove_rows(update.leave)
        self._forget(results.finished)
        self._forget(update.leave)
        self.runner.shrink_if_sparse(self.policy.padding.compaction_threshold)
        self.steps += 1
        self._observe_cost(plan, results, time.perf_counter() - start)
        if self.step_observer is not None:
            self.step_observer(self._record(start, plan, results))
        return update.outputs

    def _execute(self, plan: StepPlan, results: StepResults) -> None:
        """Run the plan on the runner, in the plan's field order (fused: prompts in the decode pass)."""
        self._preempt(plan.preempt)
        self._resume(plan.resume)
        prompts = self._prompt_parts(plan)
        if prompts and self.runner.can_pack:  # one packed forward; fused: the decode rows' too
            results.fused = plan.fused and self.runner.num_rows > 0
            self._run_parts(prompts, results, decode=results.fused)
            if results.fused:
                return
        elif prompts:  # the model's own attention: whole prompts left-padded together, chunks one by one
            if plan.prefill:
                self._prefill(plan.prefill, results)
            for chunk in plan.chunks:
                self._run_parts([chunk], results, decode=False)
        if results.outputs and self.publish_early is not None:
            self.publish_early(results.outputs)  # newcomers' first tokens need not wait for the decode pass
            results.outputs = []
        if self.runner.num_rows:
            self._decode(results)

    def _preempt(self, preemptions: list[Preemption]) -> None:
        for preemption in preemptions:
            rid = preemption.request.request_id
            if preemption.mode == "swap":
                self.swapped_kv[rid] = self.runner.swap_out(rid)
            else:
                self.runner.discard(rid)
            self.tracked[rid].event("preempted")
            self.preemptions_total += 1

    def _resume(self, requests: list[Request]) -> None:
        for request in requests:
            self.runner.swap_in(request.request_id, self.swapped_kv.pop(request.request_id))
            self.tracked[request.request_id].event("resumed")

    def _prefill(self, requests: list[Request], results: StepResults) -> None:
        """Prefill requests together, apart from the batch; only they fail if it fails."""
        tokens = [r.prefill_token_ids() for r in requests]
        scores = {i: (r.prompt_token_ids[1:], r.params.prompt_logprobs)
                  for i, r in enumerate(requests) if r.wants_prompt_logprobs}
        start = time.perf_counter()
        try:
            replayed = [len(t) - r.num_prompt_tokens for r, t in zip(requests, tokens)]  # recompute: its outputs
            prefilled = self.runner.prefill([r.request_id for r in requests], tokens, scores, replayed)
        except Exception as error:  # the running batch is untouched
            self._fail(requests, f"prefill failed: {error}", results)
            return
        finally:
            results.prefill_s += time.perf_counter() - start
        results.prefill_tokens += sum(len(t) for t in tokens)
        self._join(requests, prefilled, results)

    def _prompt_parts(self, plan: StepPlan) -> list[PrefillChunk]:
        """The step's prompt work as parts: whole prompts first, then chunks."""
        whole = [PrefillChunk(r, 0, r.num_prefill_tokens, last=True, reason="whole") for r in plan.prefill]
        parts = [*whole, *plan.chunks]
        self._mark_scheduled([c.request for c in parts])
        return parts

    def _run_parts(self, chunks: list[PrefillChunk], results: StepResults, decode: bool) -> None:
        """One forward over prompt parts (and with ``decode`` the batch's rows); then the rows'
        tokens, and each finished prompt's first token and join."""
        parts = [self._part(c) for c in chunks]
        if decode:
            self._count_decode(results)
        start = time.perf_counter()
        try:
            if self.runner.can_pack:
                out = self.runner.run_packed(parts, decode)
                decode_logits, prefilled = out.decode_logits, out.prefilled
            else:
                part = parts[0]
                decode_logits, prefilled = None, [self.runner.prefill_chunk(
                    part.request_id, part.tokens, part.start, part.last, part.scores)]
        except Exception as error:
            if decode or len(chunks) > 1:  # a failure ends only its own requests: run the parts apart
                log.warning("packed step failed (%s); running its parts apart", error)
                results.fused = False
                if decode:
                    self._decode(results, counted=True)
                for chunk in chunks:
                    self._run_parts([chunk], results, decode=False)
                return
            self.runner.drop_chunk(chunks[0].request.request_id)
            self._fail([chunks[0].request], f"prefill failed: {error}", results)
            return
        finally:
            elapsed = time.perf_counter() - start
            if decode:
                results.decode_s = elapsed
            elif all(c.start == 0 and c.last for c in chunks):
                results.prefill_s += elapsed  # whole prompts only
            else:
                results.chunk_s += elapsed
        for chunk, part in zip(chunks, parts):
            if chunk.start == 0 and chunk.last:
                results.prefill_tokens += len(part.tokens)  # a whole prompt
            else:
                results.chunk_tokens += len(part.tokens)
        if decode_logits is not None:
            self._apply_decode(decode_logits, results)
        for chunk, done in zip(chunks, prefilled):
            if done is not None:
                self._join([chunk.request], done, results)

    def _part(self, chunk: PrefillChunk) -> PromptPart:
        request = chunk.request
        # Positions [start, stop) score prompt tokens [start + 1, stop + 1) (the next chunk's first).
        scores = ((request.prompt_token_ids[chunk.start + 1: chunk.stop + 1], request.params.prompt_logprobs)
                  if request.wants_prompt_logprobs else None)
        return PromptPart(request.request_id, request.prefill_token_ids(chunk.start, chunk.stop), chunk.start,
                          request.num_prefill_tokens, request.num_prompt_tokens, chunk.last, scores)

    def _mark_scheduled(self, requests: list[Request]) -> None:
        now = time.monotonic()
        for request in requests:
            if request.times.first_scheduled is None:
                request.times.first_scheduled = now
                self.started_total += 1  # a group counts once: its forks wait inside it
                for choice in (request, *request.forks):
                    choice.times.first_scheduled = now
                    self.tracked[choice.request_id].event("scheduled", now)

    def _join(self, requests: list[Request], prefilled: Prefilled, results: StepResults) -> None:
        """Sample prefilled requests' first tokens, then embed the unfinished ones into the batch.

        A fresh request samples a first token per choice from its one row of logits, and each
        unfinished choice gets its own copy of that row (the fork: n choices, one prefill). A
        recompute-resumed request samples nothing: its pending token is its last output.
        """
        stamp = time.monotonic()
        for i, scores in prefilled.prompt_scores.items():
            logprobs = scores.token_logprobs()  # delivered with each choice's first delta
            for choice in (requests[i], *requests[i].forks):
                self.tracked[choice.request_id].prompt_logprobs = logprobs
        sampled = self._first_tokens(requests, prefilled)
        joining: list[tuple[int, Request, int]] = []  # (prefilled row, choice, its next token)
        for i, request in enumerate(requests):
            if request.output_token_ids:
                self.tracked[request.request_id].event("resumed", stamp)
                joining.append((i, request, request.output_token_ids[-1]))
                continue
            for choice in (request, *request.forks):
                tracked, token = self.tracked[choice.request_id], sampled.get(choice.request_id)
                tracked.event("prefilled", stamp)
                results.outputs.append(self.outputs.apply_token(tracked, token) if token is not None else
                                       self.outputs.finish(tracked, RequestStatus.FINISHED_LENGTH))
                if choice.status.finished:
                    results.finished.append(choice)  # it never joins
                else:
                    joining.append((i, choice, token.token_id))
        self.runner.embed(prefilled, [i for i, _, _ in joining], [t for _, _, t in joining],
                          [c.request_id for _, c, _ in joining])
        results.joined.extend(c for _, c, _ in joining)

    def _first_tokens(self, requests: list[Request], prefilled: Prefilled) -> dict[str, SampledToken]:
        """Each fresh choice's first token (by choice id), drawn from its prompt's row of logits.
        A choice with ``max_tokens`` 0 (prompt logprobs only) draws none."""
        drawn = [(i, c) for i, r in enumerate(requests) if not r.output_token_ids
                 for c in (r, *r.forks) if c.max_tokens > 0]
        if not drawn:
            return {}
        logits = prefilled.last_logits[[i for i, _ in drawn]]  # [choices, V]: a row per choice
        tokens = sample(logits, [self.tracked[c.request_id].sampler for _, c in drawn], self.grammars)
        return {c.request_id: token for (_, c), token in zip(drawn, tokens)}

    def _decode(self, results: StepResults, counted: bool = False) -> None:
        """One token for every row. A row whose request already finished (a run-to-completion
        rider) is decoded with the rest and its token discarded."""
        if not counted:
            self._count_decode(results)
        start = time.perf_counter()
        try:
            logits = self.runner.decode()  # [B, V]
        except Exception as error:  # a batch-wide failure: every running request ends with it
            log.exception("decode step failed")
            self._fail(self._unfinished_rows(), f"decode failed: {error}", results)
            return
        finally:
            results.decode_s = time.perf_counter() - start
        self._apply_decode(logits, results)

    def _count_decode(self, results: StepResults) -> None:
        runner = self.runner
        slots = runner.cache.num_slots()
        padding = slots - runner.num_cached_tokens()
        self.kv_slots_total += slots
        self.kv_padding_slots_total += padding
        results.decode_rows, results.decode_context = runner.num_rows, runner.cache.length + 1
        results.decode_slots, results.decode_padding_slots = slots, padding

    def _unfinished_rows(self) -> list[Request]:
        return [self.tracked[rid].request for rid in self.runner.row_ids
                if not self.tracked[rid].request.status.finished]

    def _apply_decode(self, logits, results: StepResults) -> None:
        """Sample each row's token from the decode logits ``[B, V]`` and deliver it."""
        rows = [self.tracked[rid] for rid in self.runner.row_ids]
        tokens = sample(logits, [t.sampler for t in rows], self.grammars)
        self.runner.set_next_tokens([t.token_id for t in tokens])
        for tracked, token in zip(rows, tokens):
            if tracked.request.status.finished:
                continue
            results.outputs.append(self.outputs.apply_token(tracked, token))
            if tracked.request.status.finished:
                results.finished.append(tracked.request)

    def _fail(self, requests: list[Request], error: str, results: StepResults) -> None:
        log.error("%s (requests %s)", error, [r.request_id for r in requests])
        for choice in (c for r in requests for c in (r, *r.forks)):  # forks that never joined end with it
            results.outputs.append(self._end(self.tracked[choice.request_id], RequestStatus.FINISHED_ERROR, error))
            results.finished.append(choice)

    # --- leaving ----------------------------------------------------------------------------

    def _end(self, tracked: Tracked, status: RequestStatus, error: str | None = None) -> RequestOutput:
        """End a request from outside its token stream (cancel, failure); free what it held apart
        from a row (its row is the scheduler's to release)."""
        request = tracked.request
        if request.times.first_scheduled is None and request.parent_id is None:
            self.started_total += 1  # ends without ever starting (a fork never counted)
        self.swapped_kv.pop(request.request_id, None)
        self.runner.drop_chunk(request.request_id)
        return self.outputs.finish(tracked, status, error)

    def _remove_rows(self, requests: list[Request]) -> None:
        if requests:
            self.runner.remove([r.request_id for r in requests])

    def _forget(self, requests: list[Request]) -> None:
        """Drop the companions of finished requests that no longer hold a row."""
        for request in requests:
            if request.status.finished and request.request_id not in self.runner.row_ids:
                self.tracked.pop(request.request_id, None)
                group = self.groups.get(request.group_id)
                if group is not None and not any(c.request_id in self.tracked for c in group):
                    del self.groups[request.group_id]

    def fail_all(self, error: str) -> list[RequestOutput]:
        """Last resort after an unexpected step failure: end every request, reset the batch."""
        outputs = self.scheduler.reset()  # finals a run-to-completion batch was holding
        delivered = {o.request_id for o in outputs}
        for tracked in self.tracked.values():
            if tracked.request.request_id in delivered:
                continue
            if tracked.request.status.finished:
                outputs.append(self.outputs.final(tracked))  # its final may have been lost mid-step
            else:
                outputs.append(self._end(tracked, RequestStatus.FINISHED_ERROR, error))
        self.tracked.clear()
        self.groups.clear()
        self.swapped_kv.clear()
        self.runner.reset()
        return outputs

    # --- observability ----------------------------------------------------------------------

    def _observe_cost(self, plan: StepPlan, results: StepResults, seconds: float) -> None:
        """Teach the step cost model what this step's work took (steps that ran a forward)."""
        shape = executed_shape(plan, results, self.runner.can_pack)
        if shape.forwards and self.scheduler.step_cost is not None:
            self.scheduler.step_cost.observe(shape, seconds)

    def _record(self, start: float, plan: StepPlan, results: StepResults) -> StepRecord:
        end = time.perf_counter()
        slots = results.decode_slots
        return StepRecord(
            t=end, step_s=end - start, prefill_s=results.prefill_s, prefill_tokens=results.prefill_tokens,
            chunk_s=results.chunk_s, chunk_tokens=results.chunk_tokens, decode_s=results.decode_s,
            decode_rows=results.decode_rows, context=results.decode_context,
            padding_ratio=results.decode_padding_slots / slots if slots else 0.0,
            batch_rows=self.runner.num_rows, preempted=len(plan.preempt), resumed=len(plan.resume),
            joined=len(results.joined), finished=len(results.finished),
            fused=results.fused,
            predicted_s=plan.predicted_s, chunk_sizes=tuple(c.stop - c.start for c in plan.chunks),
            chunk_reasons=tuple(c.reason for c in plan.chunks))

    def stats(self) -> EngineStats:
        """A snapshot from counters and row positions (no mask reduction, no device sync)."""
        cache, scheduler = self.runner.cache, self.scheduler
        return EngineStats(
            running=scheduler.num_running, waiting=len(scheduler.waiting),
            swapped=len(scheduler.swapped), batch_size=cache.rows,
            padding_ratio=self.runner.padding_ratio(), kv_tokens_used=cache.num_slots(),
            kv_tokens_capacity=self.policy.limits.max_kv_tokens,
            kv_bytes_allocated=cache.allocated_bytes(),
            swapped_bytes=sum(s.kv.nbytes() for s in self.swapped_kv.values()),
            steps=self.steps, preemptions_total=self.preemptions_total,
            kv_slots_total=self.kv_slots_total, kv_padding_slots_total=self.kv_padding_slots_total,
            finished_by_reason=dict(self.outputs.finished_by_reason))
