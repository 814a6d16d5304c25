"""Shared fixtures: a real gRPC server on a real port, over real SQLite and PostgreSQL databases.
Only the clock is fake."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from kara_sessions_client.client import SessionsClient
from kara_sessions_server.app import RunningServer, Settings, start
from kara_sessions_server.storage import TABLES
from kara_sessions_server.unit_of_work import UnitOfWork

POSTGRES_URL = os.environ.get("KARA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
ON_CI = os.environ.get("CI", "").lower() == "true"
T0 = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self, now: datetime = T0):
        self._now = now
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def set(self, when: datetime) -> None:
        with self._lock:
            self._now = when

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._now += delta


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A scratch database on the PostgreSQL server, dropped at the end of the run."""
    try:
        admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL not reachable at {POSTGRES_URL} (set KARA_TEST_POSTGRES_URL): {exc}"
        if ON_CI:
            pytest.fail(f"CI=true requires the PostgreSQL tests to run. {message}")
        pytest.skip(message)
    name = f"kara_test_{uuid.uuid4().hex[:10]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        base = POSTGRES_URL.rsplit("/", 1)[0]
        yield f"{base}/{name}"
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _reset_postgres(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for table in TABLES:
            conn.execute(f'DROP TABLE IF EXISTS "{table._meta.table_name}" CASCADE')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kara.db'}"
    url: str = request.getfixturevalue("postgres_database")
    _reset_postgres(url)
    return url


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(database_url: str, clock: FakeClock) -> Iterator[RunningServer]:
    running = start(Settings(listen="127.0.0.1:0", database_url=database_url, max_workers=8), clock=clock)
    yield running
    running.stop(grace=1)


@pytest.fixture
def kara(server: RunningServer) -> Iterator[SessionsClient]:
    with SessionsClient(f"127.0.0.1:{server.port}", timeout=15) as client:
        yield client


def db_snapshot(server: RunningServer) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table, to prove a refused request changed nothing."""
    with UnitOfWork(server.storage, write=False):
        return {t._meta.table_name: list(t.select().order_by(*t._meta.sorted_fields).dicts()) for t in TABLES}


def assert_ledger_balances(server: RunningServer) -> None:
    """No credit created or lost: for every account, the balances equal the ledger's sums."""
    snapshot = db_snapshot(server)
    sums: dict[str, dict[str, int]] = {}
    for entry in snapshot["ledger_entries"]:
        acc = sums.setdefault(entry["client_id"], {"available": 0, "held": 0, "used": 0})
        n = entry["credits"]
        kind = entry["kind"]
        if kind == "GRANT":
            acc["available"] += n
        elif kind == "HOLD":
            acc["available"] -= n
            acc["held"] += n
        elif kind == "RETURN":
            acc["held"] -= n
            acc["available"] += n
        elif kind == "TAKE":
            acc["held"] -= n
            acc["used"] += n
    for account in snapshot["credit_accounts"]:
        expected = sums.get(account["client_id"], {"available": 0, "held": 0, "used": 0})
        actual = {k: account[k] for k in ("available", "held", "used")}
        assert actual == expected, f"account {account['client_id']} disagrees with its ledger"
    held_sessions = sum(1 for s in snapshot["sessions"] if s["state"] == "BOOKED")
    assert sum(a["held"] for a in snapshot["credit_accounts"]) == held_sessions


def book(
    kara: SessionsClient,
    clock: FakeClock,
    starts_in: timedelta,
    client_id: str = "client-1",
    professional_id: str = "pro-1",
    grant: int = 1,
) -> str:
    if grant:
        kara.grant_credits(client_id, grant)
    return str(kara.book(client_id, professional_id, clock.now() + starts_in).session_id)
