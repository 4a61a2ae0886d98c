"""The transformers baselines: static batching, one request at a time, continuous batching.

- ``hf_static``  transformers ``generate`` on batches of ``hf_batch_size`` (default 8)
                 arrived requests, left-padded, run to the longest request of the batch.
- ``sequential`` transformers ``generate`` one request at a time.
- ``hf_cb``      transformers continuous batching (``init_continuous_batching``) with
                 per-request ``max_new_tokens``.

Same contract as ``systems.py``: ``run(workload, progress) -> SystemRun``.
"""

from __future__ import annotations

import threading
import time

import torch

from .. import row_attention
from ..model import LoadedModel
from .systems import Progress, SystemRun, Timed, new_records
from .workloads import BenchRequest, Workload


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
        run = SystemRun(self.name, new_records(workload), info={"batch_size": self.batch_size})
        self._generate(workload.requests[:1] if workload.requests else [])  # warm-up, not measured
        records = {r.index: rec for r, rec in zip(workload.requests, run.records)}
        pending = sorted(workload.requests, key=lambda r: (r.arrival_s, r.index))
        with Timed(run):
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
        run = SystemRun(self.name, new_records(workload), info={
            "page_size": self.page_size, "num_blocks": num_blocks,
            "max_requests_per_batch": self.max_batch_size, "max_batch_tokens": self.max_batch_tokens})
        model = self.loaded.model
        max_new = max((r.max_tokens for r in workload.requests), default=1)
        cb_config = ContinuousBatchingConfig(
            page_size=self.page_size, num_blocks=num_blocks, max_batch_tokens=self.max_batch_tokens,
            max_requests_per_batch=self.max_batch_size, allow_block_sharing=False)
        generation_config = _greedy_config(self.loaded, max_new)
        generation_config.min_new_tokens = None
        with row_attention.plain_attention(model):  # it accepts only transformers' own attention
            return self._serve(model, workload, run, generation_config, cb_config, progress)

    def _serve(self, model, workload: Workload, run: SystemRun, generation_config, cb_config,
               progress: Progress) -> SystemRun:
        manager = model.init_continuous_batching(generation_config=generation_config,
                                                 continuous_batching_config=cb_config)
        manager.start()
        try:
            self._warm_up(manager, workload)
            records = {f"bench-{r.index}": rec for r, rec in zip(workload.requests, run.records)}
            with Timed(run):
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
