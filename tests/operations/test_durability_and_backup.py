"""The embedded default keeps money safe: SQLite commits survive a power loss (synchronous=FULL
in WAL mode unless NORMAL is chosen out loud), the server says at start what its database
promises, and `kara-sessions backup` takes a consistent, verified copy while the server serves,
from which a restored server starts with the sessions as of the backup."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import SessionsClient
from kara_sessions_server.adapters import backup, durability, migrations
from kara_sessions_server.adapters.storage import Storage
from kara_sessions_server.adapters.unit_of_work import SqlUnitOfWorkFactory
from kara_sessions_server.domain.model import SessionState, payment_state_for
from kara_sessions_server.domain.programme import DEFAULT_TERMS
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start

from ..support.clock import FakeClock
from ..support.processes import run_cli

SYNCHRONOUS = {1: "normal", 2: "full"}


def _pragmas(storage: Storage) -> tuple[str, str]:
    """journal_mode and synchronous as the server's own pooled connection reports them."""
    with SqlUnitOfWorkFactory(storage)(write=False):
        journal = str(storage.sql("PRAGMA journal_mode").fetchone()[0])
        synchronous = SYNCHRONOUS[int(storage.sql("PRAGMA synchronous").fetchone()[0])]
    return journal, synchronous


@pytest.fixture
def sqlite_server(tmp_path: Path, clock: FakeClock) -> Iterator[RunningServer]:
    running = start(
        Settings(listen="127.0.0.1:0", database_url=f"sqlite:///{tmp_path / 'live.db'}", max_workers=8),
        clock=clock,
    )
    yield running
    running.stop(grace=1)


def test_sqlite_commits_survive_power_loss_by_default(sqlite_server: RunningServer) -> None:
    # Every pooled connection, not just the first: each thread borrows its own.
    with ThreadPoolExecutor(max_workers=6) as pool:
        seen = set(pool.map(lambda _: _pragmas(sqlite_server.storage), range(24)))
    assert seen == {("wal", "full")}
    assert durability.inspect(sqlite_server.storage).risks == ()


def test_normal_is_an_explicit_choice_and_warned_about(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kara_sessions_server")
    running = start(
        Settings(
            listen="127.0.0.1:0",
            database_url=f"sqlite:///{tmp_path / 'fast.db'}",
            sqlite_synchronous="normal",
        ),
        clock=clock,
    )
    try:
        assert _pragmas(running.storage) == ("wal", "normal")
    finally:
        running.stop(grace=0)
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("INFO", "database durability: sqlite journal_mode=wal synchronous=normal") in said
    warnings = [message for level, message in said if level == "WARNING"]
    assert any("may roll back after a power loss" in m for m in warnings), said


def test_the_server_says_what_its_database_promises(
    database_url: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kara_sessions_server")
    running = start(Settings(listen="127.0.0.1:0", database_url=database_url), clock=clock)
    try:
        found = durability.inspect(running.storage)
    finally:
        running.stop(grace=0)
    if found.database == "sqlite":
        assert found.settings == {"journal_mode": "wal", "synchronous": "full"}
    else:
        # What this machine's PostgreSQL runs with; its defaults are durable.
        assert found.settings == {"synchronous_commit": "on", "fsync": "on", "full_page_writes": "on"}
    assert found.risks == ()
    logged = [r for r in caplog.records if r.getMessage().startswith("database durability:")]
    assert [r.getMessage() for r in logged] == [f"database durability: {found.describe()}"]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def _read_backup(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def assert_consistent_on_its_own(path: Path) -> dict[str, str]:
    """Opened with nothing but sqlite3: intact, every account equal to its ledger and to the
    credits its booked sessions hold, every payment following its session. Returns session states."""
    db = _read_backup(path)
    try:
        assert [r[0] for r in db.execute("PRAGMA integrity_check")] == ["ok"]
        ledger: dict[str, Counter[str]] = {}
        for client, kind, credits in db.execute("SELECT client_id, kind, credits FROM ledger_entries"):
            ledger.setdefault(client, Counter())[kind] += credits
        held_by_sessions = Counter(
            client for (client,) in db.execute("SELECT client_id FROM sessions WHERE state = 'BOOKED'")
        )
        for client, available, held, used in db.execute(
            "SELECT client_id, available, held, used FROM credit_accounts"
        ):
            k = ledger[client]
            assert available + held + used == k["GRANT"], client
            assert (available, held, used) == (k["GRANT"] - k["HOLD"] + k["RETURN"], held, k["TAKE"])
            assert held == k["HOLD"] - k["RETURN"] - k["TAKE"] == held_by_sessions[client]
        states = {}
        rows = db.execute(
            "SELECT s.session_id, s.state, t.no_show_takes_credit, s.waived_at, s.payment_section "
            "FROM sessions s JOIN programme_terms t "
            "ON t.programme_id = s.programme_id AND t.terms_version = s.terms_version"
        ).fetchall()
        for session_id, state, no_show_takes, waived_at, section in rows:
            terms = replace(DEFAULT_TERMS, no_show_takes_credit=bool(no_show_takes))
            expected = payment_state_for(SessionState(state), terms, waived=waived_at is not None)
            assert section == expected.section.value, session_id
            states[session_id] = state
        return states
    finally:
        db.close()


def test_a_backup_taken_while_eight_threads_cancel_is_consistent_and_restores(
    sqlite_server: RunningServer, clock: FakeClock, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{sqlite_server.port}"
    clients = [f"client-{n}" for n in range(8)]
    with SessionsClient(target, timeout=15) as kara:
        for client in clients:
            kara.grant_credits(client, 100)
        sessions = [
            (client, kara.book(client, "pro-1", clock.now() + starts_in).session_id)
            for _ in range(50)
            for client in clients
            # Half on time (the credit comes back), half late (the credit is taken).
            for starts_in in (timedelta(days=3), timedelta(hours=2))
        ]
        live = Path(sqlite_server.storage.db.database)
        dest = tmp_path / "backups" / "kara.db"
        done = Counter[str]()
        lock = threading.Lock()
        started_backup = threading.Event()

        def cancel(session_id: str) -> None:
            kara.cancel(session_id, "client")
            with lock:
                done["cancelled"] += 1
                if done["cancelled"] == 40:
                    started_backup.set()

        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(cancel, session_id) for _, session_id in sessions]
            assert started_backup.wait(timeout=60)
            report = backup.backup(live, dest)
            for future in futures:
                future.result()
        final = [kara.get_session(s).state for _, s in sessions]

    assert report.verified.schema_version == migrations.LATEST
    states = assert_consistent_on_its_own(dest)
    cancelled_in_backup = sum(1 for s in states.values() if s != "BOOKED")
    assert 40 <= cancelled_in_backup < len(sessions), "the backup was not taken mid-burst"
    assert pb.SESSION_STATE_BOOKED not in final

    # Restore as the README says: stop, put the copy in place, migrate --check, start.
    sqlite_server.stop(grace=1)
    shutil.copyfile(dest, live)
    for leftover in (Path(f"{live}-wal"), Path(f"{live}-shm")):
        leftover.unlink(missing_ok=True)
    check = run_cli("migrate", "--check", "--database-url", f"sqlite:///{live}")
    assert check.returncode == 0, check.stdout + check.stderr
    restored = start(Settings(listen="127.0.0.1:0", database_url=f"sqlite:///{live}"), clock=clock)
    try:
        with SessionsClient(f"127.0.0.1:{restored.port}", timeout=15) as kara:
            for session_id, state in states.items():
                assert kara.get_session(session_id).state == pb.SessionState.Value(f"SESSION_STATE_{state}")
            for client in clients:
                account = kara.get_credit_account(client)
                assert account.available + account.held + account.used == 100
    finally:
        restored.stop(grace=1)


def test_backup_command_copies_verifies_and_never_overwrites(
    sqlite_server: RunningServer, clock: FakeClock, tmp_path: Path
) -> None:
    with SessionsClient(f"127.0.0.1:{sqlite_server.port}", timeout=15) as kara:
        kara.grant_credits("client-1", 2)
        kara.book("client-1", "pro-1", clock.now() + timedelta(days=2))
    url = f"sqlite:///{sqlite_server.storage.db.database}"
    dest = tmp_path / "copy.db"
    done = run_cli("backup", "--database-url", url, str(dest))
    assert done.returncode == 0, done.stderr
    said = f"integrity ok, schema version {migrations.LATEST}, 1 sessions with their payments, 1 credit"
    assert said in done.stdout
    assert assert_consistent_on_its_own(dest)
    assert not list(tmp_path.glob(".*partial*"))

    again = run_cli("backup", "--database-url", url, str(dest))
    assert again.returncode == 1
    assert "already exists" in again.stderr
    missing = run_cli(
        "backup", "--database-url", f"sqlite:///{tmp_path / 'nothing.db'}", str(tmp_path / "x.db")
    )
    # No database at that path is a usage error (issue 39).
    assert (missing.returncode, "there is no database" in missing.stderr) == (2, True)
    postgres = run_cli(
        "backup", "--database-url", "postgresql://postgres@127.0.0.1/test", str(tmp_path / "y.db")
    )
    assert (postgres.returncode, "pg_dump" in postgres.stderr) == (2, True)
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "y.db").exists()


def test_a_copy_whose_ledger_disagrees_fails_verification(
    sqlite_server: RunningServer, tmp_path: Path
) -> None:
    with SessionsClient(f"127.0.0.1:{sqlite_server.port}", timeout=15) as kara:
        kara.grant_credits("client-1", 2)
    good = tmp_path / "good.db"
    backup.backup(Path(sqlite_server.storage.db.database), good)
    broken = tmp_path / "broken.db"
    shutil.copyfile(good, broken)
    with sqlite3.connect(broken) as db:
        db.execute("UPDATE credit_accounts SET available = available + 1")
    db.close()
    with pytest.raises(
        backup.BackupError, match=r"credit account client-1 \(programme default\) disagrees with its ledger"
    ):
        backup.verify(broken)
    assert backup.verify(good).credit_accounts == 1
