"""Prometheus metrics, one ``CollectorRegistry`` per app (so tests and several apps never collide).

Request-level series are labelled by ``arm`` (baton | incumbent). Engine gauges and counters are read
from ``engine.stats()`` at scrape time by a custom collector, so the engine keeps no Prometheus
state of its own and a scrape always sees one consistent snapshot.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from baton_sidecar.server.abstats import Outcome
from baton_sidecar.server.protocol_metrics import protocol_families

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets from a fast GPU token (ms) up to a long CPU generation (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
                   160.0, 320.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class EngineCollector(Collector):
    """Engine gauges/counters from ``engine.stats()``, and the endpoint picker's model-server
    protocol series from the same snapshot (``protocol_metrics``); nothing while no engine is attached."""

    def __init__(self, get_engine: Callable[[], object | None], model_name: str | None = None) -> None:
        self._get_engine = get_engine
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        engine = self._get_engine()
        if engine is None:
            return
        s = engine.stats()
        gauges = {
            "baton_engine_running_requests": ("Requests in the running batch", s.running),
            "baton_engine_waiting_requests": ("Requests waiting for admission", s.waiting),
            "baton_engine_swapped_requests": ("Preempted requests holding swapped K/V", s.swapped),
            "baton_engine_batch_size": ("Rows in the running batch", s.batch_size),
            "baton_engine_padding_ratio": ("Masked / all KV slots in the running batch",
                                           s.padding_ratio),
            "baton_engine_kv_tokens_used": ("KV slots in use, padding included", s.kv_tokens_used),
            "baton_engine_kv_tokens_capacity": ("KV slot budget", s.kv_tokens_capacity),
            "baton_engine_kv_usage_ratio": (
                "KV slots used / budget",
                s.kv_tokens_used / s.kv_tokens_capacity if s.kv_tokens_capacity else 0.0),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=float(value))
        yield CounterMetricFamily("baton_engine_steps", "Engine steps", value=s.steps)
        yield CounterMetricFamily("baton_engine_preemptions", "Preemptions (swap or recompute)",
                                  value=s.preemptions_total)
        yield CounterMetricFamily("baton_engine_kv_slots", "KV slots of the live window, summed over decode steps",
                                  value=s.kv_slots_total)
        yield CounterMetricFamily("baton_engine_kv_padding_slots",
                                  "Masked KV slots of the live window, summed over decode steps "
                                  "(rate / rate of baton_engine_kv_slots = padding ratio)",
                                  value=s.kv_padding_slots_total)
        refusals = CounterMetricFamily("baton_engine_refusals", "Admissions refused by the engine",
                                       labels=["reason"])
        for reason, n in sorted(s.refusals_by_reason.items()):
            refusals.add_metric([reason], n)
        yield refusals
        finished = CounterMetricFamily("baton_engine_finished", "Requests finished by the engine",
                                       labels=["reason"])
        for reason, n in sorted(s.finished_by_reason.items()):
            finished.add_metric([reason], n)
        yield finished
        yield from protocol_families(s, self._model_name, time.time())


class Metrics:
    def __init__(self, get_engine: Callable[[], object | None], model_name: str | None = None) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        arm = ["arm"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, arm, buckets=buckets, registry=r)

        self.ttft = histogram("baton_time_to_first_token_seconds", "Request arrival to first token")
        self.tpot = histogram("baton_time_per_output_token_seconds",
                              "Mean time between output tokens after the first", TPOT_BUCKETS)
        self.e2e = histogram("baton_e2e_request_latency_seconds", "Request arrival to last byte")
        self.queue = histogram("baton_request_queue_time_seconds",
                               "Time waiting before first scheduled (engine arm only)")
        self.in_flight = Gauge("baton_requests_running", "Requests being served by the sidecar",
                               arm, registry=r)
        self.requests = Counter("baton_requests", "Finished requests by finish reason",
                                ["arm", "finish_reason"], registry=r)
        self.refusals = Counter("baton_request_refusals",
                                "Requests refused (queue_full, too_large, shutting_down, "
                                "not_ready, invalid, ...)", ["arm", "reason"], registry=r)
        self.preemptions = Counter("baton_request_preemptions",
                                   "Preemptions suffered by finished requests", arm, registry=r)
        self.tokens = Counter("baton_tokens", "Tokens processed", ["arm", "kind"], registry=r)
        self.incumbent_failures = Counter("baton_incumbent_failures",
                                          "Incumbent connection errors, timeouts and 5xx",
                                          ["kind"], registry=r)
        self.fallbacks = Counter("baton_router_fallbacks",
                                 "Requests re-served on Baton after an incumbent failure",
                                 registry=r)
        self.eligible = Counter("baton_router_eligible",
                                "Generation requests both arms can serve (they take part in the A/B split)",
                                registry=r)
        self.ineligible = Counter("baton_router_ineligible",
                                  "Requests passed to the incumbent because Baton cannot serve them, by "
                                  "reason (unsupported:<field>, invalid:<field>, other_model, other_route, ...)",
                                  ["reason"], registry=r)
        self.http_rejections = Counter("baton_http_rejections",
                                       "Connections closed or answered before reaching a handler "
                                       "(header_timeout, body_timeout, bad_http)", ["reason"], registry=r)
        self.baton_weight = Gauge("baton_router_baton_weight",
                                  "Percent of traffic routed to Baton", registry=r)
        self.config_reloads = Counter("baton_config_reloads", "Configuration changes applied",
                                      ["source"], registry=r)
        self.config_reload_errors = Counter("baton_config_reload_errors",
                                            "Configuration changes refused", ["source"],
                                            registry=r)
        for a in ("baton", "incumbent"):  # expose zeros before the first request
            self.in_flight.labels(a)
        r.register(EngineCollector(get_engine, model_name))  # model_name: the protocol series' label

    def observe(self, outcome: Outcome, finish_reason: str, queue_s: float | None = None,
                prompt_tokens: int | None = None, preemptions: int = 0) -> None:
        arm = outcome.arm
        self.requests.labels(arm, finish_reason).inc()
        if outcome.ttft_s is not None:
            self.ttft.labels(arm).observe(outcome.ttft_s)
        if outcome.tpot_s is not None:
            self.tpot.labels(arm).observe(outcome.tpot_s)
        if outcome.e2e_s is not None:
            self.e2e.labels(arm).observe(outcome.e2e_s)
        if queue_s is not None:
            self.queue.labels(arm).observe(queue_s)
        if prompt_tokens:
            self.tokens.labels(arm, "prompt").inc(prompt_tokens)
        if outcome.completion_tokens:
            self.tokens.labels(arm, "completion").inc(outcome.completion_tokens)
        if preemptions:
            self.preemptions.labels(arm).inc(preemptions)

    def render(self) -> bytes:
        return generate_latest(self.registry)
