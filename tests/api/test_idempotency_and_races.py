"""request_id idempotency and concurrent cancellations, on SQLite and PostgreSQL: one winner,
and no credit created or lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import KaraError, SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer

from ..conftest import ALL_DATABASES, open_database
from ..support.booking import book
from ..support.clock import FakeClock
from ..support.concurrency import race
from ..support.database import assert_ledger_balances, db_snapshot
from ..support.processes import start_server_process


@pytest.fixture(params=ALL_DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """SQLite, PostgreSQL, and PostgreSQL behind PgBouncer in transaction mode (issue 33)."""
    return open_database(request, tmp_path)


def test_repeated_mutations_return_the_first_result_and_move_nothing(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    first_grant = kara.grant_credits("c", 2, request_id="grant-1")
    assert kara.grant_credits("c", 2, request_id="grant-1") == first_grant
    session = kara.book("c", "p", clock.now() + timedelta(hours=5), request_id="book-1")
    clock.advance(timedelta(minutes=1))
    assert (
        kara.book("c", "p", session.starts_at.ToDatetime().replace(tzinfo=UTC), request_id="book-1")
        == session
    )
    first = kara.cancel(session.session_id, "client", request_id="cancel-1")
    clock.advance(timedelta(minutes=1))
    assert kara.cancel(session.session_id, "client", request_id="cancel-1") == first
    account = kara.get_credit_account("c")
    assert (account.available, account.held, account.used) == (1, 0, 1)
    assert len(account.entries) == 3  # grant, hold, take: nothing repeated
    assert_ledger_balances(server)


def test_request_id_reused_with_different_parameters_is_invalid(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    kara.grant_credits("c", 2, request_id="r-1")
    session_id = book(kara, clock, timedelta(days=2), client_id="c", grant=0)
    before = db_snapshot(server)
    for call in (
        lambda: kara.grant_credits("c", 3, request_id="r-1"),
        lambda: kara.grant_credits("other", 2, request_id="r-1"),
        lambda: kara.cancel(session_id, "client", request_id="r-1"),
    ):
        with pytest.raises(KaraError) as refused:
            call()
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.reason == "REQUEST_ID_REUSED"
    assert db_snapshot(server) == before
    kara.cancel(session_id, "client", request_id="c-1")
    with pytest.raises(KaraError) as refused:
        kara.cancel(session_id, "professional", request_id="c-1")
    assert refused.value.reason == "REQUEST_ID_REUSED"


@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_cancellations_have_one_winner(
    kara: SessionsClient, server: RunningServer, clock: FakeClock, attempt: int
) -> None:
    session_id = book(kara, clock, timedelta(hours=5))
    parties = ["client", "professional"]
    results = race(
        6, lambda i: kara.cancel(session_id, parties[i % 2], charge_client=False, request_id=f"r-{i}")
    )
    winners = [r for r in results if isinstance(r, pb.CancelSessionResponse)]
    losers = [r for r in results if isinstance(r, KaraError)]
    assert len(winners) == 1, results
    assert all(
        e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "SESSION_NOT_BOOKED" for e in losers
    )
    assert kara.get_session(session_id).state == winners[0].session.state
    account = kara.get_credit_account("client-1")
    assert account.held == 0 and account.available + account.used == 1
    assert_ledger_balances(server)


def test_concurrent_retries_with_one_request_id_all_get_the_winners_response(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    session_id = book(kara, clock, timedelta(hours=5))
    results = race(6, lambda i: kara.cancel(session_id, "client", request_id="same"))
    assert all(isinstance(r, pb.CancelSessionResponse) for r in results), results
    assert all(r == results[0] for r in results)
    grants = race(6, lambda i: kara.grant_credits("g", 5, request_id="same-grant"))
    assert all(g == grants[0] for g in grants), grants
    assert kara.get_credit_account("g").available == 5
    assert_ledger_balances(server)


def test_concurrent_bookings_never_overdraw(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    kara.grant_credits("c", 3)
    results = race(8, lambda i: kara.book("c", "p", clock.now() + timedelta(days=1, minutes=i)))
    booked = [r for r in results if isinstance(r, pb.Session)]
    refused = [r for r in results if isinstance(r, KaraError)]
    assert len(booked) == 3
    assert all(e.reason == "INSUFFICIENT_CREDITS" for e in refused) and len(refused) == 5
    assert_ledger_balances(server)


# --- two server processes on one PostgreSQL database -----------------------------------------


@pytest.fixture
def two_servers(postgres_database: str) -> Iterator[tuple[str, str]]:
    from ..support.database import reset_postgres

    reset_postgres(postgres_database)
    first, port_a = start_server_process(postgres_database)
    second, port_b = None, 0
    try:
        second, port_b = start_server_process(postgres_database)
        yield f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)


@pytest.mark.postgres
def test_two_server_processes_race_on_postgres(two_servers: tuple[str, str]) -> None:
    target_a, target_b = two_servers
    with SessionsClient(target_a) as a, SessionsClient(target_b) as b:
        sessions = []
        for n in range(10):
            a.grant_credits(f"client-{n}", 1)
            sessions.append(a.book(f"client-{n}", "pro", datetime.now(UTC) + timedelta(hours=5)).session_id)

        def cancel(i: int) -> Any:
            session_id = sessions[i // 2]
            client = a if i % 2 == 0 else b
            # Even sessions: two different requests; odd sessions: one request retried on both servers.
            request_id = f"{session_id}-{i}" if (i // 2) % 2 == 0 else f"{session_id}-retry"
            return client.cancel(session_id, "client", request_id=request_id)

        results = race(20, cancel)
        for n in range(10):
            pair = results[2 * n : 2 * n + 2]
            ok = [r for r in pair if isinstance(r, pb.CancelSessionResponse)]
            if n % 2 == 0:
                assert len(ok) == 1, pair
                assert isinstance(pair[1 - pair.index(ok[0])], KaraError)
                assert pair[1 - pair.index(ok[0])].reason == "SESSION_NOT_BOOKED"
            else:
                assert len(ok) == 2 and ok[0] == ok[1], pair
            account = a.get_credit_account(f"client-{n}")
            assert (account.available, account.held, account.used) == (0, 0, 1)
            assert len(account.entries) == 3


def test_module_runs_as_cli() -> None:
    """The race test starts servers with `python -m kara_sessions_client.cli`; keep that working."""
    out = subprocess.run(
        [sys.executable, "-m", "kara_sessions_client.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ},
    )
    assert "serve" in out.stdout


def test_a_replay_is_marked_in_the_trailers(
    kara: SessionsClient, clock: FakeClock, server: RunningServer
) -> None:
    """As Stripe's Idempotent-Replayed: a caller can tell a replay from a change it just made."""
    session_id = book(kara, clock, timedelta(days=3))
    first, replayed = kara.cancel_replayed(session_id, "client", request_id="c-1")
    assert not replayed
    again, replayed = kara.cancel_replayed(session_id, "client", request_id="c-1")
    assert replayed and again == first
    with pytest.raises(KaraError):
        kara.cancel_replayed(session_id, "client", request_id="c-2")
