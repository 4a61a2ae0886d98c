"""Operator traces: one span per reconcile with identity and decision attributes; OTLP only when asked."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading

import kopf
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from baton_operator import tracing
from operator_testlib import OPERATOR_DIR


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_provider", provider)  # local to the test, not the global provider
    return exporter


def test_a_reconcile_span_carries_identity_action_and_outcome(spans) -> None:
    with tracing.span("reconcile", namespace="ns", resource_name="b1", generation=3, action="update",
                      mode="sidecar") as span:
        span.set_attribute("baton.changes", "created ConfigMap/b1-baton-config")
    (recorded,) = spans.get_finished_spans()
    assert recorded.name == "baton.reconcile"
    assert dict(recorded.attributes) == {
        "k8s.namespace.name": "ns", "baton.name": "b1", "baton.generation": 3, "baton.action": "update",
        "baton.mode": "sidecar", "baton.changes": "created ConfigMap/b1-baton-config", "baton.outcome": "ok"}


@pytest.mark.parametrize("error, outcome, failed", [
    (kopf.TemporaryError("wait", delay=1), "retry", False),
    (kopf.PermanentError("bad spec"), "permanent-error", True),
    (RuntimeError("bug"), "error", True),
])
def test_failures_are_classified_on_the_span(spans, error, outcome, failed) -> None:
    with pytest.raises(type(error)):
        with tracing.span("reconcile", namespace="ns", resource_name="b1", generation=None, action="create"):
            raise error
    (recorded,) = spans.get_finished_spans()
    assert recorded.attributes["baton.outcome"] == outcome
    assert (recorded.status.status_code == StatusCode.ERROR) == failed


def test_exporter_only_when_an_endpoint_is_configured() -> None:
    assert not tracing.exporter_configured({})
    assert tracing.exporter_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.exporter_configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"})
    assert tracing.setup({}) is (tracing._provider is not None)


def test_spans_reach_an_otlp_http_collector() -> None:
    """In a fresh process (the global tracer provider can be set once): setup() + one span + shutdown()
    POSTs protobuf to the loopback collector."""
    received: list[tuple[str, bytes]] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    code = ("from baton_operator import tracing\n"
            "assert tracing.setup()\n"
            "with tracing.span('reconcile', namespace='ns', resource_name='b1', generation=1, action='create'):\n"
            "    pass\n"
            "tracing.shutdown()\n")
    try:
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True, env={
            "PYTHONPATH": str(OPERATOR_DIR), "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
            "OTEL_SERVICE_NAME": "baton-operator-test", "PATH": ""})
    finally:
        server.shutdown()
    assert [path for path, _ in received] == ["/v1/traces"]
    body = received[0][1]
    assert b"baton.reconcile" in body and b"baton-operator-test" in body and b"b1" in body
