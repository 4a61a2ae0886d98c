"""The systems under test, each replaying a ``Workload`` open-loop and returning records.

- ``baton``      AsyncEngine, iteration-level re-batching (finished rows leave at once).
- ``rtc``        the same engine with ``EngineConfig(batching="run_to_completion")``.
- ``hf_static``  transformers ``generate`` on batches of ``hf_batch_size`` (default 8)
                 arrived requests, left-padded, run to the longest request of the batch.
- ``hf_cb``      transformers continuous batching (``init_continuous_batching``) with
                 per-request ``max_new_tokens``.
- ``sequential`` transformers ``generate`` one request at a time.
- ``url``        an OpenAI-compatible server: POST /v1/completions with prompt token ids,
                 ``stream: true`` (TTFT and ITL from the SSE chunks).

All are greedy and ignore EOS, so every request produces exactly ``max_tokens`` tokens
and all systems do the same useful work. Times come from the load generator's
``time.perf_counter`` relative to the start of the system's run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp
import torch

from ..config import EngineConfig, PolicyConfig
from ..model import LoadedModel
from .metrics import RequestRecord
from .workloads import BenchRequest, Workload

log = logging.getLogger(__name__)

ENGINE_SYSTEMS = ("baton", "rtc")
LOCAL_SYSTEMS = ("baton", "rtc", "hf_static", "hf_cb", "sequential")

Progress = Callable[[int], None]  # called with a number of finished output tokens


@dataclass
class SystemRun:
    name: str
    records: list[RequestRecord]
    cpu_s: float = 0.0  # process CPU time (all threads) spent during the run
    wall_s: float = 0.0
    load_avg_before: float | None = None
    load_avg_after: float | None = None
    steps: list[dict[str, float]] = field(default_factory=list)  # engine systems: one entry per step
    info: dict[str, Any] = field(default_factory=dict)


def _load_avg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _new_records(workload: Workload) -> list[RequestRecord]:
    return [RequestRecord(r.index, r.arrival_s, r.prompt_len, r.max_tokens, r.priority)
            for r in workload.requests]


class _Timed:
    """Context: wall time, process CPU time and load average around a system's run."""

    def __init__(self, run: SystemRun) -> None:
        self.run = run

    def __enter__(self) -> "_Timed":
        self.run.load_avg_before = _load_avg()
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.run.cpu_s = time.process_time() - self._cpu
        self.run.wall_s = time.perf_counter() - self._wall
        self.run.load_avg_after = _load_avg()


# --- Baton's engine (baton, rtc) -------------------------------------------------------------

def instrument_engine_core(core, steps: list[dict[str, float]]) -> None:
    """Record one entry per engine step on this ``EngineCore`` instance (the bench's own).

    Wraps the instance's ``step``, ``runner.prefill`` and ``runner.decode``: step time,
    prefill time and tokens, decode time, and the batch's rows, live length and padding
    ratio just before the decode forward (the padding that decode's attention pays for).
    """
    runner = core.runner
    step_fn, prefill_fn, decode_fn = core.step, runner.prefill, runner.decode
    current: dict[str, float] = {}

    def prefill(request_ids, token_lists):
        start = time.perf_counter()
        try:
            return prefill_fn(request_ids, token_lists)
        finally:
            current["prefill_s"] = current.get("prefill_s", 0.0) + time.perf_counter() - start
            current["prefill_tokens"] = current.get("prefill_tokens", 0) + sum(len(t) for t in token_lists)

    def decode():
        cache = runner.cache
        current.update(rows=cache.rows, length=cache.length + 1, padding_ratio=cache.padding_ratio())
        start = time.perf_counter()
        try:
            return decode_fn()
        finally:
            current["decode_s"] = time.perf_counter() - start

    def step():
        current.clear()
        start = time.perf_counter()
        try:
            return step_fn()
        finally:
            end = time.perf_counter()
            steps.append({"t": end, "step_s": end - start, "prefill_s": 0.0, "prefill_tokens": 0,
                          "decode_s": 0.0, "rows": 0, "length": 0, "padding_ratio": 0.0, **current})

    core.step, runner.prefill, runner.decode = step, prefill, decode


class EngineSystem:
    """``baton`` or ``rtc``: Baton's AsyncEngine driven through its public API."""

    def __init__(self, name: str, loaded: LoadedModel, config: EngineConfig, policy: PolicyConfig,
                 use_priorities: bool = True, fixed_priority: int | None = None) -> None:
        self.name = name
        self.loaded = loaded
        self.config = config
        self.policy = policy
        self.use_priorities = use_priorities
        self.fixed_priority = fixed_priority

    def run(self, workload: Workload, progress: Progress) -> SystemRun:
        run = SystemRun(self.name, _new_records(workload))
        asyncio.run(self._run(workload, run, progress))
        run.info.update(batching=self.config.batching, preemption=self.policy.preemption.mode,
                        max_batch_size=self.policy.limits.max_batch_size,
                        max_padding_ratio=self.policy.padding.max_padding_ratio,
                        bucketing=self.policy.padding.bucketing,
                        priorities="used" if self.use_priorities else "ignored")
        return run

    async def _run(self, workload: Workload, run: SystemRun, progress: Progress) -> None:
        from ..engine import AdmissionError, AsyncEngine, SamplingParams

        engine = AsyncEngine(self.loaded, self.config, self.policy)
        await engine.start(warmup=True)
        instrument_engine_core(engine.core, run.steps)
        try:
            with _Timed(run):
                t0 = time.perf_counter()

                async def one(request: BenchRequest, record: RequestRecord) -> None:
                    delay = t0 + request.arrival_s - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    record.submitted_s = time.perf_counter() - t0
                    priority = request.priority if self.use_priorities else self.fixed_priority
                    params = SamplingParams(max_tokens=request.max_tokens, temperature=0.0, ignore_eos=True)
                    try:
                        stream = engine.submit(list(request.prompt_token_ids), params, priority=priority,
                                               sla_class=request.sla_class if self.use_priorities else None)
                    except AdmissionError as error:
                        record.error = f"refused: {error.reason}"
                        return
                    async for out in stream:
                        now = time.perf_counter() - t0
                        record.token_times_s.extend([now] * len(out.token_ids))
                        progress(len(out.token_ids))
                        if out.finished:
                            record.finished_s = now
                            record.output_tokens = out.completion_tokens
                            record.num_preemptions = out.num_preemptions
                            if out.finish_reason not in ("length", "stop"):
                                record.error = f"{out.finish_reason}: {out.error}"

                await asyncio.gather(*(one(r, rec) for r, rec in zip(workload.requests, run.records)))
        finally:
            await engine.shutdown(drain_timeout_s=5)


def engine_system(name: str, loaded: LoadedModel, base: EngineConfig, policy: PolicyConfig) -> EngineSystem:
    batching = "rebatch" if name == "baton" else "run_to_completion"
    config = EngineConfig(model=base.model, device=base.device, dtype=base.dtype, batching=batching,
                          max_model_len=base.max_model_len)
    return EngineSystem(name, loaded, config, policy)


# --- transformers baselines ---------------------------------------------------------------------

class _StepClock:
    """A ``generate`` streamer that stamps each decoding step (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _greedy_config(loaded: LoadedModel, max_new_tokens: int):
    """Greedy, exactly ``max_new_tokens`` tokens (EOS is suppressed until then)."""
    from transformers import GenerationConfig

    pad = loaded.tokenizer.pad_token_id
    eos = sorted(loaded.eos_token_ids)
    return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                            pad_token_id=pad if pad is not None else eos[0], eos_token_id=eos,
                            temperature=None, top_p=None, top_k=None)


class HFStaticSystem:
    """Static batching: up to ``batch_size`` arrived requests, left-padded, run to the longest."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 8, name: str = "hf_static") -> None:
        self.name = name
        self.loaded = loaded
        self.batch_size = batch_size

    @torch.inference_mode()
    def _generate(self, requests: list[BenchRequest]) -> tuple[_StepClock, torch.Tensor]:
        device = self.loaded.device
        pad = self.loaded.tokenizer.pad_token_id or 0
        width = max(r.prompt_len for r in requests)
        input_ids = torch.full((len(requests), width), pad, dtype=torch.long)
        mask = torch.zeros(len(requests), width, dtype=torch.long)
        for i, r in enumerate(requests):
            input_ids[i, width - r.prompt_len:] = torch.tensor(r.prompt_token_ids)
            mask[i, width - r.prompt_len:] = 1
        clock = _StepClock()
        out = self.loaded.model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                         generation_config=_greedy_config(self.loaded, max(r.max_tokens for r in requests)),
                                         streamer=clock)
        return clock, out

    def run(self, workload: Workload, progress: Progress) -> SystemRun:
        run = SystemRun(self.name, _new_records(workload), info={"batch_size": self.batch_size})
        self._generate(workload.requests[:1] if workload.requests else [])  # warm-up, not measured
        records = {r.index: rec for r, rec in zip(workload.requests, run.records)}
        pending = sorted(workload.requests, key=lambda r: (r.arrival_s, r.index))
        with _Timed(run):
            t0 = time.perf_counter()
            while pending:
                now = time.perf_counter() - t0
                arrived = [r for r in pending if r.arrival_s <= now]
                if not arrived:
                    time.sleep(max(0.0, pending[0].arrival_s - now))
                    continue
                batch = arrived[: self.batch_size]
                taken = {r.index for r in batch}
                pending = [r for r in pending if r.index not in taken]
                clock, out = self._generate(batch)
                done = time.perf_counter() - t0
                steps = [t - t0 for t in clock.times]
                for r in batch:
                    record = records[r.index]
                    generated = out.shape[1] - max(x.prompt_len for x in batch)
                    record.output_tokens = min(r.max_tokens, generated)
                    record.token_times_s = steps[: record.output_tokens]
                    record.finished_s = done  # a static batch returns when its longest row is done
                    if record.output_tokens < r.max_tokens:
                        record.error = f"short output ({record.output_tokens} < {r.max_tokens})"
                progress(sum(r.max_tokens for r in batch))
        return run


class SequentialSystem(HFStaticSystem):
    """One request at a time with transformers ``generate`` (batch size 1)."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__(loaded, batch_size=1, name="sequential")


class HFContinuousSystem:
    """transformers' own continuous batching (paged KV cache, FIFO scheduler).

    Sized like Baton's engine: the same request and token budgets. Results are collected
    with ``get_result(timeout=...)`` and no request id (with an id, another request's
    result at the head of the queue makes it return None). Token timestamps come from
    ``record_timestamps=True``; EOS is disabled per request with ``eos_token_id=-1``.
    """

    name = "hf_cb"

    def __init__(self, loaded: LoadedModel, max_batch_size: int = 32, max_batch_tokens: int = 2048,
                 page_size: int = 64, max_kv_tokens: int = 65536) -> None:
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.page_size = page_size
        self.max_kv_tokens = max_kv_tokens

    def _num_blocks(self, workload: Workload) -> int:
        need = sum(-(-(r.prompt_len + r.max_tokens) // self.page_size) + 1 for r in workload.requests)
        return max(16, min(need, self.max_kv_tokens // self.page_size))

    def run(self, workload: Workload, progress: Progress) -> SystemRun:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        num_blocks = self._num_blocks(workload)
        run = SystemRun(self.name, _new_records(workload), info={
            "page_size": self.page_size, "num_blocks": num_blocks,
            "max_requests_per_batch": self.max_batch_size, "max_batch_tokens": self.max_batch_tokens})
        model = self.loaded.model
        max_new = max((r.max_tokens for r in workload.requests), default=1)
        cb_config = ContinuousBatchingConfig(
            page_size=self.page_size, num_blocks=num_blocks, max_batch_tokens=self.max_batch_tokens,
            max_requests_per_batch=self.max_batch_size, allow_block_sharing=False)
        generation_config = _greedy_config(self.loaded, max_new)
        generation_config.min_new_tokens = None
        manager = model.init_continuous_batching(generation_config=generation_config,
                                                 continuous_batching_config=cb_config)
        manager.start()
        try:
            self._warm_up(manager, workload)
            records = {f"bench-{r.index}": rec for r, rec in zip(workload.requests, run.records)}
            with _Timed(run):
                t0 = time.perf_counter()
                feeder = threading.Thread(target=self._feed, args=(manager, workload, t0), daemon=True)
                feeder.start()
                done = 0
                while done < len(records):
                    result = manager.get_result(timeout=0.5)
                    if result is None:
                        if not manager.is_running():
                            raise RuntimeError("transformers continuous batching stopped unexpectedly")
                        continue
                    record = records.get(result.request_id)
                    if record is None or not result.is_finished():
                        continue
                    now = time.perf_counter() - t0
                    record.finished_s = now
                    record.output_tokens = len(result.generated_tokens)
                    stamps = list(result.timestamps or [])
                    record.token_times_s = [t - t0 for t in stamps[-record.output_tokens:]] or [now]
                    if result.error is not None:
                        record.error = str(result.error)
                    elif record.output_tokens < record.max_tokens:
                        record.error = f"short output ({record.output_tokens} < {record.max_tokens})"
                    progress(record.output_tokens)
                    done += 1
                feeder.join()
        finally:
            manager.stop(block=True, timeout=30)
        return run

    @staticmethod
    def _feed(manager, workload: Workload, t0: float) -> None:
        for request in sorted(workload.requests, key=lambda r: (r.arrival_s, r.index)):
            delay = t0 + request.arrival_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            manager.add_request(list(request.prompt_token_ids), request_id=f"bench-{request.index}",
                                max_new_tokens=request.max_tokens, eos_token_id=-1, record_timestamps=True)

    @staticmethod
    def _warm_up(manager, workload: Workload) -> None:
        if not workload.requests:
            return
        first = workload.requests[0]
        manager.add_request(list(first.prompt_token_ids), request_id="warmup", max_new_tokens=2, eos_token_id=-1)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            result = manager.get_result(timeout=0.5)
            if result is not None and result.request_id == "warmup" and result.is_finished():
                return
        raise RuntimeError("transformers continuous batching did not answer a warm-up request in 120 s")


# --- a remote OpenAI-compatible server -----------------------------------------------------------

class URLSystem:
    """Load generator for an OpenAI-compatible server (``/v1/completions``, streaming)."""

    local = False  # the work happens in another process: no CPU-time accounting

    def __init__(self, url: str, model: str | None = None, name: str = "url", timeout_s: float = 600.0) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s

    def run(self, workload: Workload, progress: Progress) -> SystemRun:
        run = SystemRun(self.name, _new_records(workload), info={"url": self.url})
        asyncio.run(self._run(workload, run, progress))
        run.info["model"] = self.model
        return run

    async def _resolve_model(self, session) -> str:
        if self.model:
            return self.model
        async with session.get(f"{self.url}/v1/models") as response:
            response.raise_for_status()
            data = await response.json()
        models = data.get("data") or []
        if not models:
            raise RuntimeError(f"{self.url}/v1/models lists no model; pass --model-name")
        self.model = models[0]["id"]
        return self.model

    async def _run(self, workload: Workload, run: SystemRun, progress: Progress) -> None:

        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            model = await self._resolve_model(session)
            with _Timed(run):
                t0 = time.perf_counter()
                await asyncio.gather(*(self._one(session, model, r, rec, t0, progress)
                                       for r, rec in zip(workload.requests, run.records)))

    async def _one(self, session, model: str, request: BenchRequest, record: RequestRecord, t0: float,
                   progress: Progress) -> None:
        delay = t0 + request.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        record.submitted_s = time.perf_counter() - t0
        body = {"model": model, "prompt": list(request.prompt_token_ids), "max_tokens": request.max_tokens,
                "temperature": 0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        if request.priority is not None:
            body["priority"] = request.priority
        usage_tokens = None
        try:
            async with session.post(f"{self.url}/v1/completions", json=body) as response:
                if response.status != 200:
                    text = (await response.text())[:200]
                    record.error = f"HTTP {response.status}: {text}"
                    return
                async for raw in response.content:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    chunk = json.loads(payload)
                    now = time.perf_counter() - t0
                    if chunk.get("usage"):
                        usage_tokens = chunk["usage"].get("completion_tokens")
                    for choice in chunk.get("choices") or ():
                        # One chunk normally carries one token; token ids are counted when present.
                        ids = choice.get("token_ids")
                        n = len(ids) if isinstance(ids, list) else (1 if choice.get("text") else 0)
                        record.token_times_s.extend([now] * n)
                        progress(n)
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as error:
            record.error = f"{type(error).__name__}: {error}"
            return
        record.finished_s = time.perf_counter() - t0
        record.output_tokens = usage_tokens if usage_tokens is not None else len(record.token_times_s)
        if record.output_tokens < request.max_tokens:
            record.error = f"short output ({record.output_tokens} < {request.max_tokens})"


# --- the registry --------------------------------------------------------------------------------

def build_system(name: str, loaded: LoadedModel, base: EngineConfig, policy: PolicyConfig,
                 hf_batch_size: int = 8):
    if name in ENGINE_SYSTEMS:
        return engine_system(name, loaded, base, policy)
    if name == "hf_static":
        return HFStaticSystem(loaded, batch_size=hf_batch_size)
    if name == "sequential":
        return SequentialSystem(loaded)
    if name == "hf_cb":
        limits = policy.limits
        return HFContinuousSystem(loaded, max_batch_size=limits.max_batch_size,
                                  max_batch_tokens=max(limits.max_prefill_tokens, limits.max_batch_size),
                                  max_kv_tokens=limits.max_kv_tokens)
    raise ValueError(f"systems: unknown system {name!r}; known: {', '.join(LOCAL_SYSTEMS)} (and --url)")
