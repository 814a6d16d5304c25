"""What may hold the event feed back on PostgreSQL, and how an operator finds out (issue 33).
The feed stops before the oldest unfinished transaction that could still add an event below a
cursor already handed out (adapters/outbox.py): only this database's. A transaction in another
database of the cluster (another team's batch job, a forgotten psql) delayed every consumer."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import psycopg
import pytest

from kara_sessions_client.client import SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start

from ..support.clock import FakeClock
from ..support.database import POSTGRES_URL, reset_postgres

pytestmark = pytest.mark.postgres

GRANTED = "kara.sessions.v1.credits.granted"


@pytest.fixture
def running(postgres_database: str, clock: FakeClock) -> Iterator[RunningServer]:
    reset_postgres(postgres_database)
    server = start(
        Settings(
            listen="127.0.0.1:0",
            database_url=postgres_database,
            max_transaction_seconds=1,
            health_check_seconds=0.2,
        ),
        clock=clock,
    )
    yield server
    server.stop(grace=1)


def _open_writer(url: str, application_name: str) -> psycopg.Connection[tuple[object, ...]]:
    """A transaction that holds an xid and stays open, as `BEGIN; SELECT pg_current_xact_id();`."""
    conn = psycopg.connect(url, application_name=application_name)
    conn.execute("SELECT pg_current_xact_id()")
    return conn


def test_a_transaction_in_another_database_of_the_cluster_does_not_hold_the_feed_back(
    running: RunningServer, postgres_database: str
) -> None:
    assert POSTGRES_URL.rsplit("/", 1)[1] != postgres_database.rsplit("/", 1)[1]
    other = _open_writer(POSTGRES_URL, "another-teams-batch-job")
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            kara.grant_credits("client-1", 1)
            assert [e.type for e in kara.list_events()] == [GRANTED]
            assert running.metrics.registry.get_sample_value("kara_feed_held_back_seconds") == 0
    finally:
        other.rollback()
        other.close()


def test_a_transaction_of_ours_that_holds_the_feed_back_is_named_in_the_log_and_the_metrics(
    running: RunningServer, postgres_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """It delays, never loses; past --max-transaction-seconds the server says whose it is."""
    caplog.set_level(logging.WARNING, logger="kara_sessions_server.feed")
    ours = _open_writer(postgres_database, "forgotten-psql")
    pid = ours.info.backend_pid
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            kara.grant_credits("client-1", 1)
            assert kara.list_events() == []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not caplog.records:
                time.sleep(0.05)
            [warning] = [r for r in caplog.records if r.name == "kara_sessions_server.feed"]
            assert f"backend {pid}" in warning.getMessage()
            assert "'forgotten-psql'" in warning.getMessage()
            assert running.metrics.registry.get_sample_value("kara_feed_held_back_seconds") > 1
            ours.rollback()
            assert [e.type for e in kara.list_events()] == [GRANTED]
            deadline = time.monotonic() + 10
            while running.metrics.registry.get_sample_value("kara_feed_held_back_seconds") != 0:
                assert time.monotonic() < deadline, "the gauge stayed up after the transaction ended"
                time.sleep(0.05)
    finally:
        ours.close()
