"""A span for each database transaction, child of the RPC's span, when tracing is on
(entrypoints/tracing.py turns it on). Off, a transaction pays one global read."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

_tracer: trace.Tracer | None = None


def use(provider: trace.TracerProvider | None) -> None:
    """Trace transactions with `provider`; None turns it off."""
    global _tracer  # noqa: PLW0603 (one switch for the whole process, read on every transaction)
    _tracer = provider.get_tracer("kara_sessions_server.storage") if provider is not None else None


def transaction_started(system: str, database: str, write: bool) -> Any:
    """A started span for a transaction (None when tracing is off); end it with `ended`.
    Its parent is whatever span is current: the RPC's, on a server thread."""
    if _tracer is None:
        return None
    return _tracer.start_span(
        f"{system} transaction",
        kind=SpanKind.CLIENT,
        attributes={
            "db.system.name": system,
            "db.namespace": database,
            "kara.transaction.write": write,
        },
    )


def ended(span: Any, error: BaseException | None = None, committed: bool = False) -> None:
    if span is None:
        return
    span.set_attribute("kara.transaction.outcome", "commit" if committed else "rollback")
    if error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    span.end()
