"""What one CancelSession asks of the database, statement by statement (issue 24), through a
real server on SQLite and PostgreSQL: a statement added to the write path shows up here, and
PostgreSQL pays none extra for a call at our client's default timeout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kara_sessions_client.client import DEFAULT_TIMEOUT, SessionsClient
from kara_sessions_server.adapters import migrations
from kara_sessions_server.adapters.storage import open_storage
from kara_sessions_server.adapters.unit_of_work import SqlUnitOfWorkFactory
from kara_sessions_server.domain.model import (
    Cancellation,
    Move,
    Party,
    PaymentSection,
    Session,
    SessionState,
    Waiver,
)
from kara_sessions_server.domain.programme import LateReschedule, Programme, Terms
from kara_sessions_server.entrypoints.grpc.server import RunningServer

from ..support.clock import FakeClock

# Besides BEGIN and COMMIT, which the driver issues. No read of a stored result: a replay is
# stopped by the unique request_id of the event's row, which is also the request_id's record.
CANCELLATION = [
    "SELECT FROM sessions",
    "UPDATE sessions",
    "UPDATE credit_accounts",
    "INSERT INTO ledger_entries",
    "INSERT INTO audit_log",
    "INSERT INTO events",
]


def _shape(statement: str) -> str:
    words = statement.split()
    if words[0] == "SELECT" and "FROM" in words:
        return f"SELECT FROM {words[words.index('FROM') + 1]}"
    return " ".join(words[:3]) if words[0] == "INSERT" else " ".join(words[:2])


def counting(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    db = server.storage.db
    run: Callable[..., Any] = db.execute_sql

    def execute_sql(statement: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        seen.append(_shape(statement))
        return run(statement, params, *args, **kwargs)

    monkeypatch.setattr(db, "execute_sql", execute_sql)
    return seen


def test_a_cancellation_runs_these_statements_and_no_more(
    kara: SessionsClient, server: RunningServer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    kara.grant_credits("client-1", 1)
    session_id = kara.book("client-1", "pro-1", clock.now() + timedelta(days=2)).session_id
    seen = counting(server, monkeypatch)
    # The client's default timeout (the shared fixture's is longer than the server's ceiling).
    with SessionsClient(f"127.0.0.1:{server.port}") as caller:
        assert caller.timeout == DEFAULT_TIMEOUT
        caller.cancel(session_id, "client", request_id="cancel-1")
        assert seen == CANCELLATION
        seen.clear()
        caller.cancel(session_id, "client", request_id="cancel-1")
    assert seen[-1] == "SELECT FROM events", "a replay reads the stored result, after the rollback"


# A version of a programme's terms whose every field differs from the defaults.
_TERMS = Terms(timedelta(seconds=8), False, False, LateReschedule.REFUSED, timedelta(seconds=9))


def _every_field_set(session_id: str, state: SessionState, version: int) -> Session:
    """A session whose every column holds a value no other column holds: a swapped pair of
    columns (two timestamps, two durations, two flags) reads back as a different session."""
    at = datetime(2027, 3, 1, 9, 0, tzinfo=UTC)
    seconds = [timedelta(seconds=n) for n in range(1, 20)]
    return Session(
        session_id=session_id,
        client_id="client-columns",
        professional_id="pro-columns",
        starts_at=at + seconds[0],
        booked_at=at - seconds[1],
        updated_at=at - seconds[2],
        state=state,
        version=version,
        credits=1,
        cancellation=Cancellation(
            Party.PROFESSIONAL, at - seconds[3], at - seconds[4], seconds[5], True, True, "why", True
        ),
        completed_at=at - seconds[6],
        programme_id="p-columns",
        terms=_TERMS,
        terms_version=2,
        no_show_at=at - seconds[9],
        waiver=Waiver(at - seconds[10], "professional:pro-columns", "goodwill"),
        moves=(
            Move(
                at - seconds[11],
                at,
                at + seconds[0],
                Party.CLIENT,
                at - seconds[12],
                seconds[13],
                False,
                True,
                "m",
            ),
        ),
        rescheduled_from="from-id",
        rescheduled_to="to-id",
    )


def test_a_session_is_written_and_read_back_column_for_column(database_url: str) -> None:
    """The session columns' one declaration (session_repository.row_values beside SessionRow)
    drives the INSERT, the guarded UPDATEs and the read: every field survives each of them."""
    storage = open_storage(database_url)
    try:
        migrations.prepare(storage)
        unit_of_work = SqlUnitOfWorkFactory(storage)
        booked = replace(
            _every_field_set("s-columns", SessionState.BOOKED, 1), cancellation=None, waiver=None
        )
        # The session points to its programme's second version of terms (schema version 9).
        at = datetime(2027, 3, 1, tzinfo=UTC)
        with unit_of_work() as uow:
            uow.programmes.add(Programme("p-columns", "Columns", _TERMS, at, at, terms_version=2))
            uow.sessions.add(booked)
            uow.commit()
        with unit_of_work(write=False) as uow:
            assert uow.sessions.get("s-columns") == booked
        settled = _every_field_set("s-columns", SessionState.CANCELLED_PAID, 2)
        with unit_of_work() as uow:
            saved = uow.sessions.change_state(booked, settled)
            uow.commit()
        assert saved == settled
        with unit_of_work(write=False) as uow:
            assert uow.sessions.get("s-columns") == saved
            # Waived, so VOIDED: the Payments tab's column follows the session's payment.
            assert uow.sessions.payments("pro-columns", PaymentSection.UNPAID, 10, "").items[
                0
            ].session_id == ("s-columns")
    finally:
        storage.close()
