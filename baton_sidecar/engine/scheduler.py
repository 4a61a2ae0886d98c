"""Who runs next: waiting order, admission, preemption victims, as a plan per step.

Each engine step is plan -> execute -> apply. ``Scheduler.schedule`` returns a ``StepPlan``
(who is preempted, resumed from host memory, or prefilled and embedded); the engine core
executes it with the runner and applies the results. Every decision is a small pure
function below, so unit tests drive them without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import PolicyConfig
from .request import Request, RequestStatus


@dataclass
class StepPlan:
    preempt: list[Request] = field(default_factory=list)  # split off the batch this step
    preemption_mode: str = "off"  # how: swap (K/V to host) or recompute (drop K/V)
    resume: list[Request] = field(default_factory=list)  # swapped rows to embed back
    prefill: list[Request] = field(default_factory=list)  # new or recompute-resumed requests

    @property
    def empty(self) -> bool:
        return not (self.preempt or self.resume or self.prefill)


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


def queue_admits(waiting: int, max_queue: int, priority: int) -> bool:
    """Bounded queue that refuses low-urgency work first.

    Urgent requests (priority <= 0) may fill the queue; others are refused once it is
    80% full, keeping headroom for urgent arrivals.
    """
    limit = max_queue if priority <= 0 else max(1, int(max_queue * 0.8))
    return waiting < limit


def padding_ratio_after(real_tokens: int, rows: int, length: int, new_len: int) -> float:
    """Padding ratio of the batch after embedding one row of ``new_len`` tokens."""
    slots = (rows + 1) * max(length, new_len)
    return 1.0 - (real_tokens + new_len) / slots


# --- the scheduler ------------------------------------------------------------------------

@dataclass
class BatchView:
    """What the scheduler needs to know about the running batch (from the runner)."""

    rows: int = 0
    length: int = 0  # live columns
    real_tokens: int = 0
    prefill_reserved: int = 0  # prefill tokens this step already owes to a chunked prompt


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


class Scheduler:
    def __init__(self, policy: PolicyConfig, run_to_completion: bool = False) -> None:
        self.policy = policy
        self.run_to_completion = run_to_completion
        self.waiting: list[Request] = []  # new and recompute-preempted requests
        self.swapped: list[Request] = []  # swap-preempted; their K/V is on host memory
        self.running: dict[str, Request] = {}

    # --- bookkeeping -------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Forget a request wherever it is (finished or cancelled)."""
        self.running.pop(request.request_id, None)
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.swapped:
            self.swapped.remove(request)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.swapped)

    def has_work(self) -> bool:
        return bool(self.waiting or self.swapped or self.running)

    @property
    def prefill_token_limit(self) -> int:
        """Prefill tokens per step. Run-to-completion forms each batch from everything that
        fits, in one prefill, as static batching does: a budget would shrink its batches."""
        return UNLIMITED if self.run_to_completion else self.policy.limits.max_prefill_tokens

    # --- planning ---------------------------------------------------------------------------

    def schedule(self, now: float, batch: BatchView) -> StepPlan:
        limits = self.policy.limits
        plan = StepPlan(preemption_mode=self.policy.preemption.mode)
        if self.run_to_completion and self.running:
            return plan  # nothing joins a run-to-completion batch midway

        running = list(self.running.values())
        rows = [(r.num_tokens, r.max_tokens - len(r.output_token_ids)) for r in running]
        batch_rows, batch_len, real_tokens = batch.rows, batch.length, batch.real_tokens
        budget = PrefillBudget(self.prefill_token_limit, batch.prefill_reserved)
        for candidate in self._candidates(now, batch_len):
            swapped = candidate in self.swapped
            width = candidate.num_tokens
            if not swapped and not budget.admits(width):
                break  # prefill budget for this step is spent
            if self._held_back_for_padding(candidate, now, batch_rows, batch_len, real_tokens, running):
                continue
            entry = (width, candidate.max_tokens - len(candidate.output_token_ids))
            while not self._fits(rows + [entry], len(running) + 1):
                victim = None
                if plan.preemption_mode != "off" and not self.run_to_completion:
                    already_running = [r for r in running if r not in plan.prefill and r not in plan.resume]
                    victim = choose_victim(already_running, candidate,
                                           self.policy.preemption.max_preemptions_per_request)
                if victim is None:
                    return plan  # head of line can't fit: keep order, try next step
                running.remove(victim)
                rows = [(r.num_tokens, r.max_tokens - len(r.output_token_ids)) for r in running]
                plan.preempt.append(victim)
                batch_rows -= 1
                real_tokens -= victim.num_tokens
            (plan.resume if swapped else plan.prefill).append(candidate)
            running.append(candidate)
            rows.append(entry)
            if not swapped:
                budget.add(width)
            batch_rows, batch_len = batch_rows + 1, max(batch_len, width)
            real_tokens += width
        return plan

    def _candidates(self, now: float, batch_len: int) -> list[Request]:
        aging = self.policy.aging_s
        key = (lambda r: waiting_key(r, now, aging))
        if self.policy.padding.bucketing:
            # Among equally urgent requests, prefer lengths close to the batch's.
            key = (lambda r: (effective_priority(r, now, aging), abs(r.num_tokens - batch_len),
                              r.times.arrival))
        return sorted(self.waiting + self.swapped, key=key)

    def _fits(self, rows: list[tuple[int, int]], batch_size: int) -> bool:
        limits = self.policy.limits
        return (batch_size <= limits.max_batch_size
                and projected_peak_slots(rows, rows_leave=not self.run_to_completion) <= limits.max_kv_tokens)

    def _held_back_for_padding(self, candidate: Request, now: float, rows: int, length: int,
                               real_tokens: int, running: list[Request]) -> bool:
        """Length-aware admission: don't let a non-urgent newcomer bloat the padding."""
        if rows == 0 or self.run_to_completion:
            return False
        if running and candidate.priority < min(r.priority for r in running):
            return False  # more urgent than everything running
        if now - candidate.times.arrival >= self.policy.aging_s:
            return False  # waited long enough: padding is no reason to starve it
        ratio = padding_ratio_after(real_tokens, rows, length, candidate.num_tokens)
        return ratio > self.policy.padding.max_padding_ratio

    # --- applying a plan --------------------------------------------------------------------

    def on_preempted(self, request: Request, mode: str) -> None:
        self.running.pop(request.request_id, None)
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        (self.swapped if mode == "swap" else self.waiting).append(request)

    def on_running(self, request: Request) -> None:
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.swapped:
            self.swapped.remove(request)
        request.status = RequestStatus.RUNNING
        self.running[request.request_id] = request
