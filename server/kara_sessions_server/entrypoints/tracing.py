"""OpenTelemetry tracing for the server, off unless asked for.

On with `serve --otlp-endpoint URL` or the standard OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT
variable (the exporter reads the other OTEL_EXPORTER_OTLP_* settings itself; OTEL_SERVICE_NAME
and OTEL_RESOURCE_ATTRIBUTES name the service; OTEL_SDK_DISABLED=true keeps it off). Then every
RPC gets a server span (opentelemetry-instrumentation-grpc: the gRPC semantic conventions), which
continues the trace whose W3C `traceparent` arrives in the call's metadata, and every database
transaction a child span (adapters/tracing.py). Off, nothing of OpenTelemetry runs per call."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from kara_sessions_server.adapters import tracing as storage_tracing

SERVICE_NAME = "kara-sessions"
# At shutdown, how long the spans still batched may take to reach the collector.
FLUSH_SECONDS = 0.5

log = logging.getLogger("kara_sessions_server")


def wanted(otlp_endpoint: str | None) -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(
        otlp_endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def exporting_provider(otlp_endpoint: str | None) -> TracerProvider:
    """A provider that batches spans to an OTLP/gRPC collector."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    # The environment's service name wins over ours (Resource.create reads OTEL_* itself).
    named = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(named))
    exporter = OTLPSpanExporter(endpoint=otlp_endpoint) if otlp_endpoint else OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def shut_down(provider: TracerProvider) -> None:
    """Exports what is batched, waiting at most FLUSH_SECONDS: a collector that does not answer
    (the exporter retries for up to 10 s) must not hold up the server's exit."""
    flush = threading.Thread(target=provider.shutdown, name="trace-flush", daemon=True)
    flush.start()
    flush.join(FLUSH_SECONDS)
    if flush.is_alive():
        log.warning("the trace collector did not take the last spans within %.1f s: dropped", FLUSH_SECONDS)


def trace_transactions(provider: TracerProvider | None) -> None:
    """Database transactions get spans from `provider` (None: no spans), process-wide."""
    storage_tracing.use(provider)


def server_interceptors(provider: TracerProvider | None) -> list[Any]:
    """The interceptor that makes each RPC's span (first, so that it wraps everything else);
    nothing without a provider."""
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import server_interceptor

    return [server_interceptor(tracer_provider=provider)]  # type: ignore[no-untyped-call]
