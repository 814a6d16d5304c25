"""What one CancelSession asks of the database, statement by statement (issue 24), through a
real server on SQLite and PostgreSQL: a statement added to the write path shows up here, and
PostgreSQL pays none extra for a call at our client's default timeout."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from kara_sessions_client.client import DEFAULT_TIMEOUT, SessionsClient
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
