"""Issue 35: one queue in front of the workers. Unary calls run on exactly `max_workers`
threads and wait in that pool's queue; streams have threads of their own, so an open stream
never takes a unary call's thread and a busy unary pool never keeps a stream from starting."""

from __future__ import annotations

import contextvars
import sqlite3
import threading
import time
from concurrent import futures
from datetime import timedelta
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kara.sessions.v1 import events_pb2 as epb
from kara.sessions.v1 import events_pb2_grpc
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import SessionsClient
from kara_sessions_server.entrypoints.grpc import workers
from kara_sessions_server.entrypoints.grpc.server import start
from kara_sessions_server.entrypoints.settings import Settings

from ..support.clock import FakeClock


def test_grpcio_still_hands_a_streaming_handler_to_the_function_the_router_knows() -> None:
    """If a grpcio upgrade renames it, streams would share the unary threads: this says so."""
    from grpc import _server

    assert workers._STREAM_RUNNER is _server._stream_response_in_pool
    pool = workers.Workers(1, 1)
    try:
        context = contextvars.copy_context()
        assert pool.is_stream(context.run, (_server._stream_response_in_pool,))
        assert not pool.is_stream(context.run, (_server._unary_response_in_pool,))
        assert not pool.is_stream(print, ())
    finally:
        pool.shutdown()


def _rpc_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("rpc_")]


def test_unary_calls_run_on_exactly_max_workers_threads(tmp_path: Path, clock: FakeClock) -> None:
    running = start(
        Settings(
            listen="127.0.0.1:0",
            database_url=f"sqlite:///{tmp_path / 'k.db'}",
            max_workers=2,
            max_event_streams=4,
            metrics_port=None,
        ),
        clock=clock,
    )
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            kara.grant_credits("cl-1", 1)
            session_id = kara.book("cl-1", "pro-1", clock.now() + timedelta(days=2)).session_id
            with futures.ThreadPoolExecutor(16) as burst:
                answers = list(burst.map(lambda _: kara.get_session(session_id).session_id, range(48)))
        assert answers == [session_id] * 48
        # Before: one pool of max_workers + max_event_streams threads, the extra ones parked at
        # the interceptor's gate.
        assert len(_rpc_threads()) == 2, _rpc_threads()
    finally:
        running.stop(grace=1)


def test_a_stream_starts_while_every_unary_worker_is_busy(tmp_path: Path, clock: FakeClock) -> None:
    """One unary worker, held by a cancellation waiting for SQLite's lock; one event stream
    open. Health's Watch (a stream too) must still be answered at once."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    running = start(
        Settings(
            listen="127.0.0.1:0", database_url=url, max_workers=1, max_event_streams=1, metrics_port=None
        ),
        clock=clock,
    )
    lock = None
    try:
        with SessionsClient(f"127.0.0.1:{running.port}", timeout=30) as kara:
            kara.grant_credits("cl-1", 1)
            session_id = kara.book("cl-1", "pro-1", clock.now() + timedelta(days=2)).session_id
            channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
            events = events_pb2_grpc.EventServiceStub(channel).StreamEvents(
                epb.StreamEventsRequest(), timeout=30
            )
            assert next(events).type  # the stream is open and holds a stream thread
            lock = sqlite3.connect(tmp_path / "k.db", isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")
            slow = threading.Thread(target=lambda: kara.cancel(session_id, "client"))
            slow.start()
            time.sleep(0.5)  # the cancellation now holds the only unary worker
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            events.cancel()
            lock.execute("ROLLBACK")
            lock.close()
            lock = None
            slow.join(timeout=30)
            assert kara.get_session(session_id).state == pb.SESSION_STATE_CANCELLED_VOIDED
            channel.close()
    finally:
        if lock is not None:
            lock.execute("ROLLBACK")
        running.stop(grace=1)
