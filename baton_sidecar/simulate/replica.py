"""One simulated engine: the engine's own scheduler, a simulated batch and a clock.

Each step is the engine's (``engine/core.py``) with the model's work replaced by its
predicted time (``cost.StepCost``)::

    plan    = scheduler.schedule(now, BatchView(rows, length, real tokens))   # the engine's code
    execute: preempt, resume, prompts, decode on ``SimBatch``; times from the cost model
    update  = scheduler.update_from_output(plan, StepResults)                 # the engine's code

Requests are the engine's ``Request`` objects (token ids are placeholders: only counts
matter); every request ignores EOS, as in the bench, and ends at ``max_tokens``.

Bulk decode (the fast path). The scheduler's plan is every row decoding, and stays so until
a row's request ends, while

- nothing waits (no waiting, swapped or chunked prompt); or
- the batch is full (``max_batch_size`` rows), no prompt is under way and no waiting request
  may preempt a running one (priorities, preemption off, preemption caps): whatever the
  order, each candidate meets a full batch and admission stops; or
- (run-to-completion) a batch is running: nothing joins it.

Then the steps up to the next end are plain decode steps whose times are known in closed
form (``StepCost.decode_run``): the replica jumps over them (``DecodeRun``). The step in
which requests end is still a pure decode: the re-batching scheduler is told through its own
``finish_requests`` (which forgets them, as ``update_from_output`` does for a decode step's
finished rows); run-to-completion's, which holds finished rows' answers, runs the step
through ``schedule`` and ``update_from_output``. An arrival routed to the replica cuts the
run at the first step that starts after it. ``fast=False`` runs every step through the
scheduler; the tests check both give the same times.
"""

from __future__ import annotations

import math
from itertools import chain
from operator import itemgetter

import numpy as np

from ..config import PolicyConfig
from ..engine.admission import queue_admits
from ..engine.request import Request, RequestOutput, RequestStatus, SamplingParams
from ..engine.scheduler import BatchView, RunToCompletionScheduler, Scheduler
from ..engine.step import StepResults
from .batch import DecodeRun, SimBatch
from .cost import SchedulerCost, StepCost

PARAMS = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)  # one for all: never read but for n


# --- the scheduler, with one projection computed faster --------------------------------------

def peak_slots(rows: list[tuple[int, int]], rows_leave: bool = True) -> int:
    """``decisions.projected_peak_slots`` in O(B log B) instead of O(B^2) (equal for every input:
    ``tests/simulate/test_replica.py`` checks it): at each row's last step t, the rows still
    present are those with ``remaining >= t``, so a sweep over t descending keeps their count
    and longest length."""
    if not rows:
        return 0
    if not rows_leave:
        horizon = max(r for _, r in rows)
        return len(rows) * max(length + horizon for length, _ in rows)
    peak = count = longest = 0
    ordered = sorted(rows, key=itemgetter(1), reverse=True)
    i = 0
    while i < len(ordered):
        t = ordered[i][1]
        while i < len(ordered) and ordered[i][1] == t:
            count += 1
            longest = max(longest, ordered[i][0])
            i += 1
        peak = max(peak, count * (longest + t))
    return peak


class FastFits:
    """``Scheduler._fits`` with ``peak_slots``: at a few hundred rows the quadratic projection
    would dominate a simulated step. Every other decision is the engine's own code."""

    def _fits(self, rows: list[tuple[int, int]]) -> bool:
        limits = self.policy.limits
        if len(rows) > limits.max_batch_size:
            return False
        if self.rows_leave and len(rows) * max(map(sum, rows)) <= limits.max_kv_tokens:
            return True  # a bound on the peak: no row grows past its length + remaining
        return peak_slots(rows, self.rows_leave) <= limits.max_kv_tokens


class SimScheduler(FastFits, Scheduler):
    pass


class SimRunToCompletion(FastFits, RunToCompletionScheduler):
    pass


class Outcomes:
    """Per-request results of one simulation, by request index (NaN: did not happen)."""

    def __init__(self, n: int) -> None:
        self.first_token_s = np.full(n, np.nan)
        self.finished_s = np.full(n, np.nan)
        self.replica = np.full(n, -1, dtype=np.int32)
        self.preemptions = np.zeros(n, dtype=np.int32)
        self.refused: dict[str, int] = {}  # reason -> count

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


# --- the replica ---------------------------------------------------------------------------------

class Replica:
    """One engine process (see the module docstring). Times are simulated seconds."""

    def __init__(self, index: int, batching: str, policy: PolicyConfig, cost: StepCost, outcomes: Outcomes,
                 ready_at: float = 0.0, priorities_vary: bool = True, fast: bool = True) -> None:
        self.index = index
        self.rebatching = batching != "run_to_completion"
        self.scheduler = (SimScheduler if self.rebatching else SimRunToCompletion)(policy)
        self.budget_cost = SchedulerCost(cost)
        self.scheduler.step_cost = self.budget_cost
        self.cost = cost
        self.outcomes = outcomes
        self.batch = SimBatch()
        self.clock = ready_at  # when its next step may start
        self.ready_at = ready_at
        self.run_ahead: DecodeRun | None = None  # plain decode steps, then a step in which requests end
        self.priorities_vary = priorities_vary
        self.fast = fast
        self.queued = 0  # accepted, not yet started: the engine's admission count (admission.py)
        self.in_flight = 0  # accepted, final output not yet delivered
        self.last_end = -math.inf  # the last step's end, and the answers it delivers then
        self.last_delivered = 0
        self.steps = 0  # steps simulated ...
        self.planned = 0  # ... of which the scheduler planned
        self.busy_s = 0.0

    @property
    def policy(self) -> PolicyConfig:
        return self.scheduler.policy

    # --- the cluster's view ----------------------------------------------------------------------

    def key(self) -> float:
        """When it next needs to act: its next step, or the step that ends a bulk decode run."""
        if self.run_ahead is not None:
            return self.run_ahead.end
        return self.clock if self.scheduler.has_work() else math.inf

    def outstanding(self, now: float) -> int:
        """Requests accepted and not yet answered at ``now`` (a step ending later has not answered)."""
        return self.in_flight + (self.last_delivered if self.last_end > now else 0)

    def submit(self, request: Request, now: float) -> bool:
        """A request arrives at ``now``; False: refused (queue full), as ``AsyncEngine.submit``."""
        if not queue_admits(self.queued, self.policy.limits.max_queue, request.priority):
            self.outcomes.refuse("queue_full")
            return False
        self._cut(now)
        if not self.scheduler.has_work():
            self.clock = max(self.clock, now + self.cost.wake_s)
        self.scheduler.add(request)
        self.queued += 1
        self.in_flight += 1
        self.outcomes.replica[int(request.request_id)] = self.index
        self._plan_run()
        return True

    def run(self, until: float) -> None:
        """Every step that starts before ``until``."""
        while self.key() < until:
            if self.run_ahead is not None:
                self._apply_run(self.run_ahead.steps)
                self.run_ahead = None
                if self.rebatching:
                    self._ending_step()
                else:
                    self._step()
            else:
                self._step()
            self._plan_run()

    # --- one step, as EngineCore.step --------------------------------------------------------------

    def _step(self) -> None:
        batch, scheduler, cost = self.batch, self.scheduler, self.cost
        start = self.clock
        batch.sync_all()
        rows, length = batch.rows, batch.length
        self.budget_cost.set_batch(rows, length + 1)
        plan = scheduler.schedule(start, BatchView(rows, length, batch.real_tokens))
        for preemption in plan.preempt:
            batch.remove(preemption.request)  # swap: its K/V wait on host memory; recompute: dropped
            self.outcomes.preemptions[int(preemption.request.request_id)] += 1
        for request in plan.resume:
            batch.add(request)
        parts = [(r, r.num_prefill_tokens, True) for r in plan.prefill]
        parts += [(c.request, c.stop - c.start, c.last) for c in plan.chunks]
        prompt_tokens = sum(count for _, count, _ in parts)
        for request, _, _ in parts:
            if request.times.first_scheduled is None:
                request.times.first_scheduled = start
                self.queued -= 1
        results = StepResults()
        if plan.fused and parts and batch.rows:  # prompts ride in the decode rows' forward
            end = start + cost.seconds(1, batch.rows, batch.length + 1, prompt_tokens)
            self._decode(results)
            self._join(parts, results, end)
        else:  # prompts in a forward of their own (first tokens published), then every row decodes
            end = start
            if parts:
                end += cost.seconds(1, 0, 0, prompt_tokens)
                self._join(parts, results, end)
            if batch.rows:
                end += cost.seconds(1, batch.rows, batch.length + 1, 0)
                self._decode(results)
        update = scheduler.update_from_output(plan, results)
        for request in update.leave:
            batch.remove(request)
        # Re-batching answers every request the step ended (``Scheduler._settle``); run-to-
        # completion answers what ``update.outputs`` holds.
        ended = results.finished if self.rebatching else [o for o in update.outputs if o.finished]
        self._deliver([r.request_id for r in ended], end)
        self.planned += 1
        self._account(start, end)

    def _decode(self, results: StepResults) -> None:
        """One token for every row; the requests it ends are settled."""
        self.batch.decodes += 1
        for request in self.batch.pop_due():
            self._end(request, results)

    def _join(self, parts, results: StepResults, first_token_at: float) -> None:
        """Prompts whose last part ran: a fresh one samples its first token; the unfinished join."""
        for request, _, last in parts:
            if not last:
                continue
            if not request.output_token_ids:  # a recompute-resumed request samples nothing
                request.output_token_ids.append(0)
                self.outcomes.first_token_s[int(request.request_id)] = first_token_at
                if len(request.output_token_ids) >= request.max_tokens:
                    self._end(request, results)
                    continue
            results.joined.append(request)
            self.batch.add(request)

    def _end(self, request: Request, results: StepResults) -> None:
        """A request reached ``max_tokens``. Its final output is built only where the scheduler
        reads it (run-to-completion holds it until the batch is done)."""
        request.status = RequestStatus.FINISHED_LENGTH
        results.finished.append(request)
        if not self.rebatching:
            results.outputs.append(RequestOutput(request.request_id, (), "", None, finished=True,
                                                 finish_reason="length"))

    def _ending_step(self) -> None:
        """A pure decode step in which requests end (re-batching): the scheduler forgets them
        (``finish_requests``) and their rows leave, as ``update_from_output`` would do."""
        batch, start = self.batch, self.clock
        end = start + self.cost.seconds(1, batch.rows, batch.length + 1, 0)
        results = StepResults()
        self._decode(results)
        for request in self.scheduler.finish_requests(results.finished):
            batch.remove(request)
        self._deliver([r.request_id for r in results.finished], end)
        self._account(start, end)

    def _deliver(self, request_ids: list[str], at: float) -> None:
        for rid in request_ids:
            self.outcomes.finished_s[int(rid)] = at
        self.in_flight -= len(request_ids)
        self.last_end, self.last_delivered = at, len(request_ids)

    def _account(self, start: float, end: float) -> None:
        self.steps += 1
        self.busy_s += end - start
        self.clock = end + self.cost.gap_s

    # --- bulk decode ---------------------------------------------------------------------------------

    def _plan_run(self) -> None:
        """Plan a bulk decode run if nothing can change before the next request ends."""
        if not self.fast or self.run_ahead is not None or not self._only_decode():
            return
        due = self.batch.next_due()
        if due == math.inf:
            return
        a, b = self.cost.decode_run(self.batch.rows, self.batch.length + 1)
        self.run_ahead = DecodeRun(self.clock, int(due) - self.batch.decodes - 1, a, b)

    def _only_decode(self) -> bool:
        """Whether the scheduler's plan is every row decoding, and stays so until a row ends."""
        scheduler = self.scheduler
        if not self.batch.rows or scheduler.prefilling:
            return False
        if not self.rebatching:
            return bool(scheduler.running)
        if not (scheduler.waiting or scheduler.swapped):
            return True
        return self._full_without_victims()

    def _full_without_victims(self) -> bool:
        scheduler = self.scheduler
        policy = scheduler.policy
        if len(scheduler.running) < policy.limits.max_batch_size:
            return False
        if policy.preemption.mode == "off" or not self.priorities_vary:
            return True
        cap = policy.preemption.max_preemptions_per_request
        eligible = [r.priority for r in scheduler.running.values() if r.num_preemptions < cap]
        if not eligible:
            return True
        least_urgent = max(eligible)
        return all(c.priority >= least_urgent for c in chain(scheduler.waiting, scheduler.swapped))

    def _cut(self, now: float) -> None:
        """Apply the run's steps that start before ``now``; the run ends there."""
        if self.run_ahead is not None:
            self._apply_run(self.run_ahead.started_before(now))
            self.run_ahead = None

    def _apply_run(self, steps: int) -> None:
        """The run's first ``steps`` plain decode steps: the batch's decode count and the clock."""
        run = self.run_ahead
        if steps <= 0:
            return
        self.batch.decodes += steps
        elapsed = run.offset(steps)
        self.clock = run.start + elapsed
        self.steps += steps
        self.busy_s += elapsed - steps * self.cost.gap_s
