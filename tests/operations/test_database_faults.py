"""When the database misbehaves: a network cut or stall between the server and PostgreSQL, a lock
held by someone else, a read-only or schema-less database, a shutdown while a transaction is
stuck, and retention. Real servers, real databases, a real TCP proxy; only the clock is fake."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import NO_RETRY, KaraError, RetryPolicy, SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start
from kara_sessions_server.service_layer.services import Services

from ..conftest import ALL_DATABASES
from ..support.clock import FakeClock
from ..support.database import assert_ledger_balances, db_snapshot, reset_postgres
from ..support.processes import start_server_process
from ..support.tcp_proxy import TcpProxy

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        return int(reply.status)


def _eventually(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def behind_proxy(postgres_database: str, clock: FakeClock) -> Iterator[tuple[RunningServer, TcpProxy]]:
    reset_postgres(postgres_database)
    parts = urlsplit(postgres_database)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    netloc = f"{parts.username}@127.0.0.1:{proxy.port}" if parts.username else f"127.0.0.1:{proxy.port}"
    url = urlunsplit(parts._replace(netloc=netloc))
    running = start(Settings(listen="127.0.0.1:0", database_url=url, health_check_seconds=0.2), clock=clock)
    yield running, proxy
    proxy.restore()
    running.stop(grace=1)
    proxy.close()


@pytest.mark.postgres
def test_a_cut_fails_fast_health_follows_and_the_same_request_id_succeeds_after(
    behind_proxy: tuple[RunningServer, TcpProxy], clock: FakeClock
) -> None:
    running, proxy = behind_proxy
    with SessionsClient(f"127.0.0.1:{running.port}", timeout=10, retry=NO_RETRY) as kara:
        kara.grant_credits("client-1", 2)
        session_id = kara.book("client-1", "pro-1", clock.now() + timedelta(days=3)).session_id
        assert _health(running.port) == SERVING

        proxy.cut()
        started = time.monotonic()
        with pytest.raises(KaraError) as failed:
            kara.cancel(session_id, "client", request_id="cancel-in-the-cut")
        assert time.monotonic() - started < 5, "a cut database must fail the call fast"
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
        assert failed.value.reason == "DATABASE_UNAVAILABLE"
        assert failed.value.transient and "incident" in failed.value.message
        assert "retry with the same request_id" in failed.value.message
        with pytest.raises(KaraError) as read_failed:
            kara.get_session(session_id)
        # A read has no request_id to keep: its advice is a plain retry.
        assert read_failed.value.code == grpc.StatusCode.UNAVAILABLE
        assert "request_id" not in read_failed.value.message, read_failed.value.message
        _eventually(lambda: _health(running.port) == NOT_SERVING, 5)

        proxy.restore()
        _eventually(lambda: _health(running.port) == SERVING, 5)
        done = kara.cancel(session_id, "client", request_id="cancel-in-the-cut")
        assert done.payment.state == pb.PAYMENT_STATE_VOIDED
        assert kara.cancel(session_id, "client", request_id="cancel-in-the-cut") == done
        account = kara.get_credit_account("client-1")
        assert (account.available, account.held, account.used) == (2, 0, 0)
    assert_ledger_balances(running)


@pytest.mark.postgres
def test_a_stalled_network_is_bounded_by_the_callers_deadline(
    behind_proxy: tuple[RunningServer, TcpProxy], clock: FakeClock
) -> None:
    running, proxy = behind_proxy
    with SessionsClient(f"127.0.0.1:{running.port}", timeout=1, retry=NO_RETRY) as kara:
        kara.grant_credits("client-1", 1, request_id="grant-0")
        proxy.pause()
        started = time.monotonic()
        with pytest.raises(KaraError) as failed:
            kara.grant_credits("client-1", 5, request_id="grant-in-the-stall")
        assert failed.value.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        assert time.monotonic() - started < 3
        _eventually(lambda: _health(running.port) == NOT_SERVING, 5)
        proxy.restore()
        _eventually(lambda: _health(running.port) == SERVING, 5)
    with SessionsClient(f"127.0.0.1:{running.port}", timeout=10) as kara:
        # The stalled grant's caller was told it failed: it never committed, and the retry
        # with the same request_id applies it exactly once.
        kara.grant_credits("client-1", 5, request_id="grant-in-the-stall")
        kara.grant_credits("client-1", 5, request_id="grant-in-the-stall")
        assert kara.get_credit_account("client-1").available == 6
    assert_ledger_balances(running)


def _hold_lock(database_url: str, session_id: str) -> Callable[[], None]:
    """Another client holding a lock the server will need: SQLite's write lock, or the
    session's row on PostgreSQL. Returns the release."""
    if database_url.startswith("sqlite:///"):
        conn = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
    else:
        conn = psycopg.connect(database_url)  # type: ignore[assignment]
        conn.execute("SELECT 1 FROM sessions WHERE session_id = %s FOR UPDATE", (session_id,))

    def release() -> None:
        conn.rollback()
        conn.close()

    return release


# Also behind PgBouncer: the bound travels with each transaction, not its connection.
@pytest.mark.parametrize("database_url", ALL_DATABASES, indirect=True)
def test_a_lock_wait_ends_at_the_callers_deadline_and_changes_nothing(
    server: RunningServer, kara: SessionsClient, clock: FakeClock, database_url: str
) -> None:
    kara.grant_credits("client-1", 1)
    session_id = kara.book("client-1", "pro-1", clock.now() + timedelta(days=3)).session_id
    release = _hold_lock(database_url, session_id)
    try:
        with SessionsClient(f"127.0.0.1:{server.port}", timeout=1, retry=NO_RETRY) as hurried:
            started = time.monotonic()
            with pytest.raises(KaraError) as failed:
                hurried.cancel(session_id, "client", request_id="cancel-1")
            assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 2.5
        time.sleep(0.3)  # let the server's transaction notice and roll back
    finally:
        release()
    assert kara.get_session(session_id).state == pb.SESSION_STATE_BOOKED
    retried = kara.cancel(session_id, "client", request_id="cancel-1")
    assert retried.session.state == pb.SESSION_STATE_CANCELLED_VOIDED
    assert_ledger_balances(server)


def test_sigterm_with_a_transaction_stuck_on_a_lock_exits_in_time_and_commits_nothing(
    database_url: str, tmp_path: Path
) -> None:
    proc, port = start_server_process(database_url, "--grace-seconds", "2", "--log-level", "INFO")
    target = f"127.0.0.1:{port}"
    with SessionsClient(target) as kara:
        kara.grant_credits("client-1", 1)
        session_id = kara.book("client-1", "pro-1", _ahead(datetime.now(UTC))).session_id
    release = _hold_lock(database_url, session_id)
    outcome: list[object] = []

    def stuck_cancel() -> None:
        with SessionsClient(target, timeout=60, retry=NO_RETRY) as kara:
            try:
                outcome.append(kara.cancel(session_id, "client"))
            except KaraError as exc:
                outcome.append(exc)

    caller = threading.Thread(target=stuck_cancel)
    try:
        caller.start()
        time.sleep(0.7)
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        assert time.monotonic() - stopped < 3.0, "shutdown must end within grace (2 s) + 1 s"
        caller.join(timeout=10)
    finally:
        release()
    assert isinstance(outcome[0], KaraError), outcome
    said = outcome[0].code
    stderr = proc.stderr.read().decode()  # type: ignore[union-attr]
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    cancel_lines = [line for line in lines if line.get("method") == "CancelSession"]
    # Interrupted (PostgreSQL) or no longer waiting for the lock (SQLite), the stuck call unwound
    # and logged the status its caller got, not OK.
    assert [line["code"] for line in cancel_lines] == [said.name], stderr[-3000:]
    assert said is not grpc.StatusCode.OK
    proc, port = start_server_process(database_url)
    try:
        with SessionsClient(f"127.0.0.1:{port}") as kara:
            assert kara.get_session(session_id).state == pb.SESSION_STATE_BOOKED
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def _ahead(now: datetime) -> datetime:
    """Well after `now`, inside the booking horizon."""
    return now + timedelta(days=100)


def _immutable(path: Path, on: bool) -> bool:
    """chattr +i: even root cannot write the file, so SQLite opens it read-only."""
    done = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True, check=False)
    return done.returncode == 0


def test_a_read_only_database_says_so_and_the_client_does_not_retry(tmp_path: Path, clock: FakeClock) -> None:
    db = tmp_path / "kara.db"
    url = f"sqlite:///{db}"
    first = start(Settings(listen="127.0.0.1:0", database_url=url), clock=clock)
    with SessionsClient(f"127.0.0.1:{first.port}") as kara:
        kara.grant_credits("client-1", 1)
    first.stop(grace=1)
    if not _immutable(db, True):
        pytest.skip("chattr +i is not supported on this filesystem: cannot make a read-only database")
    try:
        running = start(Settings(listen="127.0.0.1:0", database_url=url), clock=clock)
        try:
            with SessionsClient(f"127.0.0.1:{running.port}", retry=RetryPolicy(attempts=4)) as kara:
                assert kara.get_credit_account("client-1").available == 1  # reads still work
                with pytest.raises(KaraError) as refused:
                    kara.grant_credits("client-1", 1)
        finally:
            running.stop(grace=1)
    finally:
        _immutable(db, False)
    err = refused.value
    assert (err.code, err.reason, err.attempts) == (grpc.StatusCode.INTERNAL, "DATABASE_READ_ONLY", 1)
    assert "read-only" in err.message and "retrying will not help" in err.message and err.metadata["incident"]
    assert not err.transient


def test_a_missing_table_is_a_schema_mismatch_not_a_retry(
    server: RunningServer, kara: SessionsClient, clock: FakeClock
) -> None:
    kara.grant_credits("client-1", 1)
    with Raw(server) as run:
        run("DROP TABLE programmes")
    with pytest.raises(KaraError) as refused:
        kara.book("client-1", "pro-1", _ahead(clock.now()))
    assert (refused.value.code, refused.value.reason, refused.value.attempts) == (
        grpc.StatusCode.INTERNAL,
        "SCHEMA_MISMATCH",
        1,
    )


class Raw:
    """A statement on the server's database outside the server (an operator's mistake)."""

    def __init__(self, server: RunningServer):
        self.storage = server.storage

    def __enter__(self) -> Callable[[str], None]:
        self.storage.db.connect(reuse_if_open=True)

        def run(statement: str) -> None:
            self.storage.db.execute_sql(statement)

        return run

    def __exit__(self, *exc: object) -> None:
        self.storage.release()


def test_old_request_id_results_are_pruned_and_recent_ones_kept(database_url: str, clock: FakeClock) -> None:
    running = start(
        Settings(
            listen="127.0.0.1:0",
            database_url=database_url,
            request_id_retention=timedelta(days=7),
            audit_retention=timedelta(days=30),
        ),
        clock=clock,
    )
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            kara.grant_credits("client-1", 1, request_id="old")
            kara.book("client-1", "pro-1", clock.now() + timedelta(days=1), request_id="old-book")
            clock.advance(timedelta(days=8))
            kara.grant_credits("client-1", 1, request_id="recent")
            assert running.pruner.run_once() == {"events": 0, "request_id results": 2, "audit rows": 0}
            kept = {r["request_id"] for r in db_snapshot(running)["events"] if r["request_id"]}
            assert kept == {"recent"}
            # Forgetting a request_id leaves its change in the feed.
            assert len(kara.list_events()) == 3
            # A retry within the window replays; an expired request_id is a new request.
            kara.grant_credits("client-1", 1, request_id="recent")
            kara.grant_credits("client-1", 1, request_id="old")
            assert kara.get_credit_account("client-1").available == 2
            clock.advance(timedelta(days=25))
            # The first two changes' events (33 days old) and the booking's audit row go; the
            # two request_ids of day 8 are forgotten, their events kept.
            assert running.pruner.run_once() == {"events": 2, "request_id results": 2, "audit rows": 1}
            assert len(db_snapshot(running)["audit_log"]) == 0
            assert len(kara.list_events()) == 2
    finally:
        running.stop(grace=1)


def test_a_request_id_kept_longer_than_the_feed_keeps_its_event(database_url: str, clock: FakeClock) -> None:
    """The event's row is the request_id's record: it is pruned from the feed only once the
    request_id is forgotten, so a replay is answered for as long as promised."""
    running = start(
        Settings(
            listen="127.0.0.1:0",
            database_url=database_url,
            request_id_retention=timedelta(days=60),
            event_retention=timedelta(days=30),
        ),
        clock=clock,
    )
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            first = kara.grant_credits("client-1", 1, request_id="grant-1")
            clock.advance(timedelta(days=40))
            assert running.pruner.run_once() == {"events": 0, "request_id results": 0, "audit rows": 0}
            assert kara.grant_credits("client-1", 1, request_id="grant-1") == first
            assert kara.get_credit_account("client-1").available == 1
            clock.advance(timedelta(days=21))
            # The event goes with its request_id: nothing is left for the request_id pruning.
            assert running.pruner.run_once() == {"events": 1, "request_id results": 0, "audit rows": 0}
            assert kara.list_events() == []
    finally:
        running.stop(grace=1)


# Also behind PgBouncer: the bound travels with each transaction, not its connection.
@pytest.mark.parametrize("database_url", ALL_DATABASES, indirect=True)
def test_without_a_near_deadline_a_lock_wait_ends_at_max_transaction_seconds(
    database_url: str, clock: FakeClock
) -> None:
    """The server's own bound, for a caller whose deadline is far off (on PostgreSQL, the
    connection's default timeouts, set when it connects)."""
    if database_url.startswith("postgresql"):
        reset_postgres(database_url)
    running = start(
        Settings(listen="127.0.0.1:0", database_url=database_url, max_transaction_seconds=1), clock=clock
    )
    try:
        with SessionsClient(f"127.0.0.1:{running.port}", timeout=30, retry=NO_RETRY) as kara:
            kara.grant_credits("client-1", 1)
            session_id = kara.book("client-1", "pro-1", clock.now() + timedelta(days=3)).session_id
            release = _hold_lock(database_url, session_id)
            try:
                started = time.monotonic()
                with pytest.raises(KaraError) as failed:
                    kara.cancel(session_id, "client", request_id="cancel-1")
                assert failed.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)
                assert time.monotonic() - started < 5, "waited past max_transaction_seconds"
            finally:
                release()
            assert kara.get_session(session_id).state == pb.SESSION_STATE_BOOKED
            assert kara.cancel(session_id, "client", request_id="cancel-1").session.state == (
                pb.SESSION_STATE_CANCELLED_VOIDED
            )
        assert_ledger_balances(running)
    finally:
        running.stop(grace=1)


@pytest.mark.parametrize(
    ("rpc", "call", "mutation"),
    [
        ("get_session", lambda k: k.get_session("s-1"), False),
        ("cancel_session", lambda k: k.cancel("s-1", "client"), True),
    ],
)
def test_an_internal_error_advises_what_fits_the_rpc(
    server: RunningServer,
    kara: SessionsClient,
    monkeypatch: pytest.MonkeyPatch,
    rpc: str,
    call: Any,
    mutation: bool,
) -> None:
    """A fault in our code (injected here) was answered "retry with the same request_id, it is
    never applied twice" even on reads, and for a failure that repeats on every retry."""

    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Services, rpc, broken)
    with pytest.raises(KaraError) as failed:
        call(kara)
    assert failed.value.code == grpc.StatusCode.INTERNAL
    assert "report the incident id" in failed.value.message
    assert ("request_id" in failed.value.message) is mutation, failed.value.message


@pytest.mark.postgres
def test_every_transaction_begins_with_its_own_bounds_in_the_same_round_trip(
    postgres_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is set per connection (a transaction-mode pooler would drop it, or hand it to
    another client's transaction): each transaction's BEGIN carries its statement and lock
    bounds, with no statement of their own (issue 33), and they end with it."""
    from kara_sessions_server.adapters.storage import open_storage

    reset_postgres(postgres_database)
    storage = open_storage(postgres_database, max_transaction_seconds=10)
    statements: list[str] = []
    run = storage.db.execute_sql
    monkeypatch.setattr(
        storage.db, "execute_sql", lambda sql, *a, **k: statements.append(sql) or run(sql, *a, **k)
    )
    try:
        for timeout, shown in ((9.993, "9993ms"), (10.0, "10s"), (5.0, "5s"), (0.25, "250ms")):
            tx = storage.begin(write=True, timeout=timeout)
            try:
                assert statements == [], "the bounds cost no statement of their own"
                assert run("SHOW statement_timeout").fetchone()[0] == shown, timeout
                assert run("SHOW lock_timeout").fetchone()[0] == shown, timeout
            finally:
                tx.__exit__(None, None, None)
            assert run("SHOW statement_timeout").fetchone()[0] == "0", "SET LOCAL ends with its transaction"
            storage.release()
        assert storage.bounds_statements
        # Nothing in the startup packet that a pooler's default configuration refuses; a
        # connection straight to PostgreSQL prepares its statements (one through a pooler never
        # does: test_pooler.py).
        assert "options" not in storage.db.connect_params
        storage.db.connect(reuse_if_open=True)
        assert storage.db.connection().prepare_threshold == 5
    finally:
        storage.close()
