"""The systems under test, each replaying a ``Workload`` open-loop and returning records.

- ``baton``      AsyncEngine, iteration-level re-batching (finished rows leave at once).
- ``rtc``        the same engine with ``EngineConfig(batching="run_to_completion")``.
- ``hf_static``, ``hf_cb``, ``sequential``: transformers baselines (``hf_systems.py``).
- ``url``, ``hf_serve``, ``llama_server``, ``baton_serve``: OpenAI-compatible servers (``peer.py``,
                 ``servers.py``), in the mode their probe settles (token ids or text, EOS ignored or not).

All are greedy and ignore EOS (servers: where they accept it), so every request produces exactly
``max_tokens`` tokens and all systems do the same useful work. Times come from the load generator's
``time.perf_counter`` relative to the start of the system's run. The engine systems also
apply a request's ``Features`` (``--scenario features``, ``request_params``); the others
never see them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import EngineConfig, PolicyConfig
from ..engine.step import StepRecord
from ..model import LoadedModel
from .metrics import RequestRecord
from .workloads import BenchRequest, Workload

log = logging.getLogger(__name__)

ENGINE_SYSTEMS = ("baton", "rtc")
LOCAL_SYSTEMS = ("baton", "rtc", "hf_static", "hf_cb", "sequential", "baton_int8")

Progress = Callable[[int], None]  # called with a number of finished output tokens


@dataclass
class SystemRun:
    name: str
    records: list[RequestRecord]
    cpu_s: float = 0.0  # process CPU time (all threads) spent during the run
    wall_s: float = 0.0
    load_avg_before: float | None = None
    load_avg_after: float | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)  # engine systems: one entry per step
    info: dict[str, Any] = field(default_factory=dict)
    outputs: dict[int, list[str]] = field(default_factory=dict)  # keep_outputs: request index -> choice texts


def _load_avg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def new_records(workload: Workload, features: bool = False) -> list[RequestRecord]:
    """One record per request; ``features``: a request's choices count (the engine applies them)."""
    return [RequestRecord(r.index, r.arrival_s, r.prompt_len, r.max_tokens, r.priority,
                          choices=r.choices if features else 1)
            for r in workload.requests]


class Timed:
    """Context: wall time, process CPU time and load average around a system's run."""

    def __init__(self, run: SystemRun, cpu_clock: Callable[[], float] = time.process_time) -> None:
        self.run = run
        self.cpu_clock = cpu_clock  # a server's own CPU seconds for a server started by the bench

    def __enter__(self) -> "Timed":
        self.run.load_avg_before = _load_avg()
        self._cpu, self._wall = self.cpu_clock(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.run.cpu_s = self.cpu_clock() - self._cpu
        self.run.wall_s = time.perf_counter() - self._wall
        self.run.load_avg_after = _load_avg()


# --- Baton's engine (baton, rtc) -------------------------------------------------------------

def step_entry(record: StepRecord) -> dict[str, Any]:
    """One ``SystemRun.steps`` entry (``steps.json``) from the engine's ``StepRecord``.

    ``rows``, ``length`` and ``padding_ratio`` describe the decode forward (0 when the step
    had none); ``prefill_s`` and ``prefill_tokens`` count chunked prefill too, which is also
    given apart as ``chunk_s`` and ``chunk_tokens``. ``fused``: prompts rode in the decode
    forward; ``predicted_s``: the time budget's prediction; each chunk's size and reason.
    """
    return {"t": record.t, "step_s": record.step_s,
            "prefill_s": record.prefill_s + record.chunk_s,
            "prefill_tokens": record.prefill_tokens + record.chunk_tokens,
            "chunk_s": record.chunk_s, "chunk_tokens": record.chunk_tokens,
            "decode_s": record.decode_s, "rows": record.decode_rows, "length": record.context,
            "padding_ratio": record.padding_ratio, "fused": record.fused, "predicted_s": record.predicted_s,
            "chunk_sizes": list(record.chunk_sizes), "chunk_reasons": list(record.chunk_reasons)}


def request_params(request: BenchRequest, features: bool = True):
    """Greedy with EOS ignored; with ``features``, the request's own: choices, penalties, a JSON
    schema. A constrained row ends when its grammar does (EOS is the only token left), so it
    keeps EOS; ``max_tokens`` only caps it."""
    from ..engine import SamplingParams, StructuredOutput

    f = request.features if features else None
    if f is None:
        return SamplingParams(max_tokens=request.max_tokens, temperature=0.0, ignore_eos=True)
    structured = StructuredOutput("json", f.json_schema) if f.json_schema else None
    return SamplingParams(max_tokens=request.max_tokens, n=f.n, temperature=f.temperature, seed=f.seed,
                          ignore_eos=structured is None, structured=structured,
                          presence_penalty=f.presence_penalty, frequency_penalty=f.frequency_penalty,
                          repetition_penalty=f.repetition_penalty)


@dataclass
class EngineSystem:
    """``baton`` or ``rtc``: Baton's AsyncEngine driven through its public API.

    Steps are recorded through the engine's step observer (warm-up excluded). ``use_features``
    False sends every request plain; ``keep_outputs`` keeps each choice's text (``outputs``).
    """

    name: str
    loaded: LoadedModel
    config: EngineConfig
    policy: PolicyConfig
    use_priorities: bool = True
    fixed_priority: int | None = None
    use_features: bool = True
    keep_outputs: bool = False

    def run(self, workload: Workload, progress: Progress) -> SystemRun:
        run = SystemRun(self.name, new_records(workload, self.use_features))
        asyncio.run(self._run(workload, run, progress))
        run.info.update(batching=self.config.batching, preemption=self.policy.preemption.mode,
                        max_batch_size=self.policy.limits.max_batch_size,
                        max_padding_ratio=self.policy.padding.max_padding_ratio,
                        bucketing=self.policy.padding.bucketing,
                        prefill_budget=self.policy.prefill.budget, prefill_mode=self.policy.prefill.mode,
                        step_target_ms=self.policy.step_target_ms,
                        priorities="used" if self.use_priorities else "ignored",
                        features="applied" if self.use_features else "left out")
        return run

    async def _run(self, workload: Workload, run: SystemRun, progress: Progress) -> None:
        from ..engine import AdmissionError, AsyncEngine, RequestValidationError

        engine = AsyncEngine(self.loaded, self.config, self.policy)
        await engine.start(warmup=True)
        engine.observe_steps(lambda record: run.steps.append(step_entry(record)))
        # Schemas compiled before the clock starts: JSON traffic reuses a few schemas, cached
        # after their first request, and a first compile would only reorder the arrivals.
        for structured in {p.structured for p in (request_params(r, self.use_features) for r in workload.requests)
                           if p.structured is not None}:
            await engine.compile_grammar(structured)
        try:
            with Timed(run):
                t0 = time.perf_counter()

                async def one(request: BenchRequest, record: RequestRecord) -> None:
                    delay = t0 + request.arrival_s - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    record.submitted_s = time.perf_counter() - t0
                    priority = request.priority if self.use_priorities else self.fixed_priority
                    params = request_params(request, self.use_features)
                    try:
                        if params.structured is not None:  # as a server would: off the engine thread, cached
                            await engine.compile_grammar(params.structured)
                        stream = engine.submit(list(request.prompt_token_ids), params, priority=priority,
                                               sla_class=request.sla_class if self.use_priorities else None)
                    except AdmissionError as error:
                        record.error = f"refused: {error.reason}"
                        return
                    except RequestValidationError as error:
                        record.error = f"invalid: {error}"
                        return
                    texts = [""] * stream.choices
                    async for out in stream:  # choices' deltas interleaved; ends after the last one's final
                        now = time.perf_counter() - t0
                        if out.index == 0:
                            record.token_times_s.extend([now] * len(out.token_ids))
                        progress(len(out.token_ids))
                        if self.keep_outputs:
                            texts[out.index] += out.text
                        if out.finished:
                            record.finished_s = now
                            record.output_tokens += out.completion_tokens
                            record.num_preemptions += out.num_preemptions
                            if out.finish_reason not in ("length", "stop"):
                                record.error = f"{out.finish_reason}: {out.error}"
                    if self.keep_outputs:
                        run.outputs[request.index] = texts

                await asyncio.gather(*(one(r, rec) for r, rec in zip(workload.requests, run.records)))
        finally:
            await engine.shutdown(drain_timeout_s=5)


def engine_system(name: str, loaded: LoadedModel, base: EngineConfig, policy: PolicyConfig) -> EngineSystem:
    batching = "rebatch" if name == "baton" else "run_to_completion"
    config = EngineConfig(model=base.model, device=base.device, dtype=base.dtype, batching=batching,
                          max_model_len=base.max_model_len, quantization=base.quantization)
    return EngineSystem(name, loaded, config, policy)


# --- the registry --------------------------------------------------------------------------------

def build_system(name: str, loaded: LoadedModel, base: EngineConfig, policy: PolicyConfig,
                 hf_batch_size: int = 8):
    if name in ENGINE_SYSTEMS:
        return engine_system(name, loaded, base, policy)
    from .hf_systems import HFContinuousSystem, HFStaticSystem, SequentialSystem

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
