"""Who runs next: waiting order, admission into the batch, preemption victims, as a plan per step.

Each engine step is plan -> execute -> apply, as in vLLM v1 (see ``step.py``)::

    plan   = scheduler.schedule(now, batch)               # StepPlan: the whole decision
             the core executes it on the runner           # never calls back in here
    update = scheduler.update_from_output(plan, results)  # every state change, in one place

Between steps the scheduler owns request state: the queues below, each request's status,
preemption count and computed-token count. Each decision is a small pure function
(``decisions.py``), so unit tests drive them without a model. ``RunToCompletionScheduler``
is the static-batching baseline, the same interface with its own rules.

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

from dataclasses import dataclass

from ..config import PolicyConfig
from .budget import StepBudget
from .decisions import (choose_victim, effective_priority, padding_ratio_after, projected_peak_slots,
                        request_rows, waiting_key)
from .request import Request, RequestOutput, RequestStatus
from .step import Preemption, PrefillChunk, StepPlan, StepResults, StepUpdate
from .step_cost import StepCostModel

# --- budgets --------------------------------------------------------------------------------

@dataclass
class BatchView:
    """What the scheduler needs to know about the running batch (from the runner)."""

    rows: int = 0
    length: int = 0  # live columns
    real_tokens: int = 0


UNLIMITED = 1 << 62


@dataclass
class Room:
    """Who holds or is being given rows while a plan is made, and the batch's shape after them."""

    present: list[Request]
    rows: int  # the batch's rows
    length: int  # its live columns
    real_tokens: int

    def slots(self) -> list[tuple[int, int]]:
        return [row for r in self.present for row in request_rows(r)]


def may_pass(request: Request, blocked: Request | None) -> bool:
    """Whether ``request`` may be admitted behind ``blocked``, which found no room in this plan:
    only if more urgent by its own priority (it may preempt what ``blocked`` could not)."""
    return blocked is None or request.priority < blocked.priority


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
        self.step_cost: StepCostModel | None = None  # set by the engine core; no time budget without it

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
        """Prefill tokens per step at most; a longer prompt is prefilled in chunks."""
        return self.policy.limits.max_prefill_tokens

    # --- planning ---------------------------------------------------------------------------

    def schedule(self, now: float, batch: BatchView) -> StepPlan:
        """Admit, preempt and resume; then give the step's prefill budget to whole prompts
        first (short newcomers never wait behind a long prompt), and what is left to the
        prompts being chunked, most urgent and oldest first."""
        plan = StepPlan(fused=self._fuses())
        budget = self._budget(batch, plan.fused)
        room = Room([*self.running.values(), *self.prefilling.values()], batch.rows, batch.length,
                    batch.real_tokens)
        ongoing = self._chunk_order(now, plan, [])
        if ongoing:
            budget.reserve(ongoing[0].num_prefill_tokens - ongoing[0].num_computed_tokens)
        too_long = self._admit(now, plan, budget, room) if self.waiting or self.swapped else []
        self._plan_chunks(now, plan, budget, room, too_long)
        preempted = {p.request for p in plan.preempt}
        plan.decode = [r for r in self.running.values() if r not in preempted] + plan.resume
        plan.predicted_s = budget.predicted_s() if budget.target_s is not None else None
        return plan

    def _fuses(self) -> bool:
        return self.policy.prefill.mode == "fused"

    def _budget(self, batch: BatchView, fused: bool) -> StepBudget:
        timed = self.policy.prefill.budget == "time" and self.step_cost is not None
        target_ms = self.policy.step_target_ms if timed else None
        return StepBudget(self.prefill_token_limit, self.step_cost,
                          None if target_ms is None else target_ms / 1000, batch.rows, batch.length + 1, fused)

    def _admit(self, now: float, plan: StepPlan, budget: StepBudget, room: Room) -> list[Request]:
        """Admit waiting and swapped requests in order while they fit, preempting for them.

        Fills ``plan.preempt``, ``plan.resume`` and ``plan.prefill`` (new or recompute-resumed
        prompts that fit the budget whole). Returns, in order, the newcomers too long for any
        one step, which ``_plan_chunks`` may admit. The head of the line that cannot fit the
        batch, or must wait for an emptier step, holds back everyone behind it (order is kept),
        except requests more urgent by their own priority: aging may have put it ahead of them,
        and unlike it they may preempt, so it must not block them.
        """
        too_long: list[Request] = []
        blocked: Request | None = None  # the first that found no room; only the more urgent pass it
        for candidate in self._candidates(now, room.length):
            if not may_pass(candidate, blocked):
                continue
            swapped = candidate in self.swapped
            total = candidate.num_prefill_tokens
            if not swapped:
                timed = not (self._overdue(candidate, now) or self._outranks(candidate, room))
                if not budget.fits_alone(total, timed):
                    too_long.append(candidate)  # chunked, after the prompts under way
                    continue
                grant = budget.room(0, total, timed)
                if grant.count < total:
                    break  # this step's prefill budget is spent
            if self._held_back_for_padding(candidate, now, room):
                continue
            if not self._make_room(candidate, plan, room):
                blocked = blocked or candidate  # keep order: it is first for the next free room
                continue
            if swapped:
                plan.resume.append(candidate)
            else:
                plan.prefill.append(candidate)
                budget.take(grant, total)
        return too_long

    def _plan_chunks(self, now: float, plan: StepPlan, budget: StepBudget, room: Room,
                     newcomers: list[Request]) -> None:
        """Chunks for prompts under way and long newcomers, by urgency then arrival, while the
        budget lasts. The first prompt under way always gets the minimum chunk: none starves."""
        served_one_under_way = False
        blocked: Request | None = None  # a newcomer that found no room: newcomers behind it wait
        for request in self._chunk_order(now, plan, newcomers):
            if any(p.request is request for p in plan.preempt):
                continue  # preempted in this plan, for a more urgent newcomer
            newcomer = request in newcomers
            if newcomer and not may_pass(request, blocked):
                continue
            start, total = request.num_computed_tokens, request.num_prefill_tokens
            first = start > 0 and not served_one_under_way
            grant = budget.chunk(start, total - start, first=first, timed=not self._outranks(request, room))
            served_one_under_way |= first
            if grant.count == 0:
                continue  # the budget is spent for it: a newcomer waits, a prompt under way resumes next step
            if newcomer and not self._make_room(request, plan, room):
                blocked = blocked or request  # it waits, in order; prompts under way go on
                continue
            budget.take(grant, total - start)
            plan.chunks.append(PrefillChunk(request, start, grant.stop, grant.stop == total, grant.reason))

    @staticmethod
    def _outranks(request: Request, room: Room) -> bool:
        """More urgent than every other request holding or getting a row (and there are some)."""
        others = [other.priority for other in room.present if other is not request]
        return bool(others) and request.priority < min(others)

    def _overdue(self, request: Request, now: float) -> bool:
        """Waited past its TTFT objective (its class's; unclassed: the interactive class's)."""
        sla = self.policy.sla_classes.get(request.sla_class or "interactive")
        return sla is not None and sla.ttft_ms is not None and now - request.times.arrival >= sla.ttft_ms / 1000

    def _chunk_order(self, now: float, plan: StepPlan, newcomers: list[Request]) -> list[Request]:
        """Prompts under way (not preempted by ``plan``) and ``newcomers``, by urgency then arrival."""
        preempted = {p.request for p in plan.preempt}
        ongoing = [r for r in self.prefilling.values() if r not in preempted]
        return sorted([*ongoing, *newcomers], key=lambda r: waiting_key(r, now, self.policy.aging_s))

    def _make_room(self, candidate: Request, plan: StepPlan, room: Room) -> bool:
        """Fit ``candidate``'s rows in the batch, preempting less urgent requests if need be."""
        entry = request_rows(candidate)
        slots = room.slots()
        while not self._fits(slots + entry):
            victim = self._victim(room.present, candidate, plan)
            if victim is None:
                return False
            room.present.remove(victim)
            slots = room.slots()
            plan.preempt.append(Preemption(victim, self._preemption_mode(victim)))
            room.rows -= 1
            room.real_tokens -= victim.num_tokens
        room.present.append(candidate)
        room.rows += len(entry)
        room.length = max(room.length, candidate.num_tokens)
        room.real_tokens += candidate.num_tokens * len(entry)
        return True

    def _candidates(self, now: float, batch_len: int) -> list[Request]:
        aging = self.policy.aging_s
        key = (lambda r: waiting_key(r, now, aging))
        if self.policy.padding.bucketing:
            # Among equally urgent requests, prefer lengths close to the batch's.
            key = (lambda r: (effective_priority(r, now, aging), abs(r.num_tokens - batch_len),
                              r.times.arrival))
        return sorted(self.waiting + self.swapped, key=key)

    def unfittable(self) -> list[Request]:
        """Queued requests that would not fit even an empty batch under the current limits (a tighter
        policy can leave some that never will)."""
        return [r for r in (*self.waiting, *self.swapped) if not self._fits(request_rows(r))]

    def _fits(self, rows: list[tuple[int, int]]) -> bool:
        limits = self.policy.limits
        return (len(rows) <= limits.max_batch_size
                and projected_peak_slots(rows, rows_leave=self.rows_leave) <= limits.max_kv_tokens)

    def _victim(self, present: list[Request], candidate: Request, plan: StepPlan) -> Request | None:
        """Who to split off for ``candidate``; never a request admitted in this same plan."""
        if self.policy.preemption.mode == "off":
            return None
        admitted = {*plan.prefill, *plan.resume, *(c.request for c in plan.chunks)}
        earlier = [r for r in present if r not in admitted]
        return choose_victim(earlier, candidate, self.policy.preemption.max_preemptions_per_request)

    def _preemption_mode(self, victim: Request) -> str:
        # A prompt whose chunked prefill is under way has no row to swap: it starts over.
        return "recompute" if victim.request_id in self.prefilling else self.policy.preemption.mode

    def _held_back_for_padding(self, candidate: Request, now: float, room: Room) -> bool:
        """Length-aware admission: don't let a non-urgent newcomer bloat the padding."""
        if room.rows == 0:
            return False
        running = room.present
        if running and candidate.priority < min(r.priority for r in running):
            return False  # more urgent than everything running
        if now - candidate.times.arrival >= self.policy.aging_s:
            return False  # waited long enough: padding is no reason to starve it
        ratio = padding_ratio_after(room.real_tokens, room.rows, room.length, candidate.num_tokens)
        return ratio > self.policy.padding.max_padding_ratio

    # --- applying a step ----------------------------------------------------------------------

    def update_from_output(self, plan: StepPlan, results: StepResults) -> StepUpdate:
        """Apply an executed plan to request state: the only state change a step makes here."""
        for preemption in plan.preempt:
            self._requeue(preemption)
        for request in (*plan.resume, *results.joined):
            self._to_running(request)
        for chunk in plan.chunks:
            if not chunk.request.status.finished:
                chunk.request.num_computed_tokens = chunk.stop
                if not chunk.last:
                    self._to_prefilling(chunk.request)
        for request in (*plan.prefill, *(c.request for c in plan.chunks if c.last)):
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

    def _fuses(self) -> bool:
        return False  # its batches are prefilled apart, left-padded together

    def _budget(self, batch: BatchView, fused: bool) -> StepBudget:
        return StepBudget(UNLIMITED)  # the whole batch is prefilled at once

    def _victim(self, present: list[Request], candidate: Request, plan: StepPlan) -> Request | None:
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
