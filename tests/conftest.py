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


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kara.db'}"
    url: str = request.getfixturevalue("postgres_database")
    reset_postgres(url)
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
