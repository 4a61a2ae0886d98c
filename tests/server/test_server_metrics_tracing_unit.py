"""Metrics registry and tracing switches (no model)."""

import subprocess
import sys
from types import SimpleNamespace

from baton_sidecar.server.abstats import Outcome
from baton_sidecar.server.metrics import Metrics
from baton_sidecar.server.tracing import (NULL_TRACE, Tracing, monotonic_to_ns, traces_endpoint,
                                          tracing_requested)
from server_helpers import metric_value


def fake_stats():
    return SimpleNamespace(running=3, waiting=2, swapped=1, batch_size=3, padding_ratio=0.25,
                           kv_tokens_used=100, kv_tokens_capacity=400, steps=9, preemptions_total=4,
                           kv_slots_total=900, kv_padding_slots_total=120,
                           refusals_by_reason={"queue_full": 2}, finished_by_reason={"stop": 5})


def test_each_app_has_its_own_registry_and_engine_gauges():
    engine = SimpleNamespace(stats=fake_stats)
    a, b = Metrics(lambda: engine), Metrics(lambda: None)  # two instances must not collide
    a.observe(Outcome("baton", True, ttft_s=0.1, e2e_s=0.5, completion_tokens=5), "length",
              queue_s=0.01, prompt_tokens=7, preemptions=1)
    a.observe(Outcome("incumbent", True, ttft_s=None, e2e_s=0.7), "stop")
    a.refusals.labels("baton", "queue_full").inc()
    text = a.render().decode()
    assert metric_value(text, "baton_engine_running_requests") == 3
    assert metric_value(text, "baton_engine_kv_usage_ratio") == 0.25
    assert metric_value(text, "baton_engine_preemptions_total") == 4
    assert metric_value(text, "baton_engine_kv_slots_total") == 900
    assert metric_value(text, "baton_engine_kv_padding_slots_total") == 120
    assert metric_value(text, "baton_engine_refusals_total", {"reason": "queue_full"}) == 2
    assert metric_value(text, "baton_engine_finished_total", {"reason": "stop"}) == 5
    assert metric_value(text, "baton_time_to_first_token_seconds_count", {"arm": "baton"}) == 1
    assert metric_value(text, "baton_time_to_first_token_seconds_count", {"arm": "incumbent"}) is None
    assert metric_value(text, "baton_e2e_request_latency_seconds_count", {"arm": "incumbent"}) == 1
    assert metric_value(text, "baton_time_per_output_token_seconds_sum",
                        {"arm": "baton"}) == (0.5 - 0.1) / 4
    assert metric_value(text, "baton_request_queue_time_seconds_count", {"arm": "baton"}) == 1
    assert metric_value(text, "baton_requests_total", {"arm": "baton", "finish_reason": "length"}) == 1
    assert metric_value(text, "baton_request_refusals_total",
                        {"arm": "baton", "reason": "queue_full"}) == 1
    assert metric_value(text, "baton_requests_running", {"arm": "incumbent"}) == 0
    assert metric_value(b.render().decode(), "baton_engine_running_requests") is None


def test_tracing_is_off_unless_asked():
    assert not tracing_requested({})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert tracing_requested({"OTEL_TRACES_EXPORTER": "console,otlp"})
    assert not tracing_requested({"OTEL_TRACES_EXPORTER": "none",
                                  "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert not tracing_requested({"OTEL_SDK_DISABLED": "true",
                                  "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    t = Tracing.from_env({})
    assert not t.enabled and t.start("chat", "m", {}, "baton") is NULL_TRACE


def test_traces_endpoint_resolution():
    assert traces_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == "http://c:4318/v1/traces"
    assert traces_endpoint({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x",
                            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}) == "http://t/x"
    assert traces_endpoint({}) == "http://localhost:4318/v1/traces"


def test_tracing_off_imports_no_sdk():
    code = ("import sys; from baton_sidecar.server.app import init_app; "
            "from baton_sidecar.server.tracing import Tracing; Tracing.from_env({}); "
            "assert not [m for m in sys.modules if m.startswith(('opentelemetry.sdk', "
            "'opentelemetry.exporter'))], 'SDK imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_monotonic_to_ns_is_epoch():
    import time
    assert abs(monotonic_to_ns(time.monotonic()) - time.time_ns()) < 50_000_000
