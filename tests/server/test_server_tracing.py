"""OpenTelemetry export over OTLP/HTTP to a local receiver that decodes the protobuf."""

import time

import pytest
import requests

from baton_sidecar.config import RouterConfig
from baton_sidecar.server.app import TRACING
from baton_sidecar.server.tracing import Tracing
from server_helpers import MODEL_NAME

SERVER, CLIENT = 2, 3  # opentelemetry.proto Span.SpanKind values
STATUS_ERROR = 2
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def traced(make_server, otlp_receiver):
    """A sidecar exporting to the receiver, and a flush helper."""
    def make(**kwargs):
        tracing = Tracing.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.url},
                                   service_name="baton-test-sidecar")
        url, app = make_server(tracing=tracing, **kwargs)
        return url, lambda: app[TRACING].force_flush(10_000)
    return make


def by_trace(spans, trace_id):
    return [s for s in spans if s["trace_id"] == trace_id]


@pytest.mark.model
def test_request_spans_follow_genai_conventions(traced, otlp_receiver):
    url, flush = traced()
    resp = requests.post(url + "/v1/completions", timeout=120, headers={"traceparent": TRACEPARENT},
                         json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2,
                               "temperature": 0})
    assert resp.status_code == 200
    chat = requests.post(url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
        "stream": True, "sla_class": "interactive"})
    assert chat.status_code == 200 and chat.text.endswith("data: [DONE]\n\n")
    bad = requests.post(url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "sla_class": "nope"})
    assert bad.status_code == 400
    assert flush()

    [span] = otlp_receiver.wait_for(lambda s: s["trace_id"] == TRACE_ID)
    assert span["name"] == f"text_completion {MODEL_NAME}" and span["kind"] == SERVER
    assert span["parent_span_id"] == PARENT_ID  # continues the caller's W3C trace
    a = span["attributes"]
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.request.model"] == MODEL_NAME and a["gen_ai.response.model"] == MODEL_NAME
    assert a["gen_ai.request.max_tokens"] == 2 and a["gen_ai.request.temperature"] == 0
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] == 2
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["gen_ai.response.id"] == resp.json()["id"] and a["baton.router.arm"] == "baton"
    assert a["http.response.status_code"] == 200 and "error.type" not in a
    events = span["events"]
    for name in ("queued", "prefill_done", "first_token"):
        assert name in events
    assert events.index("queued") < events.index("prefill_done") <= events.index("first_token")
    assert span["event_times"] == sorted(span["event_times"])
    assert span["start"] <= span["event_times"][0] and span["event_times"][-1] <= span["end"]
    assert span["resource"]["service.name"] == "baton-test-sidecar"

    chats = otlp_receiver.wait_for(lambda s: s["name"] == f"chat {MODEL_NAME}", count=2)
    ok = [s for s in chats if s["attributes"].get("baton.request.sla_class") == "interactive"]
    assert ok and ok[0]["attributes"]["baton.request.stream"] is True
    assert ok[0]["attributes"]["gen_ai.usage.output_tokens"] == 2
    failed = [s for s in chats if s["attributes"].get("baton.request.sla_class") == "nope"]
    assert failed and failed[0]["status"] == STATUS_ERROR
    assert failed[0]["attributes"]["error.type"] and \
        failed[0]["attributes"]["http.response.status_code"] == 400


@pytest.mark.model
def test_trace_context_crosses_into_the_real_incumbent(traced, otlp_receiver, incumbent):
    url, flush = traced(router=RouterConfig(incumbent_url=incumbent.url, baton_weight=0))
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4737"
    resp = requests.post(url + "/v1/chat/completions", timeout=120,
                         headers={"traceparent": f"00-{trace_id}-{PARENT_ID}-01"},
                         json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}],
                               "max_tokens": 2, "stream": True})
    assert resp.status_code == 200 and resp.headers["x-baton-arm"] == "incumbent"
    assert flush()
    spans = otlp_receiver.wait_for(lambda s: s["trace_id"] == trace_id, count=3)
    names = {s["name"]: s for s in spans}
    assert len(spans) == 3, [s["name"] for s in spans]
    router = names["router.incumbent"]
    [ours] = [s for s in spans if s["resource"].get("service.name") == "baton-test-sidecar"
              and s["kind"] == SERVER]
    [theirs] = [s for s in spans if s["resource"].get("service.name") == "incumbent"]
    assert ours["attributes"]["baton.router.arm"] == "incumbent" and ours["parent_span_id"] == PARENT_ID
    assert router["kind"] == CLIENT and router["parent_span_id"] == ours["span_id"]
    assert router["attributes"]["baton.router.arm"] == "incumbent"
    assert router["attributes"]["http.response.status_code"] == 200
    # The incumbent (configured only by OTEL_* variables) continued the trace under our router span.
    assert theirs["parent_span_id"] == router["span_id"] and theirs["kind"] == SERVER
    assert theirs["attributes"]["gen_ai.operation.name"] == "chat"


def test_engine_events_map_to_span_events():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace = Tracing(provider).start("chat", "m", {}, "baton")
    now = time.monotonic()
    trace.engine_events([("queued", now), ("scheduled", now), ("prefilled", now + 0.01),
                         ("first_token", now + 0.02), ("preempted", now + 0.03)])
    trace.engine_events([("resumed", now + 0.04), ("finished", now + 0.05)])
    trace.end(200)
    [span] = exporter.get_finished_spans()
    assert [e.name for e in span.events] == ["queued", "prefill_done", "first_token", "preempted",
                                             "resumed"]


def test_incumbent_spans_redact_credentials_in_the_url():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace = Tracing(provider).start("chat", "m", {}, "incumbent")
    trace.incumbent_span("http://user:s3cret@incumbent:8000/v1/chat/completions").end(200)
    trace.end(200)
    child = next(s for s in exporter.get_finished_spans() if s.name == "router.incumbent")
    assert child.attributes["url.full"] == "http://REDACTED:REDACTED@incumbent:8000/v1/chat/completions"
    assert (child.attributes["server.address"], child.attributes["server.port"]) == ("incumbent", 8000)
