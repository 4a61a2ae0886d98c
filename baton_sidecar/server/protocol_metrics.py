"""The model-server protocol series: what the Gateway API Inference Extension's endpoint picker
(EPP; llm-d's router is the same picker) scrapes from each pod of an ``InferencePool`` to choose
one per request.

The picker reads five series. Its defaults are vLLM's names, so Baton exports those names and a
pool of Baton pods needs no metric settings::

    picker's reading   flag (older EPPs)                    engineConfigs key     series here
    queued requests    --total-queued-requests-metric       queuedRequestsSpec    vllm:num_requests_waiting
    running requests   --total-running-requests-metric      runningRequestsSpec   vllm:num_requests_running
    KV-cache fill 0..1 --kv-cache-usage-percentage-metric   kvUsageSpec           vllm:kv_cache_usage_perc
    LoRA adapters      --lora-info-metric                   loraSpec              vllm:lora_requests_info
    cache geometry     --cache-info-metric                  cacheInfoSpec         vllm:cache_config_info

Recent pickers take the metric names from ``engineConfigs`` in their EndpointPickerConfig and
refuse the flags. Their default mapping asks for all five, and a missing family fails every
scrape of the pod (the picker may then stop routing to it), so the last two are exported even
though Baton has neither LoRA adapters nor a block cache. Every value comes from the scrape's
one ``EngineStats`` snapshot, the same one the ``baton_engine_*`` series read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from baton_sidecar.engine.core import EngineStats

QUEUED = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"
LORA_INFO = "vllm:lora_requests_info"
CACHE_INFO = "vllm:cache_config_info"
SERIES = (QUEUED, RUNNING, KV_USAGE, LORA_INFO, CACHE_INFO)


def queued(s: EngineStats) -> int:
    # Swapped requests count as queued: like new and recompute-preempted ones (``waiting``) they hold
    # no row and must be admitted again before they make progress, which is what a picker weighing
    # this pod's backlog needs to see (vLLM v1 puts its preempted requests back in this count too).
    return s.waiting + s.swapped


def kv_usage(s: EngineStats) -> float:
    """Share of the KV-slot budget in use, padding included, capped at 1: a live policy change can
    shrink the budget below what running rows already hold, and the picker scores on 0..1."""
    return min(1.0, s.kv_tokens_used / s.kv_tokens_capacity) if s.kv_tokens_capacity else 0.0


def protocol_families(s: EngineStats, model_name: str | None, now: float) -> Iterator[Metric]:
    """The five series for one snapshot; ``model_name`` labels the request gauges as vLLM does
    (None: unlabelled); ``now`` (epoch seconds) is the LoRA info's value, its last-update time."""
    labels = {"model_name": model_name} if model_name is not None else {}
    for name, doc, value in (
            (QUEUED, "Requests waiting for admission (new, preempted and swapped)", queued(s)),
            (RUNNING, "Requests in the running batch (chunked prefills included)", s.running),
            (KV_USAGE, "Share of the KV-slot budget in use, padding included (0..1)", kv_usage(s))):
        family = GaugeMetricFamily(name, doc, labels=list(labels))
        family.add_metric(list(labels.values()), float(value))
        yield family
    # Baton serves no LoRA adapters: none running or waiting, and room for none.
    lora = GaugeMetricFamily(LORA_INFO, "LoRA adapters: none (Baton serves the base model only)",
                             labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
    lora.add_metric(["0", "", ""], now)
    yield lora
    # No block_size/num_gpu_blocks labels: Baton's cache is rows of single-token slots, not blocks,
    # and the picker would size its prefix index from them; absent labels leave its defaults alone.
    yield GaugeMetricFamily(CACHE_INFO, "KV-cache geometry: none (Baton's cache has no blocks)",
                            value=1.0)
