"""The schema is versioned: an empty database is created at the latest version, an older one is
upgraded by `kara-sessions migrate`, and the server refuses to start on any other version."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest

from kara_sessions_client.client import SessionsClient
from kara_sessions_server.adapters import migrations
from kara_sessions_server.adapters.storage import TABLES, Storage, open_storage
from kara_sessions_server.entrypoints.grpc.server import Settings, start

from ..support.booking import book
from ..support.clock import FakeClock
from ..support.database import reset_postgres


def columns(storage: Storage) -> dict[str, set[tuple[str, str, bool]]]:
    with storage.db.connection_context():
        return {
            t._meta.table_name: {
                (c.name, c.data_type.lower(), c.null) for c in storage.db.get_columns(t._meta.table_name)
            }
            for t in TABLES
        }


def migrate_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kara_sessions_client.cli", "migrate", "--database-url", database_url, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def make_version_1(database_url: str, clock: FakeClock) -> str:
    """A database as the first release left it: no schema_version table, no audit principal, no
    invoice tables and no event tables, with one booked session in it. Returns the session's id."""
    running = start(Settings(listen="127.0.0.1:0", database_url=database_url), clock=clock)
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            session_id = book(kara, clock, timedelta(days=2))
    finally:
        running.stop(grace=0)
    storage = open_storage(database_url)
    with storage.db.connection_context():
        storage.db.execute_sql("ALTER TABLE audit_log DROP COLUMN principal")
        storage.db.execute_sql("DROP TABLE schema_version")
        for table in ("invoices", "invoice_lines", "invoice_audit", "events", "event_retention"):
            storage.db.execute_sql(f"DROP TABLE {table}")
    storage.close()
    return session_id


def test_an_empty_database_gets_the_latest_schema(database_url: str) -> None:
    storage = open_storage(database_url)
    try:
        assert migrations.prepare(storage) == migrations.LATEST
        with storage.db.connection_context():
            assert migrations.current_version(storage) == migrations.LATEST
    finally:
        storage.close()


def test_an_old_database_is_refused_then_migrated_keeping_its_data(
    database_url: str, clock: FakeClock
) -> None:
    session_id = make_version_1(database_url, clock)
    with pytest.raises(migrations.SchemaError, match="run `kara-sessions migrate`"):
        start(Settings(listen="127.0.0.1:0", database_url=database_url), clock=clock)

    check = migrate_cli(database_url, "--check")
    assert check.returncode == 1, check
    assert all(f"pending: {n}" in check.stdout for n in (2, 3, 4)), check.stdout
    done = migrate_cli(database_url)
    assert done.returncode == 0, done.stderr
    assert all(f"applied {n}" in done.stdout for n in (2, 3, 4)) and "(was 1)" in done.stdout
    again = migrate_cli(database_url)
    assert "nothing to do" in again.stdout

    running = start(Settings(listen="127.0.0.1:0", database_url=database_url), clock=clock)
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            kara.cancel(session_id, "client")
        from ..support.database import db_snapshot

        audit = db_snapshot(running)["audit_log"]
        assert [(r["action"], r["principal"]) for r in audit] == [
            ("BOOK", None),  # written before principals were recorded
            ("CANCEL", "service:unauthenticated"),
        ]
        migrated = columns(running.storage)
    finally:
        running.stop(grace=0)
    assert migrated == fresh_columns(database_url), "a migrated schema differs from a freshly created one"


def fresh_columns(database_url: str) -> dict[str, set[tuple[str, str, bool]]]:
    if database_url.startswith("sqlite:///"):
        database_url = database_url.replace(".db", "-fresh.db")
    else:
        reset_postgres(database_url)
    storage = open_storage(database_url)
    try:
        migrations.prepare(storage)
        return columns(storage)
    finally:
        storage.close()


def test_a_newer_schema_is_refused(database_url: str, clock: FakeClock) -> None:
    storage = open_storage(database_url)
    migrations.prepare(storage)
    with storage.db.connection_context():
        storage.db.execute_sql("UPDATE schema_version SET version = 99")
    storage.close()
    with pytest.raises(migrations.SchemaError, match="newer than this server knows"):
        start(Settings(listen="127.0.0.1:0", database_url=database_url), clock=clock)
    refused = migrate_cli(database_url)
    assert refused.returncode == 1 and "newer than this server knows" in refused.stderr


def test_migrate_creates_an_empty_database(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/new.db"
    done = migrate_cli(url)
    assert done.returncode == 0 and f"created the schema at version {migrations.LATEST}" in done.stdout
