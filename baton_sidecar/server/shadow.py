"""Shadow traffic (mirroring): a share of the incumbent's requests also run on Baton, then discarded.

``router.shadow_percent`` of the eligible requests the router sends to the incumbent are copied to
the engine. The client only ever gets the incumbent's answer: the copy's output is consumed here
and dropped, never returned, never counted as Baton traffic (A/B samples, request metrics). When
both arms are done the two timings become a ``paired.Pair``.

A copy must never cost real traffic anything:
- it is started only while the engine has room (no row swapped out, and a batch slot free for
  it after every request already waiting), so under load copies are refused first;
- it runs at the least urgent priority there is, so any real request preempts it and is admitted
  before it;
- a streamed request is shadowed as a plain run whose first token is time-stamped (TTFT).

Copies start with the incumbent's request, so both arms see the same arrival time.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any, Callable

from baton_sidecar.engine.request import AdmissionError, RequestValidationError
from baton_sidecar.server.errors import APIError
from baton_sidecar.server.local import prepare_prompt
from baton_sidecar.server.oai_request import ParsedRequest
from baton_sidecar.server.paired import ArmTiming, Pair, PairedStats, output_distance
from baton_sidecar.server.results import ArmResult

log = logging.getLogger(__name__)

SHADOW_PRIORITY = 2 ** 63 - 1  # the least urgent an int64 priority can be (lower = more urgent)
INCUMBENT_WAIT_S = 600.0  # a copy whose incumbent answer never comes is dropped after this


class Shadow:
    """Decides which incumbent requests are copied, runs the copies, and records the pairs."""

    def __init__(self, paired: PairedStats, rand: Callable[[], float] = random.random) -> None:
        self.paired = paired
        self._rand = rand
        self.incumbent_in_flight = 0  # the incumbent's requests now being answered (contention)
        self._tasks: set[asyncio.Task] = set()
        self._closed = False  # draining: no new copies

    def start(self, percent: float, engine: Any, policy: Any, parsed: ParsedRequest, arrival: float,
              executor: Any, chat_template: str | None) -> asyncio.Future | None:
        """Start a copy of ``parsed`` if it is drawn and the engine has room; returns the future
        the incumbent's ``ArmResult`` must be set on, or None when nothing was started."""
        if percent <= 0 or self._closed or self._rand() * 100 >= percent:
            return None
        if engine is None or not engine.is_ready:
            self.paired.skipped["not_ready"] += 1
            return None
        load = engine.stats()
        reason = _no_room(load, policy)
        if reason is not None:
            self.paired.skipped[reason] += 1
            return None
        incumbent_done = asyncio.get_running_loop().create_future()
        contention = (self.incumbent_in_flight, load.running + load.waiting)  # (nothing swapped: room)
        task = asyncio.ensure_future(self._run(engine, parsed, arrival, executor, chat_template,
                                               incumbent_done, contention))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.paired.shadowed += 1
        return incumbent_done

    async def _run(self, engine: Any, parsed: ParsedRequest, arrival: float, executor: Any,
                   chat_template: str | None, incumbent_done: asyncio.Future,
                   contention: tuple[int, int]) -> None:
        try:
            baton = await _run_on_engine(engine, parsed, arrival, executor, chat_template)
        except (AdmissionError, RequestValidationError, APIError) as exc:  # refused after all: no pair
            self.paired.skipped["refused"] += 1
            log.debug("shadow copy refused: %s", exc)
            return
        except Exception:  # a failed copy must never touch the client's request
            self.paired.skipped["failed"] += 1
            log.warning("shadow copy failed", exc_info=True)
            return
        try:
            incumbent: ArmResult = await asyncio.wait_for(asyncio.shield(incumbent_done), INCUMBENT_WAIT_S)
        except asyncio.TimeoutError:
            return
        if baton is None or not incumbent.served or incumbent.e2e_s is None:
            self.paired.skipped["unanswered"] += 1
            return
        greedy = parsed.params.greedy and parsed.params.num_sequences == 1
        answer = ArmTiming(incumbent.ttft_s, incumbent.e2e_s, incumbent.completion_tokens, incumbent.text)
        distance = await asyncio.to_thread(output_distance, greedy, baton, answer)
        self.paired.record(Pair(baton=baton, incumbent=answer, greedy=greedy, incumbent_in_flight=contention[0],
                                baton_in_flight=contention[1], edit_distance=distance))

    async def close(self) -> None:
        """Cancel the copies still running and start no more (the server is stopping)."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _no_room(s: Any, policy: Any) -> str | None:
    """Why the engine (its ``EngineStats`` ``s``) has no room for a copy; None if it has."""
    if s.swapped:  # preempted rows are waiting to come back
        return "queue"
    if s.running + s.waiting >= policy.limits.max_batch_size:  # no slot left once the queue is in
        return "batch_full"
    return None


async def _run_on_engine(engine: Any, parsed: ParsedRequest, arrival: float, executor: Any,
                         chat_template: str | None) -> ArmTiming | None:
    """Run the copy to its end; its timing, choice 0's text, or None if it did not finish well."""
    prompt = await prepare_prompt(engine, parsed, executor, chat_template)
    if parsed.params.structured is not None:
        await engine.compile_grammar(parsed.params.structured)
    stream = engine.submit(prompt, parsed.params, priority=SHADOW_PRIORITY, sla_class=parsed.sla_class)
    ttft_s, tokens, text, failed = None, 0, [], False
    try:
        async for out in stream:
            if out.token_ids and ttft_s is None:
                ttft_s = time.monotonic() - arrival
            tokens += len(out.token_ids)
            if out.index == 0:
                text.append(out.text)
            failed |= out.finished and out.finish_reason in ("error", "cancelled")
    finally:
        stream.cancel()  # no-op once finished; frees the row if this task is cancelled
    if failed:
        return None
    return ArmTiming(ttft_s, time.monotonic() - arrival, tokens, "".join(text))
