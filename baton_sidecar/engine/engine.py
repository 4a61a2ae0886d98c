"""The asyncio-facing engine: submit, stream, cancel. Model work runs on its own thread.

The event loop validates and admits (``admission.py``: the whole rule is decided in
``submit``) and enqueues; the engine thread drains its inbox between steps, runs
``EngineCore.step`` and hands outputs back with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections import Counter
from typing import AsyncIterator, Callable, Iterator

from ..config import EngineConfig, PolicyConfig
from ..model import LoadedModel, load_model
from .admission import QueueCount, check_shape, resolve_class, tokenize_prompt
from .core import EngineCore, EngineStats
from .grammar import RowGrammar
from .request import (AdmissionError, Request, RequestOutput, RequestValidationError, SamplingParams,
                      StructuredOutput, best_choices, choice_id, collect)
from .step import StepRecord

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05


class RequestStream:
    """Async iterator over one request's ``RequestOutput`` deltas, its choices' interleaved
    (``out.index``); it ends after every choice's final delta (``out.finished``)."""

    def __init__(self, request_id: str, engine: "AsyncEngine", choices: int = 1) -> None:
        self.request_id = request_id
        self.choices = choices
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._open = choices  # choices without their final delta yet
        self.finished = False

    def _put(self, output: RequestOutput) -> None:
        self._queue.put_nowait(output)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        output = await self._queue.get()
        self._open -= output.finished
        self.finished = self._open == 0
        return output

    def cancel(self) -> None:
        if not self.finished:
            self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None,
                 policy: PolicyConfig | None = None) -> None:
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.core = EngineCore(loaded, self.config, policy or PolicyConfig())
        self.core.publish_early = self._publish
        self._inbox: list[tuple[str, object]] = []  # ("add", Request) | ("abort", id) | ("policy", PolicyConfig)
        self._lock = threading.RLock()  # guards _inbox; re-entrant for submit_together
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = False
        self._ready = False
        self._refusals: Counter[str] = Counter()
        self._queue = QueueCount()  # accepted, not yet started (see admission.py)
        self._started_seen = 0  # core.started_total already taken off the count
        self._ids = itertools.count()
        self._stats = EngineStats()
        self._policy = self.core.policy

    @classmethod
    def from_config(cls, config: EngineConfig, policy: PolicyConfig | None = None) -> "AsyncEngine":
        return cls(load_model(config), config, policy)

    # --- properties -------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def model_name(self) -> str:
        return self.loaded.name

    @property
    def max_model_len(self) -> int:
        return self.loaded.max_model_len

    @property
    def is_ready(self) -> bool:
        return self._ready and self._accepting

    @property
    def policy(self) -> PolicyConfig:
        return self._policy

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, warmup: bool = True) -> None:
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="baton-engine", daemon=True)
        self._thread.start()
        if warmup:
            await self.generate([self.tokenizer.eos_token_id or 0], SamplingParams(max_tokens=2, temperature=0))
        self._ready = True

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Stop admitting; let running work finish within the deadline; cancel the rest."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            self.abort(request_id)
        while self._streams and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.02)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        self.core.grammars.close()
        self._ready = False

    # --- requests -------------------------------------------------------------------------------

    def submit(self, prompt: str | list[int], params: SamplingParams, *, request_id: str | None = None,
               priority: int | None = None, sla_class: str | None = None,
               deadline_s: float | None = None) -> RequestStream:
        """Validate and admit a request, or raise ``RequestValidationError`` / ``AdmissionError``.

        The whole admission rule (``admission.py``): shutting down (503); what no wait can
        change, against the current policy (400); queue capacity from one count of accepted,
        unstarted requests (429). Nothing later refuses a request.
        """
        if not self._accepting:
            self._refuse("shutting_down")
            raise AdmissionError("shutting_down", "the engine is not accepting requests")
        policy = self._policy
        token_ids = tokenize_prompt(self.tokenizer, prompt, self.max_model_len)
        params.check_vocab(len(self.tokenizer))
        grammar = self._grammar(params)
        priority, deadline = resolve_class(policy, priority, sla_class, deadline_s)
        if params.prompt_logprobs is not None and not self.core.runner.scores_prompts:
            raise RequestValidationError("prompt_logprobs", "this model transforms its logits after the "
                                                            "output head; its prompt cannot be scored")
        max_tokens = params.max_tokens if params.max_tokens is not None else max(
            1, self.max_model_len - len(token_ids))
        request_id = request_id or f"req-{uuid.uuid4().hex[:12]}-{next(self._ids)}"
        rows = params.num_sequences
        choice_ids = [choice_id(request_id, i) for i in range(rows)]
        if any(c in self._streams for c in choice_ids):
            raise RequestValidationError("request_id", f"{request_id!r} (or a choice of it) is already in flight")
        try:
            check_shape(len(token_ids), max_tokens, self.max_model_len, policy.limits, rows,
                        "best_of" if params.ranks_choices else "n")
            self._queue.enter(policy.limits, priority)
        except AdmissionError as refusal:
            self._refuse(refusal.reason)
            raise
        request = Request(request_id, token_ids, params, max_tokens, priority=priority,
                          sla_class=sla_class, deadline=deadline, grammar=grammar)
        request.fork()
        stream = RequestStream(request_id, self, rows)
        self._streams.update(dict.fromkeys(choice_ids, stream))  # outputs arrive by choice id
        self._send("add", request)
        return stream

    @contextlib.contextmanager
    def submit_together(self) -> Iterator[None]:
        """Requests submitted inside reach the engine thread in one inbox, so the next step sees
        them all (the engine thread waits for the block to end; keep it short)."""
        with self._lock:
            yield

    async def compile_grammar(self, structured: StructuredOutput) -> None:
        """Compile (and cache) a structured-output grammar on the compile thread, so that a
        ``submit`` with it right after finds it ready. Raises ``RequestValidationError``
        naming ``structured.field`` for an invalid one. ``submit`` without this first compiles
        on the caller's thread (a few ms for a typical JSON schema); never on the engine's."""
        grammars = self.core.grammars
        if not grammars.cached(structured):
            await asyncio.get_running_loop().run_in_executor(grammars.executor, grammars.compile, structured)
        grammars.compile(structured)  # a cached error is raised here too

    def _grammar(self, params: SamplingParams) -> RowGrammar | None:
        """The request's own matcher (a copy of the cached compiled grammar), or None."""
        if params.structured is None:
            return None
        return self.core.grammars.compile(params.structured).matcher()

    async def generate(self, prompt: str | list[int], params: SamplingParams, **kwargs) -> RequestOutput:
        """Run a one-choice request to the end; a single output with all its tokens and text."""
        if params.num_sequences != 1:
            raise ValueError("generate() returns one choice; use generate_choices() for n or best_of > 1")
        return (await self.generate_choices(prompt, params, **kwargs))[0]

    async def generate_choices(self, prompt: str | list[int], params: SamplingParams,
                               **kwargs) -> list[RequestOutput]:
        """Run a request to the end: one collected output per choice, by index. With ``best_of``
        > ``n``, the ``n`` best (``best_choices``), re-indexed."""
        stream = self.submit(prompt, params, **kwargs)
        deltas: list[list[RequestOutput]] = [[] for _ in range(stream.choices)]
        try:
            async for out in stream:
                deltas[out.index].append(out)
        except BaseException:
            stream.cancel()
            raise
        collected = [collect(d, params) for d in deltas]
        return best_choices(collected, params.n) if params.ranks_choices else collected

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    def apply_policy(self, policy: PolicyConfig) -> None:
        """Swap the policy in; the engine thread adopts it between steps."""
        self._policy = policy
        self._send("policy", policy)

    def stats(self) -> EngineStats:
        """The engine thread's latest snapshot, with refusals counted up to now."""
        return dataclasses.replace(self._stats, refusals_by_reason=dict(self._refusals))

    def observe_steps(self, observer: Callable[[StepRecord], None] | None) -> None:
        """Call ``observer`` on the engine thread after every step with its ``StepRecord``
        (None stops it). It must be quick: the next step waits for it."""
        self.core.step_observer = observer

    def _refuse(self, reason: str) -> None:
        self._refusals[reason] += 1

    # --- the engine thread ------------------------------------------------------------------------

    def _send(self, kind: str, payload: object) -> None:
        with self._lock:
            self._inbox.append((kind, payload))
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            with self._lock:
                inbox, self._inbox = self._inbox, []
            outputs: list[RequestOutput] = []
            try:
                self._turn(inbox, outputs)
            except Exception as error:  # outside a step (an intake, a policy, a snapshot): hang nothing
                log.exception("engine loop failed")
                self._salvage(inbox, outputs, f"engine failed: {error}")
            if outputs:
                self._publish(outputs)
            if not self.core.has_work():
                self._wake.wait(_IDLE_WAIT_S)
                self._wake.clear()

    def _turn(self, inbox: list[tuple[str, object]], outputs: list[RequestOutput]) -> None:
        """Take in ``inbox``, run one step if there is work, refresh the snapshot; outputs so far
        go to ``outputs`` (published even if this raises)."""
        for kind, payload in inbox:
            if kind == "add":
                self.core.add(payload)
            elif kind == "abort":
                outputs.extend(self.core.abort(payload))
            elif kind == "policy":
                outputs.extend(self.core.apply_policy(payload))
        if self.core.has_work():
            try:
                outputs.extend(self.core.step())
            except Exception as error:  # keep serving: end what was in flight, never hang it
                log.exception("engine step failed")
                outputs.extend(self.core.fail_all(f"engine step failed: {error}"))
        self._stats = self.core.stats()
        started = self.core.started_total
        self._queue.leave(started - self._started_seen)  # they no longer count against the queue
        self._started_seen = started

    def _salvage(self, inbox: list[tuple[str, object]], outputs: list[RequestOutput], error: str) -> None:
        """End every request the core holds, and every choice of this turn's intake that it may not
        have taken in (its add failed, or came after the failure), with ``error``."""
        try:
            outputs.extend(self.core.fail_all(error))
        except Exception:
            log.exception("engine could not end its requests")
        ended = {o.request_id for o in outputs if o.finished}
        orphans = [RequestOutput(c.request_id, (), "", None, finished=True, finish_reason="error", error=error,
                                 index=c.index)
                   for kind, request in inbox if kind == "add"
                   for c in (request, *request.forks) if c.request_id not in ended]
        outputs.extend(orphans)
        # Requests the core never took in never start: they leave the queue count here.
        self._queue.leave(sum(kind == "add" and request.request_id not in ended for kind, request in inbox))

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """From the engine thread: hand outputs to the event loop (in order, FIFO)."""
        self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)  # by choice id
            if stream is None:
                continue
            stream._put(output)
            if output.finished:
                del self._streams[output.request_id]
