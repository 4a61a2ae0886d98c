"""OpenTelemetry spans for the operator: one per reconcile or decision.

Spans are always created (cheap no-ops without a provider). An exporter is installed only when
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set; it speaks OTLP/HTTP
and reads the rest of the standard ``OTEL_*`` variables (headers, sampler, service name) itself.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

TRACER_NAME = "baton_operator"
_provider: Any = None


def exporter_configured(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup(env: Mapping[str, str] | None = None) -> bool:
    """Install an OTLP/HTTP batch exporter if configured; returns whether one was installed."""
    global _provider
    if _provider is not None or not exporter_configured(env):
        return _provider is not None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    env = os.environ if env is None else env
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "baton-operator")})
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(_provider)
    return True


def shutdown() -> None:
    """Flush pending spans (called on operator shutdown)."""
    if _provider is not None:
        _provider.shutdown()


@contextlib.contextmanager
def span(name: str, *, namespace: str | None, resource_name: str | None, generation: int | None,
         action: str, **attributes: Any) -> Iterator[Any]:
    """A span named ``baton.<name>`` carrying the object's identity and what was decided.

    kopf's retry exceptions are not failures of the operator: they mark the span with a
    ``baton.outcome`` attribute, while anything else sets the span status to ERROR.
    """
    tracer = trace.get_tracer(TRACER_NAME, tracer_provider=_provider)  # None: the global one
    attrs = {"k8s.namespace.name": namespace or "", "baton.name": resource_name or "",
             "baton.generation": generation if generation is not None else -1, "baton.action": action}
    attrs.update({f"baton.{k}": v for k, v in attributes.items() if v is not None})
    with tracer.start_as_current_span(f"baton.{name}", attributes=attrs, record_exception=False,
                                      set_status_on_exception=False) as current:
        try:
            yield current
        except Exception as exc:
            import kopf

            if isinstance(exc, kopf.TemporaryError):
                current.set_attribute("baton.outcome", "retry")
            elif isinstance(exc, kopf.PermanentError):
                current.set_attribute("baton.outcome", "permanent-error")
                current.set_status(Status(StatusCode.ERROR, str(exc)))
            else:
                current.set_attribute("baton.outcome", "error")
                current.record_exception(exc)
                current.set_status(Status(StatusCode.ERROR, str(exc)))
            raise
        else:
            current.set_attribute("baton.outcome", "ok")
