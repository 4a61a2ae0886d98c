"""Development stand-in for the engine contract (docs/engine-api.md). Temporary."""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

from baton_sidecar.engine.request import (AdmissionError, RequestOutput, RequestTimes,
                                          RequestValidationError, SamplingParams, TokenLogprob)


class FakeTokenizer:
    def __len__(self):
        return 1000

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 1000 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


@dataclass
class Stats:
    running: int = 0
    waiting: int = 0
    swapped: int = 0
    batch_size: int = 0
    padding_ratio: float = 0.0
    kv_tokens_used: int = 0
    kv_tokens_capacity: int = 65536
    steps: int = 0
    preemptions_total: int = 0
    refusals_by_reason: dict = field(default_factory=dict)
    finished_by_reason: dict = field(default_factory=dict)


class FakeStream:
    def __init__(self, engine, rid, n_prompt, params):
        self.request_id = rid
        self.engine = engine
        self.params = params
        self.n_prompt = n_prompt
        self.cancelled = False
        self.times = RequestTimes()

    def cancel(self):
        self.cancelled = True

    async def __aiter__(self):
        e = self.engine
        e.waiting += 1
        try:
            async with e.sem:
                e.waiting -= 1
                e.running += 1
                try:
                    self.times.first_scheduled = time.monotonic()
                    for i in range(self.params.max_tokens):
                        await asyncio.sleep(e.step_s)
                        if self.cancelled:
                            self.times.finished = time.monotonic()
                            e.finished["cancelled"] = e.finished.get("cancelled", 0) + 1
                            yield RequestOutput(self.request_id, (), "", None, True, "cancelled",
                                                prompt_tokens=self.n_prompt, completion_tokens=i,
                                                times=self.times)
                            return
                        if i == 0:
                            self.times.first_token = time.monotonic()
                        last = i == self.params.max_tokens - 1
                        if last:
                            self.times.finished = time.monotonic()
                            e.finished["length"] = e.finished.get("length", 0) + 1
                        lp = (TokenLogprob(i, -0.5, tuple((j, -1.0 - j) for j in range(self.params.logprobs))),) if self.params.logprobs is not None else None
                        yield RequestOutput(self.request_id, (i,), chr(97 + i % 26), lp, last,
                                            "length" if last else None, prompt_tokens=self.n_prompt,
                                            completion_tokens=i + 1, times=self.times,
                                            events=(("queued", self.times.arrival), ("first_token", self.times.first_token)))
                finally:
                    e.running -= 1
        finally:
            pass


class FakeEngine:
    def __init__(self, max_queue=64, step_s=0.005, max_model_len=2048):
        self.tokenizer = FakeTokenizer()
        self.model_name = "fake"
        self.max_model_len = max_model_len
        self.is_ready = True
        self.max_queue = max_queue
        self.step_s = step_s
        self.sem = asyncio.Semaphore(8)
        self.running = 0
        self.waiting = 0
        self.refusals = {}
        self.finished = {}
        self.policies = []
        self._ids = itertools.count()
        self.shutting_down = False

    def submit(self, prompt, params, request_id=None, priority=0, sla_class=None, deadline_s=None):
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        if not ids:
            raise RequestValidationError("prompt", "must not be empty")
        if sla_class is not None and sla_class not in ("interactive", "batch"):
            raise RequestValidationError("sla_class", "unknown class")
        if self.shutting_down:
            raise AdmissionError("shutting_down", "draining")
        if len(ids) + params.max_tokens > self.max_model_len:
            self.refusals["too_large"] = self.refusals.get("too_large", 0) + 1
            raise AdmissionError("too_large", "too large")
        if self.waiting + self.running >= self.max_queue:
            self.refusals["queue_full"] = self.refusals.get("queue_full", 0) + 1
            raise AdmissionError("queue_full", "queue full", retry_after_s=1.5)
        return FakeStream(self, request_id or str(next(self._ids)), len(ids), params)

    def apply_policy(self, policy):
        self.policies.append(policy)
        self.max_queue = policy.limits.max_queue

    def stats(self):
        return Stats(running=self.running, waiting=self.waiting, batch_size=self.running,
                     refusals_by_reason=dict(self.refusals), finished_by_reason=dict(self.finished))

    async def shutdown(self, drain_timeout_s=30):
        self.shutting_down = True
