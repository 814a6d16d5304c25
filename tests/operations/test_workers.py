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
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kara.sessions.v1 import events_pb2 as epb
from kara.sessions.v1 import events_pb2_grpc, sessions_pb2_grpc
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import SessionsClient
from kara_sessions_server.entrypoints.grpc import workers
from kara_sessions_server.entrypoints.grpc.server import RunningServer, start
from kara_sessions_server.entrypoints.settings import Settings

from ..conftest import ALL_DATABASES, open_database
from ..support.clock import FakeClock
from ..support.database import POSTGRES_URL


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


def _unary_threads(running: RunningServer) -> list[str]:
    """This server's unary workers (its stream threads are named rpc-stream_N)."""
    return [t.name for t in running.executor.threads() if t.name.startswith("rpc_")]


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
        assert len(_unary_threads(running)) == 2, _unary_threads(running)
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


@pytest.fixture(params=ALL_DATABASES)
def any_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return open_database(request, tmp_path)


def test_a_unary_worker_keeps_its_connection_and_drops_it_after_a_database_error(
    any_database: str, clock: FakeClock
) -> None:
    """Issue 35: a unary worker keeps its connection between transactions (no hand-back to the
    pool and checkout around each). A connection the database dropped is not kept: the call
    that meets it fails as UNAVAILABLE, never INTERNAL, and the next call has a new one."""
    running = start(
        Settings(listen="127.0.0.1:0", database_url=any_database, max_workers=2, metrics_port=None),
        clock=clock,
    )
    try:
        pool = running.storage.db
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            kara.grant_credits("cl-1", 3)
            session_id = kara.book("cl-1", "pro-1", clock.now() + timedelta(days=2)).session_id
            with futures.ThreadPoolExecutor(4) as burst:
                list(burst.map(lambda _: kara.get_session(session_id), range(40)))
            # The workers hold theirs; none went back to the pool's idle list.
            assert 1 <= len(pool._in_use) <= 2 and not pool._connections, (pool._in_use, pool._connections)
            if any_database.startswith("sqlite"):
                return
            with psycopg.connect(_direct_url(any_database), autocommit=True) as admin:
                killed = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()
            assert killed and killed[0] >= 1
        codes = []
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as plain:  # no retries
            stub = sessions_pb2_grpc.SessionServiceStub(plain)
            for _ in range(6):
                try:
                    stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=10)
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)
            # Each of the two workers meets its dropped connection at most once.
            assert set(codes) <= {"OK", "UNAVAILABLE"} and codes.count("UNAVAILABLE") <= 2, codes
    finally:
        running.stop(grace=1)


def _direct_url(url: str) -> str:
    """PgBouncer's URL names its own port; the backends to end are PostgreSQL's."""
    return POSTGRES_URL.rsplit("/", 1)[0] + "/" + url.rsplit("/", 1)[1]
