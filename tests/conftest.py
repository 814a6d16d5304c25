"""Shared fixtures: a real gRPC server on a real port, over real SQLite and PostgreSQL databases.
Only the clock is fake. Helpers the tests import live in tests/support/."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from kara_sessions_client.client import SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start

from .support.clock import FakeClock
from .support.database import ON_CI, POSTGRES_URL, reset_postgres
from .support.pgbouncer import PgBouncer


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


@pytest.fixture(scope="session")
def pgbouncer(postgres_database: str) -> Iterator[PgBouncer]:
    """PgBouncer in transaction pooling mode in front of the test PostgreSQL (issue 33)."""
    pooler = PgBouncer(postgres_database)
    pooler.start()
    try:
        yield pooler
    finally:
        pooler.stop()


@pytest.fixture
def pooled_database(postgres_database: str, pgbouncer: PgBouncer) -> str:
    """The scratch PostgreSQL database, emptied, reached through PgBouncer."""
    reset_postgres(postgres_database)
    return pgbouncer.url(postgres_database)


# The databases every server test runs on; modules whose promises a pooler could break (races,
# generated histories, lock bounds) also run behind PgBouncer, by overriding `database_url`
# with ALL_DATABASES.
DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
ALL_DATABASES = [*DATABASES, pytest.param("pgbouncer", marks=pytest.mark.postgres)]


def open_database(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A fresh database of the kind `request.param` names: sqlite, postgres or pgbouncer."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kara.db'}"
    if request.param == "pgbouncer":
        pooled: str = request.getfixturevalue("pooled_database")
        return pooled
    url: str = request.getfixturevalue("postgres_database")
    reset_postgres(url)
    return url


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    return open_database(request, tmp_path)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(database_url: str, clock: FakeClock) -> Iterator[RunningServer]:
    running = start(Settings(listen="127.0.0.1:0", database_url=database_url, max_workers=8), clock=clock)
    yield running
    running.stop(grace=1)


@pytest.fixture
def second_replica(database_url: str, clock: FakeClock) -> Iterator[RunningServer]:
    """Another server on `server`'s database, with its clock, as a second replica is."""
    running = start(Settings(listen="127.0.0.1:0", database_url=database_url, max_workers=8), clock=clock)
    yield running
    running.stop(grace=1)


@pytest.fixture
def kara(server: RunningServer) -> Iterator[SessionsClient]:
    with SessionsClient(f"127.0.0.1:{server.port}", timeout=15) as client:
        yield client
