"""The simulated runner's batch: rows, their lengths, when each row's request ends.

Each decode adds one column to every row (run-to-completion riders included), so rather
than touching every row per step the batch counts decodes and settles a row's tokens only
when someone looks (``sync``)::

    row cached length  = offset + decodes           (the engine's cache: all but the pending token)
    request's tokens   = stale list + (decodes - synced)   for a request still producing

A row's ``num_computed_tokens`` is left as ``update_from_output`` sets it, from the settled
count: no decision reads it for a row in the batch (only for prompts being chunked).

The live length is the longest row's (the engine's cache drops columns that are padding in
every row). ``due`` is a heap of (decode count at which a row's request reaches
``max_tokens``): requests ignore EOS, as in the bench, so every end is known in advance.
"""

from __future__ import annotations

import heapq
import math
from itertools import repeat
from dataclasses import dataclass

from ..engine.request import Request

REQUEST, OFFSET, SYNCED, DUE = range(4)  # a member's fields


class SimBatch:
    def __init__(self) -> None:
        self.members: dict[str, list] = {}  # id -> [request, offset, decodes synced, due decode]
        self.decodes = 0
        self.offset_sum = 0
        self._longest: int | None = None  # the largest offset; None: recompute
        self.due: list[tuple[int, str]] = []  # (decode count at which it ends, id); stale entries skipped

    @property
    def rows(self) -> int:
        return len(self.members)

    @property
    def length(self) -> int:
        if not self.members:
            return 0
        if self._longest is None:
            self._longest = max(m[OFFSET] for m in self.members.values())
        return self._longest + self.decodes

    @property
    def real_tokens(self) -> int:
        return self.offset_sum + len(self.members) * self.decodes

    def requests(self):
        return (m[REQUEST] for m in self.members.values())

    def add(self, request: Request) -> None:
        """A row holding the request's K/V (every token but its pending one), settled now."""
        offset = request.num_tokens - 1 - self.decodes
        due = -1
        if not request.status.finished:
            due = self.decodes + request.max_tokens - len(request.output_token_ids)
            heapq.heappush(self.due, (due, request.request_id))
        self.members[request.request_id] = [request, offset, self.decodes, due]
        self.offset_sum += offset
        if self._longest is not None:
            self._longest = max(self._longest, offset)

    def remove(self, request: Request) -> None:
        member = self.members.pop(request.request_id)
        self.offset_sum -= member[OFFSET]
        if member[OFFSET] == self._longest:
            self._longest = None

    def sync(self, member: list) -> None:
        """Give a member's request the tokens of the decodes since it was last settled (a row
        whose request has ended, a run-to-completion rider, has ``DUE`` -1 and gets none)."""
        behind = self.decodes - member[SYNCED]
        if behind and member[DUE] >= 0:
            member[REQUEST].output_token_ids.extend(repeat(0, behind))
        member[SYNCED] = self.decodes

    def sync_all(self) -> None:
        decodes = self.decodes
        for member in self.members.values():  # sync() inlined: this runs before every planned step
            behind = decodes - member[SYNCED]
            if behind:
                if member[DUE] >= 0:
                    member[REQUEST].output_token_ids.extend(repeat(0, behind))
                member[SYNCED] = decodes

    def next_due(self) -> float:
        """The decode count at which the next row's request ends (inf: none will)."""
        due = self.due
        while due:
            count, rid = due[0]
            member = self.members.get(rid)
            if member is not None and member[DUE] == count:
                return count
            heapq.heappop(due)  # it left the batch (preempted, or rejoined with a new due)
        return math.inf

    def pop_due(self) -> list[Request]:
        """The requests whose last token the latest decode produced, settled."""
        ended = []
        while self.next_due() == self.decodes:
            _, rid = heapq.heappop(self.due)
            member = self.members[rid]
            self.sync(member)
            member[DUE] = -1
            ended.append(member[REQUEST])
        return ended


@dataclass
class DecodeRun:
    """``steps`` plain decode steps from ``start``; step i lasts ``a + b * i`` seconds."""

    start: float
    steps: int
    a: float
    b: float

    def offset(self, i: int) -> float:
        """Seconds from ``start`` to the start of step i (the end of step i - 1)."""
        return i * self.a + self.b * i * (i - 1) / 2

    @property
    def end(self) -> float:
        return self.start + self.offset(self.steps)

    def started_before(self, t: float) -> int:
        """How many of its steps start before ``t``."""
        d = t - self.start
        if d <= 0 or not self.steps:
            return 0
        if self.b > 0:  # b/2 i^2 + (a - b/2) i = d
            half = self.a - self.b / 2
            i = int(math.ceil((-half + math.sqrt(half * half + 2 * self.b * d)) / self.b)) - 1
        else:
            i = int(math.ceil(d / self.a)) - 1 if self.a > 0 else self.steps
        i = max(0, min(i, self.steps - 1))
        while i + 1 < self.steps and self.offset(i + 1) < d:
            i += 1
        while i > 0 and self.offset(i) >= d:
            i -= 1
        return i + 1
