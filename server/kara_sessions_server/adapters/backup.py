"""Online backup of the SQLite database: a consistent copy taken while the server serves, through
SQLite's own backup API, checked on its own before it is put in place. (PostgreSQL has pg_dump.)

The copy is taken in one step, so it is one snapshot of the database: in WAL mode the server's
writers go on meanwhile and land after it. It is written beside the destination, verified,
synced, and only then renamed into place, so DEST is either a whole, checked backup or absent."""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass, replace
from pathlib import Path

from kara_sessions_server.domain.model import SessionState, payment_state_for
from kara_sessions_server.domain.programme import DEFAULT_TERMS

_BALANCES = """
SELECT a.client_id, a.programme_id, a.available, a.held, a.used, {expired},
       COALESCE(SUM(CASE WHEN e.kind = 'GRANT' THEN e.credits END), 0),
       COALESCE(SUM(CASE WHEN e.kind = 'HOLD' THEN e.credits END), 0),
       COALESCE(SUM(CASE WHEN e.kind = 'RETURN' THEN e.credits END), 0),
       COALESCE(SUM(CASE WHEN e.kind = 'TAKE' THEN e.credits END), 0),
       COALESCE(SUM(CASE WHEN e.kind = 'REFUND' THEN e.credits END), 0),
       COALESCE(SUM(CASE WHEN e.kind = 'EXPIRE' THEN e.credits END), 0)
FROM credit_accounts a
LEFT JOIN ledger_entries e ON e.client_id = a.client_id AND e.programme_id = a.programme_id
GROUP BY a.client_id, a.programme_id, a.available, a.held, a.used, {expired}
"""
# Schema version 10: each account's lots of credits that expire, each adding up to what it was
# granted, together within the account and with its count of expiring credits available.
_LOTS = """
SELECT l.client_id, l.programme_id, SUM(l.available), SUM(l.held), SUM(l.used), SUM(l.expired),
       SUM(CASE WHEN l.granted = l.available + l.held + l.used + l.expired THEN 0 ELSE 1 END),
       MIN(a.expiring_available)
FROM credit_lots l JOIN credit_accounts a ON a.client_id = l.client_id AND a.programme_id = l.programme_id
GROUP BY l.client_id, l.programme_id
"""
_LOTS_SINCE_VERSION = 10
# Each session with the no-show term of the version of its programme's terms it points to.
_PAYMENTS = (
    "SELECT s.session_id, s.state, t.no_show_takes_credit, s.waived_at, s.payment_section, {forgiven} "
    "FROM sessions s "
    "LEFT JOIN programme_terms t ON t.programme_id = s.programme_id AND t.terms_version = s.terms_version"
)
# A no-show's forgiven charge is recorded from schema version 10 on.
_FORGIVEN_SINCE_VERSION = 10


class BackupError(Exception):
    """The backup could not be taken, or the copy failed its checks (and was not kept)."""


@dataclass(frozen=True, slots=True)
class Verified:
    schema_version: int
    sessions: int
    credit_accounts: int


@dataclass(frozen=True, slots=True)
class BackupReport:
    path: Path
    size_bytes: int
    seconds: float
    verified: Verified


def backup(source: Path, dest: Path) -> BackupReport:
    if not source.is_file():
        raise BackupError(f"there is no database at {source}")
    if dest.exists():
        raise BackupError(f"{dest} already exists; a backup never overwrites a file: choose a new name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial")
    partial.unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        _copy(source, partial)
        verified = verify(partial)
        if verified.schema_version != _schema_version(source):
            raise BackupError("the schema changed during the backup (a migration ran); take it again")
        _fsync(partial)
        os.replace(partial, dest)
        _fsync(dest.parent)
    finally:
        partial.unlink(missing_ok=True)
    return BackupReport(dest, dest.stat().st_size, time.perf_counter() - started, verified)


def _copy(source: Path, target: Path) -> None:
    src = sqlite3.connect(source, timeout=10)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)  # all pages in one step: one consistent snapshot
            # One self-contained file (no -wal beside it); a server opening it turns WAL back on.
            dst.execute("PRAGMA journal_mode = DELETE").fetchone()
        finally:
            dst.close()
    except sqlite3.Error as exc:
        raise BackupError(f"cannot copy {source}: {exc}") from exc
    finally:
        src.close()


def verify(path: Path) -> Verified:
    """Checks a database file on its own: SQLite's integrity check, a kara-sessions schema, every
    credit account equal to its ledger, and every session's payment following its state."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        integrity = [row[0] for row in db.execute("PRAGMA integrity_check")]
        if integrity != ["ok"]:
            raise BackupError(f"integrity check failed: {'; '.join(integrity[:5])}")
        version = _version(db)
        lots = version >= _LOTS_SINCE_VERSION
        accounts = db.execute(_BALANCES.format(expired="a.expired" if lots else "0")).fetchall()
        balances = {}
        for client_id, programme_id, available, held, used, expired, g, h, r, t, f, x in accounts:
            if (available, held, used, expired) != (g - h + r + f - x, h - r - t, t - f, x):
                raise BackupError(
                    f"credit account {client_id} (programme {programme_id}) disagrees with its ledger"
                )
            balances[client_id, programme_id] = (available, held, used, expired)
        for client_id, programme_id, *summed, wrong, expiring in db.execute(_LOTS).fetchall() if lots else ():
            account = balances.get((client_id, programme_id), (0, 0, 0, 0))
            # What the lots leave of the account are its credits that never expire: none negative.
            if wrong or expiring != summed[0] or any(a < s for a, s in zip(account, summed, strict=True)):
                raise BackupError(
                    f"credit account {client_id} (programme {programme_id}) disagrees with its lots"
                )
        forgiven_column = "s.no_show_forgiven" if version >= _FORGIVEN_SINCE_VERSION else "NULL"
        sessions = db.execute(_PAYMENTS.format(forgiven=forgiven_column)).fetchall()
        for session_id, state, no_show_takes, waived_at, section, forgiven in sessions:
            if no_show_takes is None:
                raise BackupError(f"session {session_id} points to terms its programme does not have")
            terms = replace(DEFAULT_TERMS, no_show_takes_credit=bool(no_show_takes))
            expected = payment_state_for(
                SessionState(state), terms, waived=waived_at is not None, forgiven=bool(forgiven)
            ).section
            if section != expected.value:
                raise BackupError(f"session {session_id} is {state} but its payment is in section {section}")
        return Verified(version, len(sessions), len(accounts))
    except sqlite3.Error as exc:
        raise BackupError(f"{path} is not a readable kara-sessions database: {exc}") from exc
    finally:
        db.close()


def _version(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
    if row is None:
        raise BackupError(
            "the database has no schema version: run `kara-sessions migrate` on it first, or it is "
            "not a kara-sessions database"
        )
    return int(row[0])


def _schema_version(source: Path) -> int:
    db = sqlite3.connect(source, timeout=10)
    try:
        return _version(db)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot read the schema version of {source}: {exc}") from exc
    finally:
        db.close()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
