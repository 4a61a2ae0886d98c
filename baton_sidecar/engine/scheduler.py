"""Who runs next: waiting order, admission into the batch, preemption victims, as a plan per step.

Each engine step is plan -> execute -> apply, as in vLLM v1 (see ``step.py``)::

    plan   = scheduler.schedule(now, batch)               # StepPlan: the whole decision
             the core executes it on the runner           # never calls back in here
    update = scheduler.update_from_output(plan, results)  # every state change, in one place

Between steps the scheduler owns request state: the queues below, each request's status,
preemption count and computed-token count. Each decision is a small pure function, so unit
tests drive them without a model. ``RunToCompletionScheduler`` is the static-batching
baseline, the same interface with its own rules.

Queues (a request is in at most one)::

    waiting     new and recompute-preempted requests           (no K/V)
    swapped     swap-preempted; their K/V wait on host memory
    prefilling  admitted, chunked prefill under way, no row yet (oldest first)
    running     rows of the batch

A request with ``n`` > 1 is scheduled as one until its first prefill: it is admitted only
when all its rows fit (``Request.num_rows``), prefilled once, and its choices join as copies
of its row. From then on each choice is a request of its own: it is decoded, finishes and is
preempted (swapped, or recomputed from its own tokens) independently of its siblings, which
is exact because each choice has its own tokens and sampler state and nothing is shared
between rows (see docs/architecture.md, "n: one prefill, forked rows").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import PolicyConfig
from .request import Request, RequestOutput, RequestStatus
from .step import Preemption, PrefillChunk, StepPlan, StepResults, StepUpdate

# --- pure decisions -----------------------------------------------------------------------


def effective_priority(request: Request, now: float, aging_s: float) -> int:
    """Priority after aging: one level more urgent per ``aging_s`` seconds of waiting."""
    waited = max(0.0, now - request.times.arrival)
    return request.priority - int(waited // aging_s)


def waiting_key(request: Request, now: float, aging_s: float) -> tuple:
    """Waiting order: (aged) priority, then deadline, then arrival."""
    deadline = request.deadline if request.deadline is not None else math.inf
    return (effective_priority(request, now, aging_s), deadline, request.times.arrival)


def choose_victim(running: list[Request], candidate: Request, max_preemptions: int) -> Request | None:
    """The least urgent running request that is strictly less urgent than ``candidate``.

    Ties go to the latest arrival (it has the least work to lose). Requests that were
    preempted ``max_preemptions`` times are never chosen again.
    """
    eligible = [r for r in running
                if r.priority > candidate.priority and r.num_preemptions < max_preemptions]
    if not eligible:
        return None
    return max(eligible, key=lambda r: (r.priority, r.times.arrival))


def projected_peak_slots(rows: list[tuple[int, int]], rows_leave: bool = True) -> int:
    """Worst-case padded KV slots over the batch's future, for rows ``(length, remaining)``.

    All rows end at the same column, so at step t the window is max(length + t) wide over
    the rows still present; slots grow until a row leaves, so the peak is reached just
    before some row's last step. With ``rows_leave=False`` (run-to-completion) no row
    leaves before the longest is done.
    """
    if not rows:
        return 0
    if not rows_leave:
        horizon = max(r for _, r in rows)
        return len(rows) * max(length + horizon for length, _ in rows)
    peak = 0
    for _, t in rows:
        active = [length for length, remaining in rows if remaining >= t]
        peak = max(peak, len(active) * (max(active) + t))
    return peak


def padding_ratio_after(real_tokens: int, rows: int, length: int, new_len: int) -> float:
    """Padding ratio of the batch after embedding one row of ``new_len`` tokens."""
    slots = (rows + 1) * max(length, new_len)
    return 1.0 - (real_tokens + new_len) / slots


def next_chunk(request: Request, limit: int) -> PrefillChunk:
    """The next ``limit`` tokens of a prompt too long for one step, from its computed count."""
    start, total = request.num_computed_tokens, request.num_prefill_tokens
    stop = min(start + limit, total)
    return PrefillChunk(request, start, stop, last=stop == total)


def _rows(request: Request) -> list[tuple[int, int]]:
    """``(length, remaining steps)`` of each row the request holds or will hold (its forks'
    too), as ``projected_peak_slots`` sees them."""
    return [(request.num_tokens, request.max_tokens - len(request.output_token_ids))] * request.num_rows


# --- budgets --------------------------------------------------------------------------------

@dataclass
class BatchView:
    """What the scheduler needs to know about the running batch (from the runner)."""

    rows: int = 0
    length: int = 0  # live columns
    real_tokens: int = 0


UNLIMITED = 1 << 62


class PrefillBudget:
    """Tokens one step may prefill, counted as the forward pass really costs them.

    Prompts that fit the budget are prefilled together, left-padded to the longest, so a
    group costs ``rows * width``; a longer prompt is chunked and costs one chunk. The first
    prompt of a step is always admitted, so nothing waits forever behind the budget.
    """

    def __init__(self, limit: int, reserved: int = 0) -> None:
        self.limit = limit
        self.chunk_tokens = reserved  # owed to chunked prompts this step
        self.group_rows = 0
        self.group_width = 0

    @property
    def spent(self) -> int:
        return self.chunk_tokens + self.group_rows * self.group_width

    def cost_with(self, width: int) -> int:
        if width > self.limit:
            return self.spent + self.limit
        return self.chunk_tokens + (self.group_rows + 1) * max(self.group_width, width)

    def admits(self, width: int) -> bool:
        return self.spent == 0 or self.cost_with(width) <= self.limit

    def add(self, width: int) -> None:
        if width > self.limit:
            self.chunk_tokens += self.limit
        else:
            self.group_rows += 1
            self.group_width = max(self.group_width, width)


# --- the scheduler ------------------------------------------------------------------------

class Scheduler:
    """Iteration-level re-batching: newcomers join a running batch, finished rows leave at once."""

    rows_leave = True  # finished rows leave the batch in the step they finish

    def __init__(self, policy: PolicyConfig) -> None:
        self.policy = policy
        self.waiting: list[Request] = []
        self.swapped: list[Request] = []
        self.prefilling: dict[str, Request] = {}
        self.running: dict[str, Request] = {}

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.swapped or self.prefilling or self.running)

    @property
    def num_running(self) -> int:
        """Requests holding or being given a row (chunked prefills under way included)."""
        return len(self.running) + len(self.prefilling)

    @property
    def prefill_token_limit(self) -> int:
        """Prefill tokens per step; a prompt longer than this is prefilled in chunks of it."""
        return self.policy.limits.max_prefill_tokens

    # --- planning ---------------------------------------------------------------------------

    def schedule(self, now: float, batch: BatchView) -> StepPlan:
        plan = StepPlan()
        limit = self.prefill_token_limit
        ongoing = next(iter(self.prefilling.values()), None)
        admitted: list[Request] = []
        if self.waiting or self.swapped:
            owed = next_chunk(ongoing, limit) if ongoing is not None else None
            budget = PrefillBudget(limit, 0 if owed is None else owed.stop - owed.start)
            admitted = self._admit(now, batch, plan, budget)
        # Chunking is decided here, once, from what is left to compute.
        plan.prefill = [r for r in admitted if r.num_prefill_tokens <= limit]
        preempted = {p.request for p in plan.preempt}
        chunk_order = [*self.prefilling.values(), *(r for r in admitted if r.num_prefill_tokens > limit)]
        plan.chunk = next((next_chunk(r, limit) for r in chunk_order if r not in preempted), None)
        plan.decode = [r for r in self.running.values() if r not in preempted] + plan.resume
        return plan

    def _admit(self, now: float, batch: BatchView, plan: StepPlan, budget: PrefillBudget) -> list[Request]:
        """Admit waiting and swapped requests in order while they fit, preempting for them.

        Fills ``plan.preempt`` and ``plan.resume``; returns the requests to prefill (new or
        recompute-resumed). The head of the line that cannot fit stops admission: order is kept.
        """
        present = [*self.running.values(), *self.prefilling.values()]  # holding or getting rows
        rows = [row for r in present for row in _rows(r)]
        admitted: list[Request] = []
        batch_rows, batch_len, real_tokens = batch.rows, batch.length, batch.real_tokens
        for candidate in self._candidates(now, batch_len):
            swapped = candidate in self.swapped
            if not swapped and not budget.admits(candidate.num_prefill_tokens):
                break  # prefill budget for this step is spent
            if self._held_back_for_padding(candidate, now, batch_rows, batch_len, real_tokens, present):
                continue
            entry = _rows(candidate)
            while not self._fits(rows + entry):
                victim = self._victim(present, candidate, plan, admitted)
                if victim is None:
                    return admitted  # head of line can't fit: keep order, try next step
                present.remove(victim)
                rows = [row for r in present for row in _rows(r)]
                plan.preempt.append(Preemption(victim, self._preemption_mode(victim)))
                batch_rows -= 1
                real_tokens -= victim.num_tokens
            (plan.resume if swapped else admitted).append(candidate)
            present.append(candidate)
            rows.extend(entry)
            if not swapped:
                budget.add(candidate.num_prefill_tokens)  # one prefill, whatever its rows
            batch_rows, batch_len = batch_rows + len(entry), max(batch_len, candidate.num_tokens)
            real_tokens += candidate.num_tokens * len(entry)
        return admitted

    def _candidates(self, now: float, batch_len: int) -> list[Request]:
        aging = self.policy.aging_s
        key = (lambda r: waiting_key(r, now, aging))
        if self.policy.padding.bucketing:
            # Among equally urgent requests, prefer lengths close to the batch's.
            key = (lambda r: (effective_priority(r, now, aging), abs(r.num_tokens - batch_len),
                              r.times.arrival))
        return sorted(self.waiting + self.swapped, key=key)

    def _fits(self, rows: list[tuple[int, int]]) -> bool:
        limits = self.policy.limits
        return (len(rows) <= limits.max_batch_size
                and projected_peak_slots(rows, rows_leave=self.rows_leave) <= limits.max_kv_tokens)

    def _victim(self, present: list[Request], candidate: Request, plan: StepPlan,
                admitted: list[Request]) -> Request | None:
        """Who to split off for ``candidate``; never a request admitted in this same plan."""
        if self.policy.preemption.mode == "off":
            return None
        earlier = [r for r in present if r not in admitted and r not in plan.resume]
        return choose_victim(earlier, candidate, self.policy.preemption.max_preemptions_per_request)

    def _preemption_mode(self, victim: Request) -> str:
        # A prompt whose chunked prefill is under way has no row to swap: it starts over.
        return "recompute" if victim.request_id in self.prefilling else self.policy.preemption.mode

    def _held_back_for_padding(self, candidate: Request, now: float, rows: int, length: int,
                               real_tokens: int, running: list[Request]) -> bool:
        """Length-aware admission: don't let a non-urgent newcomer bloat the padding."""
        if rows == 0:
            return False
        if running and candidate.priority < min(r.priority for r in running):
            return False  # more urgent than everything running
        if now - candidate.times.arrival >= self.policy.aging_s:
            return False  # waited long enough: padding is no reason to starve it
        ratio = padding_ratio_after(real_tokens, rows, length, candidate.num_tokens)
        return ratio > self.policy.padding.max_padding_ratio

    # --- applying a step ----------------------------------------------------------------------

    def update_from_output(self, plan: StepPlan, results: StepResults) -> StepUpdate:
        """Apply an executed plan to request state: the only state change a step makes here."""
        for preemption in plan.preempt:
            self._requeue(preemption)
        for request in (*plan.resume, *results.joined):
            self._to_running(request)
        chunk = plan.chunk
        if chunk is not None and not chunk.request.status.finished:
            chunk.request.num_computed_tokens = chunk.stop
            if not chunk.last:
                self._to_prefilling(chunk.request)
        for request in (*plan.prefill, *([chunk.request] if chunk is not None and chunk.last else [])):
            request.release_forks()  # its choices joined as copies of its row, or ended
        for request in (*plan.decode, *results.joined):
            request.num_computed_tokens = request.num_tokens - 1  # a row caches all but its pending token
        return self._settle(results)

    def _settle(self, results: StepResults) -> StepUpdate:
        """Finished requests are forgotten; those with a row leave the batch now."""
        leave = [r for r in results.finished if r.request_id in self.running]
        for request in results.finished:
            self._forget(request)
        return StepUpdate(leave, results.outputs)

    def finish_requests(self, requests: list[Request]) -> list[Request]:
        """Between steps (cancellation): forget them; returns those whose row leaves now."""
        leave = [r for r in requests if r.request_id in self.running]
        for request in requests:
            self._forget(request)
        return leave

    def reset(self) -> list[RequestOutput]:
        """Forget every request (after an unexpected step failure); returns held outputs."""
        self.waiting, self.swapped, self.prefilling, self.running = [], [], {}, {}
        return []

    def _requeue(self, preemption: Preemption) -> None:
        request = preemption.request
        self.running.pop(request.request_id, None)
        self.prefilling.pop(request.request_id, None)
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        if preemption.mode == "swap":
            self.swapped.append(request)
        else:
            request.num_computed_tokens = 0
            self.waiting.append(request)

    def _leave_queues(self, request: Request) -> None:
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.swapped:
            self.swapped.remove(request)

    def _to_prefilling(self, request: Request) -> None:
        self._leave_queues(request)
        request.status = RequestStatus.RUNNING
        self.prefilling[request.request_id] = request

    def _to_running(self, request: Request) -> None:
        self._leave_queues(request)
        self.prefilling.pop(request.request_id, None)
        if not request.status.finished:  # it may have joined and finished in the same step
            request.status = RequestStatus.RUNNING
        self.running[request.request_id] = request

    def _forget(self, request: Request) -> None:
        self._leave_queues(request)
        self.prefilling.pop(request.request_id, None)
        self.running.pop(request.request_id, None)


class RunToCompletionScheduler(Scheduler):
    """The static-batching baseline (``EngineConfig.batching == "run_to_completion"``).

    - Each batch is formed from everything that fits, prefilled at once: a per-step prefill
      budget would shrink its batches. KV admission assumes no row leaves early.
    - Nothing joins a running batch; nobody is preempted; padding holds nobody back.
    - Finished rows ride along until the longest is done: they stay in ``running`` and in
      the batch (the core discards their tokens). Their final outputs (stop, length) are
      held and delivered together when the last row finishes, as a static batch returns.
      Cancellations and errors are delivered at once.
    """

    rows_leave = False

    def __init__(self, policy: PolicyConfig) -> None:
        super().__init__(policy)
        self.held: list[RequestOutput] = []

    @property
    def prefill_token_limit(self) -> int:
        return UNLIMITED

    def schedule(self, now: float, batch: BatchView) -> StepPlan:
        if self.running:
            return StepPlan(decode=list(self.running.values()))  # nothing joins midway
        return super().schedule(now, batch)

    def _victim(self, present: list[Request], candidate: Request, plan: StepPlan,
                admitted: list[Request]) -> Request | None:
        return None

    def _held_back_for_padding(self, *args) -> bool:
        return False

    def _settle(self, results: StepResults) -> StepUpdate:
        update = StepUpdate()
        for output in results.outputs:
            riding = output.finished and output.request_id in self.running and output.finish_reason in (
                "stop", "length")
            (self.held if riding else update.outputs).append(output)
        for request in results.finished:
            if request.request_id not in self.running:
                self._forget(request)  # finished before joining (first token, failed prefill)
        return self._release_if_done(update)

    def finish_requests(self, requests: list[Request]) -> list[Request]:
        for request in requests:
            if request.request_id not in self.running:  # a cancelled row rides along
                self._forget(request)
        return []

    def _release_if_done(self, update: StepUpdate) -> StepUpdate:
        """Once every row has finished, the whole batch leaves and the held outputs go out."""
        if self.running and all(r.status.finished for r in self.running.values()):
            update.leave = list(self.running.values())
            update.outputs.extend(self.held)
            self.running, self.held = {}, []
        return update

    def reset(self) -> list[RequestOutput]:
        held, self.held = self.held, []
        super().reset()
        return held


def make_scheduler(batching: str, policy: PolicyConfig) -> Scheduler:
    """``EngineConfig.batching`` -> the scheduler that implements it."""
    return RunToCompletionScheduler(policy) if batching == "run_to_completion" else Scheduler(policy)
