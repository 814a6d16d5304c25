"""Carries the caller's OpenTelemetry trace to the server.

When the calling program traces (opentelemetry-api installed and a span current), each call
sends the span's context as W3C `traceparent`/`tracestate` metadata through the globally
configured propagator, and the server's span for the call becomes its child. The client does not
depend on OpenTelemetry: without it, or with no span current, nothing is added."""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType

propagate: ModuleType | None
try:
    from opentelemetry import context, propagate, trace
except ImportError:  # the light client install
    propagate = None

Metadata = Sequence[tuple[str, str]]


def with_trace(metadata: Metadata) -> Metadata:
    """`metadata` plus the current trace context, if there is one to carry."""
    if propagate is None or not trace.get_current_span().get_span_context().is_valid:
        return metadata
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return (*metadata, *carrier.items())


def continue_from_environment() -> None:
    """Makes the trace in TRACEPARENT (and TRACESTATE) current, as a shell script that traces
    passes it to the commands it runs; the CLI's calls then join that trace."""
    parent = os.environ.get("TRACEPARENT")
    if propagate is None or not parent:
        return
    carrier = {"traceparent": parent}
    if state := os.environ.get("TRACESTATE"):
        carrier["tracestate"] = state
    context.attach(propagate.extract(carrier))
