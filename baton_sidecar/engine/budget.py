"""How much prompt one step may prefill: a token limit, and while rows decode, a time target.

``StepBudget`` starts from the step's fixed work (its decode rows) and hands out prompt
tokens until either runs out:

- tokens: ``limits.max_prefill_tokens`` (the only limit with ``prefill.budget: tokens``);
- time: with ``prefill.budget: time`` and rows decoding, the step's predicted seconds
  (``StepCostModel``) stay under ``HEADROOM`` times the step target, so the rows' next token
  comes within their inter-token objective. With no row decoding nothing waits on the step,
  and the token limit alone applies. Nor does the time target hold a short prompt past its
  TTFT objective, or a prompt more urgent than every running row (``timed=False``): under
  overload steps stretch rather than the queue growing without bound, and less urgent rows'
  inter-token objective never delays a more urgent request's first token.
- a floor: the time target never cuts a step's prompt tokens below ``MIN_CHUNK`` in all. On
  a machine where the decode rows alone fill the target, short prompts would otherwise wait
  for their TTFT objective to pass before any step took them.

Each grant says why it is the size it is (``Grant.reason``), for the step's record.
"""

from __future__ import annotations

from dataclasses import dataclass

from .step_cost import FORWARD, StepCostModel, StepShape, decode_shape, prompt_shape

HEADROOM = 0.9  # aim under the target: predictions err, and the step does more than its forwards
MIN_CHUNK = 16  # no chunk is smaller but a prompt's last; every step may prefill this many (the floor)

# Why a grant has its size.
WHOLE = "whole"  # the rest of the prompt fitted
TIME = "time"  # cut by the step-time target
TOKENS = "tokens"  # cut by the token limit
FLOOR = "floor"  # the budget was spent: the minimum chunk, so the prompt still progresses


@dataclass(frozen=True)
class Grant:
    start: int
    count: int
    reason: str

    @property
    def stop(self) -> int:
        return self.start + self.count


class StepBudget:
    """One step's prefill allowance (see the module docstring)."""

    def __init__(self, token_limit: int, cost: StepCostModel | None = None, target_s: float | None = None,
                 rows: int = 0, context: int = 0, fused: bool = True) -> None:
        self.token_limit = token_limit
        self.cost = cost
        timed = cost is not None and target_s is not None and rows > 0
        self.target_s = target_s * HEADROOM if timed else None
        self.fused = fused
        self.tokens = 0  # prompt tokens granted (and reserved)
        self.reserved = 0  # held for the prompt under way that is first in line
        self.granted = False  # any prompt tokens yet (in separate mode, they open a forward)
        # The step's predicted work: its decode forward, and (separate) a prefill forward once
        # a prompt is granted.
        self.shape = FORWARD + decode_shape(rows, context) if rows else StepShape()
        self._base = self.shape

    def predicted_s(self) -> float | None:
        return None if self.cost is None else self.cost.predict(self.shape)

    def fits_alone(self, total: int, timed: bool = True) -> bool:
        """Whether a whole prompt of ``total`` tokens fits this step with no other prompt;
        ``timed=False``: against the token limit alone."""
        if total > self.token_limit:
            return False
        return (not timed or self.target_s is None or total <= self.least
                or self.cost.predict(self._with(0, total, True, self._base, False)) <= self.target_s)

    def _with(self, start: int, count: int, last: bool, shape: StepShape | None = None,
              granted: bool | None = None) -> StepShape:
        shape = self.shape if shape is None else shape
        first = not (self.granted if granted is None else granted)
        if first and (not self.fused or not shape.forwards):
            shape = shape + FORWARD  # the first prompt tokens open a forward of their own
        return shape + prompt_shape(start, count, last)

    def room(self, start: int, remaining: int, timed: bool = True) -> Grant:
        """The most of tokens ``[start, start + remaining)`` this step can still take;
        ``timed=False``: the token limit alone (an overdue prompt's)."""
        count = min(remaining, self.token_limit - self.tokens)
        reason = WHOLE if count == remaining else TOKENS
        if count <= 0:
            return Grant(start, 0, TOKENS)
        if timed and self.target_s is not None and self._over(start, count, remaining):
            low, high = 0, count  # the largest fitting count, by bisection: low fits, high does not
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if not self._over(start, middle, remaining) else (low, middle)
            floor = min(count, self.least - self.tokens)  # the step's prompt progress floor, if unspent
            if low < floor:
                count, reason = floor, (WHOLE if floor == remaining else FLOOR)
            else:
                count, reason = low, TIME
        return Grant(start, count, reason)

    def _over(self, start: int, count: int, remaining: int) -> bool:
        return self.cost.predict(self._with(start, count, count == remaining)) > self.target_s

    @property
    def least(self) -> int:
        """The minimum chunk: none smaller is planned unless it ends the prompt."""
        return min(MIN_CHUNK, self.token_limit)

    def reserve(self, remaining: int) -> None:
        """Hold the minimum chunk's tokens for a prompt under way, before whole prompts are granted."""
        self.reserved = min(self.least, remaining)
        self.tokens += self.reserved

    def chunk(self, start: int, remaining: int, first: bool, timed: bool = True) -> Grant:
        """The chunk of ``[start, start + remaining)`` to run now.

        - A prompt not yet started starts only with at least the minimum chunk.
        - The ``first`` in line, if under way, gets its reserved minimum even when the
          budget is spent (no prompt starves).
        - A chunk never leaves a tail under the minimum (tiny query blocks are reduced unlike
          the one-pass prefill's, and cost a step each): it takes the tail too if that is
          small and the token limit allows, else leaves the minimum for later.
        """
        least = self.least
        if first and self.reserved:
            self.tokens -= self.reserved
            self.reserved = 0
        grant = self.room(start, remaining, timed)
        if grant.count < min(least, remaining):
            if start == 0 or not first:
                return Grant(start, 0, grant.reason)
            grant = Grant(start, min(least, remaining), FLOOR)
        tail = remaining - grant.count
        if tail <= 0 or tail >= least:
            return grant
        if grant.count > least:
            return Grant(start, grant.count - (least - tail), grant.reason)
        if remaining <= self.token_limit - self.tokens:
            return Grant(start, remaining, grant.reason)
        return grant

    def take(self, grant: Grant, remaining: int) -> None:
        self.shape = self._with(grant.start, grant.count, grant.count == remaining)
        self.tokens += grant.count
        self.granted = True
