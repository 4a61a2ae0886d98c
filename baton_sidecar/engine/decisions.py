"""The scheduler's pure decisions: waiting order, preemption victims, KV and padding projections.

Functions of their arguments alone, so unit tests drive them without a model or a scheduler.
"""

from __future__ import annotations

import math

from .request import Request


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


def request_rows(request: Request) -> list[tuple[int, int]]:
    """``(length, remaining steps)`` of each row the request holds or will hold (its forks'
    too), as ``projected_peak_slots`` sees them."""
    return [(request.num_tokens, request.max_tokens - len(request.output_token_ids))] * request.num_rows
