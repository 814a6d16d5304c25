"""Tracing (OpenTelemetry): a server span per RPC, following the gRPC semantic conventions, that
continues the trace of the calling service's span (from the client library, or from TRACEPARENT
for the CLI), with a child span per database transaction. Spans go to the SDK's in-memory
exporter, and, for `serve --otlp-endpoint`, over OTLP/gRPC to a collector's receiver."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from kara_sessions_client.cli import main as cli
from kara_sessions_client.client import KaraError, SessionsClient
from kara_sessions_server.adapters import tracing as storage_tracing
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start

from ..support.clock import FakeClock
from ..support.processes import start_server_process


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced(database_url: str, clock: FakeClock, spans: InMemorySpanExporter) -> Iterator[RunningServer]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    running = start(
        Settings(listen="127.0.0.1:0", database_url=database_url, max_workers=4),
        clock=clock,
        tracer_provider=provider,
    )
    yield running
    running.stop(grace=1)


def _server_span(spans: InMemorySpanExporter, method: str) -> ReadableSpan:
    found = [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER and s.name.endswith(method)]
    assert len(found) == 1, [s.name for s in spans.get_finished_spans()]
    return found[0]


def _children(spans: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.parent and s.parent.span_id == parent.context.span_id]


def test_an_rpc_continues_the_callers_trace_and_holds_its_transaction(
    traced: RunningServer, spans: InMemorySpanExporter, clock: FakeClock
) -> None:
    caller = TracerProvider()  # the calling service's own tracing, not the server's
    with (
        caller.get_tracer("workstation").start_as_current_span("cancel button") as parent,
        SessionsClient(f"127.0.0.1:{traced.port}") as kara,
    ):
        kara.grant_credits("client-1", 1)
        session = kara.book("client-1", "pro-1", clock.now() + timedelta(days=2))
        kara.cancel(session.session_id, "client")
        with pytest.raises(KaraError):
            kara.cancel("no-such-session", "client")
    traced.stop(grace=1)  # every span has ended

    grant = _server_span(spans, "/kara.sessions.v1.CreditService/GrantCredits")
    assert grant.context.trace_id == parent.get_span_context().trace_id
    assert grant.parent is not None and grant.parent.span_id == parent.get_span_context().span_id
    assert grant.attributes is not None
    assert grant.attributes["rpc.system"] == "grpc"
    assert grant.attributes["rpc.service"] == "kara.sessions.v1.CreditService"
    assert grant.attributes["rpc.method"] == "GrantCredits"
    assert grant.attributes["rpc.grpc.status_code"] == 0

    (transaction,) = _children(spans, grant)
    assert transaction.name.endswith(" transaction")
    assert transaction.attributes is not None
    assert transaction.attributes["db.system.name"] in ("sqlite", "postgresql")
    assert transaction.attributes["kara.transaction.write"] is True
    assert transaction.attributes["kara.transaction.outcome"] == "commit"
    assert grant.start_time is not None and transaction.start_time is not None
    assert grant.start_time <= transaction.start_time
    assert transaction.end_time is not None and grant.end_time is not None
    assert transaction.end_time <= grant.end_time

    cancels = [s for s in spans.get_finished_spans() if s.name.endswith("CancelSession")]
    refused = next(s for s in cancels if s.attributes and s.attributes["rpc.grpc.status_code"] != 0)
    assert refused.attributes is not None and refused.attributes["rpc.grpc.status_code"] == 5  # NOT_FOUND
    # The gRPC conventions: on a server span only the server's own failures (INTERNAL,
    # UNAVAILABLE, ...) are errors; NOT_FOUND is the caller's.
    assert refused.status.status_code is StatusCode.UNSET
    (lookup,) = _children(spans, refused)
    assert lookup.attributes is not None and lookup.attributes["kara.transaction.outcome"] == "rollback"


def test_the_cli_joins_the_trace_in_traceparent(traced: RunningServer, spans: InMemorySpanExporter) -> None:
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    done = CliRunner().invoke(
        cli,
        ["--target", f"127.0.0.1:{traced.port}", "credits", "grant", "client-2", "1"],
        env={"TRACEPARENT": f"00-{trace_id}-{span_id}-01"},
    )
    assert done.exit_code == 0, done.output
    traced.stop(grace=1)
    grant = _server_span(spans, "GrantCredits")
    assert f"{grant.context.trace_id:032x}" == trace_id
    assert grant.parent is not None and f"{grant.parent.span_id:016x}" == span_id


def test_bulk_cancel_rows_join_the_trace_in_traceparent(
    traced: RunningServer, spans: InMemorySpanExporter, clock: FakeClock
) -> None:
    with SessionsClient(f"127.0.0.1:{traced.port}") as kara:
        kara.grant_credits("client-4", 2)
        ids = [kara.book("client-4", "pro-1", clock.now() + timedelta(days=2)).session_id for _ in range(2)]
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    done = CliRunner().invoke(
        cli,
        ["--target", f"127.0.0.1:{traced.port}", "bulk-cancel", "-"],
        input="session_id,cancelled_by\n" + "".join(f"{i},client\n" for i in ids),
        env={"TRACEPARENT": f"00-{trace_id}-b7ad6b7169203331-01"},
    )
    assert done.exit_code == 0, done.output
    traced.stop(grace=1)
    cancels = [s for s in spans.get_finished_spans() if s.name.endswith("/CancelSession")]
    assert len(cancels) == 2
    assert {f"{s.context.trace_id:032x}" for s in cancels} == {trace_id}, "each row's call is in the trace"


def test_without_tracing_no_span_is_made(
    traced: RunningServer, spans: InMemorySpanExporter, database_url: str, clock: FakeClock
) -> None:
    traced.stop(grace=1)
    spans.clear()
    plain = start(Settings(listen="127.0.0.1:0", database_url=database_url, max_workers=4), clock=clock)
    try:
        assert storage_tracing._tracer is None, "transactions are not traced"
        with SessionsClient(f"127.0.0.1:{plain.port}") as kara:
            kara.grant_credits("client-3", 1)
    finally:
        plain.stop(grace=1)
    assert spans.get_finished_spans() == ()


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OpenTelemetry collector's OTLP/gRPC trace receiver, keeping what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_serve_exports_to_the_collector_at_otlp_endpoint(tmp_path: Path) -> None:
    collector = _Collector()
    receiver = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    try:
        proc, server_port = start_server_process(
            f"sqlite:///{tmp_path / 'k.db'}", "--otlp-endpoint", f"http://127.0.0.1:{port}"
        )
        try:
            with SessionsClient(f"127.0.0.1:{server_port}") as kara:
                kara.grant_credits("client-5", 1)
        finally:
            proc.terminate()  # the server flushes its batched spans as it stops
            assert proc.wait(timeout=30) == 0
    finally:
        receiver.stop(None)
    spans = {
        span.name: (resource.resource, span)
        for request in collector.requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    }
    resource, grant = spans["/kara.sessions.v1.CreditService/GrantCredits"]
    assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == "kara-sessions"
    transactions = [s for name, (_, s) in spans.items() if name.endswith(" transaction")]
    assert any(t.parent_span_id == grant.span_id for t in transactions)
