"""OpenTelemetry tracing: one span per request, GenAI semantic conventions, OTLP/HTTP export.

Off unless the standard variables ask for it (``OTEL_TRACES_EXPORTER=otlp`` or an
``OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT``); ``OTEL_SDK_DISABLED=true`` or
``OTEL_TRACES_EXPORTER=none`` turn it off. When off, ``Tracing.start`` returns ``NULL_TRACE`` whose
methods do nothing, so a request pays one attribute lookup and no allocation for tracing. The
exporter, batch processor, sampler and resource read their own ``OTEL_*`` settings (headers,
timeout, compression, ``OTEL_BSP_*``, ``OTEL_TRACES_SAMPLER``, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``).

Span layout: a SERVER span ``"{gen_ai.operation.name} {gen_ai.request.model}"`` per request,
parented on the caller's W3C ``traceparent``; requests routed to the incumbent get a CLIENT child
span ``router.incumbent`` whose context travels on to the incumbent as ``traceparent``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping, MutableMapping

if TYPE_CHECKING:
    from baton_sidecar.engine.request import SamplingParams

log = logging.getLogger(__name__)

# Engine event names -> span event names.
ENGINE_EVENTS = {"queued": "queued", "prefilled": "prefill_done", "first_token": "first_token",
                 "preempted": "preempted", "resumed": "resumed"}


def tracing_requested(environ: Mapping[str, str]) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER")
    if exporters is not None:
        names = {e.strip().lower() for e in exporters.split(",")}
        return "otlp" in names
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def traces_endpoint(environ: Mapping[str, str]) -> str:
    """The OTLP/HTTP traces URL, resolved as the OTLP exporter specification says."""
    explicit = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if explicit:
        return explicit
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318")
    return base.rstrip("/") + "/v1/traces"


def monotonic_to_ns(t: float) -> int:
    """A ``time.monotonic()`` stamp as Unix-epoch nanoseconds (what span events carry)."""
    return time.time_ns() - int((time.monotonic() - t) * 1e9)


class NullTrace:
    """Tracing off: every call is a no-op."""

    enabled = False

    def set(self, key: str, value: Any) -> None:
        pass

    def set_request(self, *args: Any, **kwargs: Any) -> None:
        pass

    def engine_events(self, events: Iterable[tuple[str, float]]) -> None:
        pass

    def finish(self, *args: Any, **kwargs: Any) -> None:
        pass

    def incumbent_span(self, *args: Any, **kwargs: Any) -> "NullTrace":
        return self

    def inject(self, headers: MutableMapping[str, str]) -> None:
        pass

    def end(self, status_code: int | None = None, error_type: str | None = None) -> None:
        pass


NULL_TRACE = NullTrace()


class RequestTrace(NullTrace):
    enabled = True

    def __init__(self, span: Any, tracer: Any, propagator: Any) -> None:
        self._span = span
        self._tracer = tracer
        self._propagator = propagator
        self._seen_events: set[tuple[str, float]] = set()
        self._ended = False

    def set(self, key: str, value: Any) -> None:
        if value is not None:
            self._span.set_attribute(key, value)

    def set_request(self, params: SamplingParams, priority: int | None, sla_class: str | None,
                    stream: bool) -> None:
        """Max tokens (None: the rest of the context) and sampling, as the engine will use them."""
        self.set("gen_ai.request.max_tokens", params.max_tokens)
        for key in ("temperature", "top_p", "top_k", "seed"):
            self.set(f"gen_ai.request.{key}", getattr(params, key))
        if params.stop:
            self.set("gen_ai.request.stop_sequences", list(params.stop))
        self.set("baton.request.priority", priority)
        self.set("baton.request.sla_class", sla_class)
        self.set("baton.request.stream", stream)

    def engine_events(self, events: Iterable[tuple[str, float]]) -> None:
        for name, t in events:
            if name in ENGINE_EVENTS and (name, t) not in self._seen_events:
                self._seen_events.add((name, t))
                self._span.add_event(ENGINE_EVENTS[name], timestamp=monotonic_to_ns(t))

    def finish(self, *, response_id: str | None = None, response_model: str | None = None,
               input_tokens: int | None = None, output_tokens: int | None = None,
               finish_reason: str | None = None) -> None:
        self.set("gen_ai.response.id", response_id)
        self.set("gen_ai.response.model", response_model)
        self.set("gen_ai.usage.input_tokens", input_tokens)
        self.set("gen_ai.usage.output_tokens", output_tokens)
        if finish_reason:
            self.set("gen_ai.response.finish_reasons", [finish_reason])

    def incumbent_span(self, url: str, arm: str = "incumbent") -> "RequestTrace":
        from opentelemetry import trace
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if "@" in parts.netloc:  # credentials are redacted, as the HTTP semantic conventions ask
            url = parts._replace(netloc="REDACTED:REDACTED@" + parts.netloc.rpartition("@")[2]).geturl()
        ctx = trace.set_span_in_context(self._span)
        span = self._tracer.start_span(
            "router.incumbent", context=ctx, kind=trace.SpanKind.CLIENT,
            attributes={"baton.router.arm": arm, "http.request.method": "POST", "url.full": url,
                        "server.address": parts.hostname or "",
                        "server.port": parts.port or (443 if parts.scheme == "https" else 80)})
        return RequestTrace(span, self._tracer, self._propagator)

    def inject(self, headers: MutableMapping[str, str]) -> None:
        from opentelemetry import trace

        self._propagator.inject(headers, context=trace.set_span_in_context(self._span))

    def end(self, status_code: int | None = None, error_type: str | None = None) -> None:
        from opentelemetry.trace import Status, StatusCode

        if self._ended:  # idempotent: cleanup paths may end a span that already ended
            return
        self._ended = True
        self.set("http.response.status_code", status_code)
        if error_type:
            self.set("error.type", error_type)
            self._span.set_status(Status(StatusCode.ERROR, error_type))
        self._span.end()


class Tracing:
    """Per-app tracer provider (not the global one), shut down with the app."""

    def __init__(self, provider: Any | None = None) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("baton_sidecar.server") if provider else None
        if provider is not None:
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
            self._propagator = TraceContextTextMapPropagator()

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 service_name: str = "baton-sidecar") -> "Tracing":
        environ = os.environ if environ is None else environ
        if not tracing_requested(environ):
            return cls(None)
        # Imported only when tracing is on: the SDK and exporter cost nothing otherwise.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                               environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"))
        if protocol != "http/protobuf":
            log.warning("OTLP protocol %r is not supported; exporting with http/protobuf", protocol)
        attrs = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
        provider = TracerProvider(resource=Resource.create(attrs), shutdown_on_exit=False)
        endpoint = traces_endpoint(environ)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        log.info("OpenTelemetry tracing on: OTLP/HTTP to %s", endpoint)
        return cls(provider)

    def start(self, operation: str, model: str, headers: Mapping[str, str], arm: str,
              provider_name: str = "baton") -> NullTrace:
        if self._tracer is None:
            return NULL_TRACE
        from opentelemetry import trace

        parent = self._propagator.extract(headers)
        span = self._tracer.start_span(
            f"{operation} {model}", context=parent, kind=trace.SpanKind.SERVER,
            attributes={"gen_ai.operation.name": operation, "gen_ai.request.model": model,
                        "gen_ai.provider.name": provider_name, "baton.router.arm": arm})
        return RequestTrace(span, self._tracer, self._propagator)

    def force_flush(self, timeout_ms: int = 5000) -> bool:
        return self._provider.force_flush(timeout_ms) if self._provider else True

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()
