"""Database connection and schema (peewee). Times are stored as integer microseconds since the
Unix epoch, UTC: exact, portable between SQLite and PostgreSQL, and cheap to index and compare."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse, urlsplit

import peewee as pw
import psycopg
from peewee import Psycopg3Adapter
from playhouse.db_url import parseresult_to_dict
from playhouse.pool import PooledDatabase, PooledPostgresqlDatabase, PooledSqliteDatabase

from kara_sessions_server.adapters.watchdog import Watchdog
from kara_sessions_server.domain.clock import MICROSECOND
from kara_sessions_server.domain.programme import DEFAULT_PROGRAMME_ID

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SQLITE_BUSY_TIMEOUT_MS = 10_000
# SQLite waits this long for another process's lock before Storage.begin looks again.
SQLITE_BUSY_POLL_MS = 100
DEFAULT_MAX_TRANSACTION_SECONDS = 10.0
# Every PostgreSQL transaction begins with its own bounds, in the same round trip as its BEGIN
# (SET LOCAL: for this transaction only). Nothing is set per connection, so a transaction-mode
# pooler (PgBouncer, pgcat, RDS Proxy), which hands each transaction whichever server
# connection is free, can neither drop the bounds nor carry one transaction's to another.
_PG_BEGIN = "BEGIN; SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}"
# psycopg's own default: a query run this often on a connection is prepared on the server.
PG_PREPARE_THRESHOLD = 5
# A PostgreSQL that does not answer a connection attempt is down, as far as a request is concerned.
PG_CONNECT_TIMEOUT_SECONDS = 3
# Pooled connections idle longer than this are reopened (PostgreSQL may drop idle ones).
STALE_CONNECTION_SECONDS = 300

# SQLite in WAL mode: FULL syncs the WAL on every commit, so an acknowledged change survives a
# power loss or an OS crash; NORMAL syncs only at checkpoints and may lose the last commits then.
SqliteSynchronous = Literal["full", "normal"]
DEFAULT_SQLITE_SYNCHRONOUS: SqliteSynchronous = "full"


def to_micros(value: datetime) -> int:
    return (value - EPOCH) // MICROSECOND


def from_micros(value: int) -> datetime:
    return EPOCH + MICROSECOND * value


def micros_or_none(value: datetime | None) -> int | None:
    return None if value is None else to_micros(value)


def time_or_none(value: int | None) -> datetime | None:
    return None if value is None else from_micros(value)


class UtcTimestampField(pw.BigIntegerField):
    def db_value(self, value: datetime | None) -> int | None:
        return None if value is None else to_micros(value)

    def python_value(self, value: int | None) -> datetime | None:
        return None if value is None else from_micros(value)


class DurationField(pw.BigIntegerField):
    def db_value(self, value: timedelta | None) -> int | None:
        return None if value is None else value // MICROSECOND

    def python_value(self, value: int | None) -> timedelta | None:
        return None if value is None else MICROSECOND * value


class Table(pw.Model):
    """No database of its own: each Storage holds its database, so two can be open in one
    process. The models describe the schema (migrations.py, under Storage.bound); requests run
    prebuilt SQL through Storage.sql."""

    class Meta:
        legacy_table_names = False


class SessionRow(Table):
    session_id = pw.CharField(primary_key=True, max_length=64)
    client_id = pw.CharField(max_length=128)
    professional_id = pw.CharField(max_length=128)
    starts_at = UtcTimestampField()
    booked_at = UtcTimestampField()
    updated_at = UtcTimestampField()
    state = pw.CharField(max_length=32)
    # Bumped by every change; the conditional UPDATE that changes state checks it.
    version = pw.IntegerField()
    credits = pw.IntegerField()
    cancelled_by = pw.CharField(max_length=16, null=True)
    cancelled_at = UtcTimestampField(null=True)
    notified_at = UtcTimestampField(null=True)
    # Schema version 9 names the unit of every duration (it was `notice`).
    notice_us = DurationField(null=True)
    late = pw.BooleanField(null=True)
    charge_client = pw.BooleanField(null=True)
    reason = pw.TextField(null=True)
    completed_at = UtcTimestampField(null=True)
    # Schema version 5: the programme, no-shows and waivers. The terms the session was promised
    # at booking are the programme's version `terms_version` (programme_terms, schema version 9;
    # before it, five columns here copied them).
    programme_id = pw.CharField(max_length=64, default=DEFAULT_PROGRAMME_ID)
    terms_version = pw.IntegerField(default=1)
    no_show_at = UtcTimestampField(null=True)
    waived_at = UtcTimestampField(null=True)
    waived_by = pw.CharField(max_length=160, null=True)
    waive_reason = pw.TextField(null=True)
    # Schema version 7: reschedules and a grace after booking (issue 25).
    within_grace = pw.BooleanField(null=True)
    # The moves in place, oldest first, as JSON (session_repository): read with the session,
    # never queried on their own.
    moves = pw.TextField(null=True)
    rescheduled_from = pw.CharField(max_length=64, null=True)
    rescheduled_to = pw.CharField(max_length=64, null=True)
    # Schema version 8: the Payments tab's section (UNPAID or PAID). It follows from the state,
    # the terms and a waiver (model.payment_state), and is written with them in the same UPDATE,
    # so the tab pages through one index without a second table to keep in step.
    payment_section = pw.CharField(max_length=16, default="UNPAID")
    # Schema version 10: a charge forgiven under the programme's free_late_cancellations, the
    # cancellation's or the no-show's. Nullable, so adding them rewrites no row of a large table.
    forgiven = pw.BooleanField(null=True)
    no_show_forgiven = pw.BooleanField(null=True)
    # Schema version 10: settled by the server, nobody having marked it (null: not).
    settled_automatically = pw.BooleanField(null=True)
    # Schema version 10: when its credit's lot expires (null: never).
    credit_expires_at = UtcTimestampField(null=True)
    # Schema version 10: the client's charges forgiven before this one's was decided (null: 0).
    forgiveness_used = pw.IntegerField(null=True)

    class Meta:
        table_name = "sessions"
        indexes = (
            # Keyset pagination for the Sessions tab, per professional and per client.
            (("professional_id", "starts_at", "session_id"), False),
            (("client_id", "starts_at", "session_id"), False),
            # The Payments tab: a professional's section, newest session first.
            (("professional_id", "payment_section", "starts_at", "session_id"), False),
        )


# The settlement sweep: the booked sessions of one version of terms, earliest first. Partial, so
# a session leaving BOOKED only leaves it (a full index on state rewrote an entry per change:
# 12 K instructions a cancellation, BENCHMARKS.md) and settled ones take no room.
SESSIONS_TO_SETTLE = SessionRow.index(
    SessionRow.programme_id,
    SessionRow.terms_version,
    SessionRow.starts_at,
    SessionRow.session_id,
    where=(SessionRow.state == "BOOKED"),
    name="sessions_booked_by_terms_version",
)
SessionRow.add_index(SESSIONS_TO_SETTLE)


class CreditAccountRow(Table):
    """One account per client and programme (schema version 5; before it, per client)."""

    client_id = pw.CharField(max_length=128)
    programme_id = pw.CharField(max_length=64)
    available = pw.IntegerField(constraints=[pw.Check("available >= 0")])
    held = pw.IntegerField(constraints=[pw.Check("held >= 0")])
    used = pw.IntegerField(constraints=[pw.Check("used >= 0")])
    updated_at = UtcTimestampField()
    # Schema version 10: credits whose lot expired, and how many of `available` are in lots that
    # expire (credit_lots); the rest never expire and have no lot row.
    expired = pw.IntegerField(default=0, constraints=[pw.Check("expired >= 0")])
    expiring_available = pw.IntegerField(default=0, constraints=[pw.Check("expiring_available >= 0")])

    class Meta:
        table_name = "credit_accounts"
        primary_key = pw.CompositeKey("client_id", "programme_id")


class CreditLotRow(Table):
    """An account's credits that expire together (schema version 10): each grant with an expire
    time adds to the lot of that time; a booking holds from the one that expires soonest of those
    valid at the session's start. Its balances move with the account's, in the same guarded
    UPDATEs' way. Credits that never expire have no row: they are what the lots leave of the
    account, so a booking on them writes only the account, as before lots."""

    client_id = pw.CharField(max_length=128)
    programme_id = pw.CharField(max_length=64)
    expires_at = UtcTimestampField()
    granted = pw.IntegerField(constraints=[pw.Check("granted >= 0")])
    available = pw.IntegerField(constraints=[pw.Check("available >= 0")])
    held = pw.IntegerField(constraints=[pw.Check("held >= 0")])
    used = pw.IntegerField(constraints=[pw.Check("used >= 0")])
    expired = pw.IntegerField(constraints=[pw.Check("expired >= 0")])
    updated_at = UtcTimestampField()

    class Meta:
        table_name = "credit_lots"
        primary_key = pw.CompositeKey("client_id", "programme_id", "expires_at")
        # The expiry sweep: lots whose time has come, soonest first.
        indexes = ((("expires_at",), False),)


class LedgerEntryRow(Table):
    entry_id = pw.BigAutoField()
    client_id = pw.CharField(max_length=128)
    kind = pw.CharField(max_length=16)
    credits = pw.IntegerField()
    session_id = pw.CharField(max_length=64, null=True)
    request_id = pw.CharField(max_length=128)
    created_at = UtcTimestampField()
    programme_id = pw.CharField(max_length=64, default=DEFAULT_PROGRAMME_ID)
    # Schema version 10: the lot's expire time (NULL: a lot that never expires).
    expires_at = UtcTimestampField(null=True)

    class Meta:
        table_name = "ledger_entries"
        indexes = (
            (("client_id", "programme_id", "entry_id"), False),
            # A session's credit moves exactly once per kind: held once, then returned or taken once.
            (("session_id", "kind"), True),
        )


# A programme's report (report_repository.py): its grants and expiries in a period. Partial, so
# the holds, returns and takes every booking and cancellation writes add no entry to it.
LEDGER_GRANTS_AND_EXPIRIES = LedgerEntryRow.index(
    LedgerEntryRow.programme_id,
    LedgerEntryRow.created_at,
    where=LedgerEntryRow.kind.in_(["GRANT", "EXPIRE"]),
    name="ledger_grants_and_expiries",
)
LedgerEntryRow.add_index(LEDGER_GRANTS_AND_EXPIRIES)


class AuditRow(Table):
    audit_id = pw.BigAutoField()
    session_id = pw.CharField(max_length=64, index=True)
    action = pw.CharField(max_length=16)
    actor = pw.CharField(max_length=32)
    # The authenticated caller (schema version 2; NULL on rows written before it).
    principal = pw.CharField(max_length=160, null=True)
    from_state = pw.CharField(max_length=32, null=True)
    to_state = pw.CharField(max_length=32)
    notified_at = UtcTimestampField(null=True)
    notice_us = DurationField(null=True)
    charge_client = pw.BooleanField(null=True)
    reason = pw.TextField(null=True)
    request_id = pw.CharField(max_length=128)
    # Indexed (schema version 6) for --audit-retention-days.
    at = UtcTimestampField(index=True)

    class Meta:
        table_name = "audit_log"


class InvoiceRow(Table):
    invoice_id = pw.CharField(primary_key=True, max_length=64)
    professional_id = pw.CharField(max_length=128)
    state = pw.CharField(max_length=16)
    # Bumped by every change; the conditional UPDATE that changes the invoice checks it.
    version = pw.IntegerField()
    created_at = UtcTimestampField()
    updated_at = UtcTimestampField()
    submitted_at = UtcTimestampField(null=True)

    class Meta:
        table_name = "invoices"
        # Keyset pagination of a professional's invoices, newest first.
        indexes = ((("professional_id", "created_at", "invoice_id"), False),)


class InvoiceLineRow(Table):
    # The primary key is what keeps a session on at most one invoice, whichever replica asks.
    session_id = pw.CharField(primary_key=True, max_length=64)
    invoice_id = pw.CharField(max_length=64, index=True)
    client_id = pw.CharField(max_length=128)
    session_starts_at = UtcTimestampField()
    paid_reason = pw.CharField(max_length=32)
    credits = pw.IntegerField()
    added_at = UtcTimestampField()

    class Meta:
        table_name = "invoice_lines"


class InvoiceAuditRow(Table):
    """Who created, changed and submitted each invoice; removed lines are remembered here."""

    audit_id = pw.BigAutoField()
    invoice_id = pw.CharField(max_length=64, index=True)
    action = pw.CharField(max_length=16)
    # The sessions added or removed, comma-separated; NULL for CREATE's own row and SUBMIT.
    session_ids = pw.TextField(null=True)
    principal = pw.CharField(max_length=160)
    request_id = pw.CharField(max_length=128)
    at = UtcTimestampField()

    class Meta:
        table_name = "invoice_audit"


class ProgrammeRow(Table):
    programme_id = pw.CharField(primary_key=True, max_length=64)
    display_name = pw.CharField(max_length=200)
    # Bumped by every change; UpdateProgramme's conditional UPDATE checks it.
    version = pw.IntegerField()
    created_at = UtcTimestampField()
    updated_at = UtcTimestampField()
    # Schema version 9: the programme's current terms, a row of programme_terms.
    terms_version = pw.IntegerField(default=1)

    class Meta:
        table_name = "programmes"


class ProgrammeTermsRow(Table):
    """Each version of a programme's terms, stored once and never changed (schema version 9):
    a programme points to its current one, each session to the one it was booked under."""

    programme_id = pw.CharField(max_length=64)
    terms_version = pw.IntegerField()
    notice_window_us = DurationField()
    professional_may_charge_late = pw.BooleanField()
    no_show_takes_credit = pw.BooleanField()
    late_reschedule = pw.CharField(max_length=16)
    cancellation_grace_us = DurationField()
    created_at = UtcTimestampField()
    client_late_cancel = pw.CharField(max_length=24)
    max_reschedules = pw.IntegerField()
    free_late_cancellations = pw.IntegerField()
    forgiveness_period_us = DurationField()
    settle_unmarked_after_us = DurationField()
    unmarked_outcome = pw.CharField(max_length=16)

    class Meta:
        table_name = "programme_terms"
        primary_key = pw.CompositeKey("programme_id", "terms_version")


class EventRow(Table):
    """The outbox (issue 12): one row per committed change, written in the change's transaction.
    The feed's order is (txid, position); see outbox.py for why a sequence alone is not enough."""

    position = pw.BigAutoField()
    # PostgreSQL: the writing transaction's id (pg_current_xact_id()). SQLite: 0, since one
    # writer at a time makes position alone the commit order.
    txid = pw.BigIntegerField()
    event_id = pw.CharField(max_length=36, unique=True)
    type = pw.CharField(max_length=64)
    subject = pw.CharField(max_length=128)
    # Whose it is: the feed a professional or a client may read.
    professional_id = pw.CharField(max_length=128, null=True)
    client_id = pw.CharField(max_length=128, null=True)
    time = UtcTimestampField()
    # The state after the change (snapshots.py): what the feed tells, and what a replay of the
    # change's request_id answers.
    data = pw.TextField()
    # Schema version 8: the change's request_id record is its event's row. NULL once the
    # request_id is forgotten (--request-id-retention-days); unique while it is not.
    request_id = pw.CharField(max_length=128, null=True, unique=True)
    operation = pw.CharField(max_length=64, null=True)
    fingerprint = pw.CharField(max_length=64, null=True)

    class Meta:
        table_name = "events"
        indexes = (
            (("txid", "position"), True),
            (("professional_id", "txid", "position"), False),
            (("client_id", "txid", "position"), False),
        )


# The request_ids still remembered, oldest first, for pruning them by age without a scan.
EventRow.add_index(EventRow.index(EventRow.time).where(EventRow.request_id.is_null(False)))


class EventRetentionRow(Table):
    """One row: the newest event pruned so far. A cursor at or before it has lost events."""

    id = pw.IntegerField(primary_key=True)
    pruned_txid = pw.BigIntegerField()
    pruned_position = pw.BigIntegerField()
    updated_at = UtcTimestampField()

    class Meta:
        table_name = "event_retention"


class SchemaVersionRow(Table):
    """One row: the schema version the database is at (see migrations.py)."""

    id = pw.IntegerField(primary_key=True)
    version = pw.IntegerField()
    updated_at = UtcTimestampField()

    class Meta:
        table_name = "schema_version"


TABLES: list[type[Table]] = [
    SessionRow,
    CreditAccountRow,
    CreditLotRow,
    LedgerEntryRow,
    AuditRow,
    InvoiceRow,
    InvoiceLineRow,
    InvoiceAuditRow,
    EventRow,
    EventRetentionRow,
    ProgrammeRow,
    ProgrammeTermsRow,
    SchemaVersionRow,
]


class Sql:
    """Runs prebuilt statements (written with `?` placeholders) on this thread's connection to
    one database; returns the cursor. The hot paths use these instead of peewee's query
    builder, which cost more than the database itself (see BENCHMARKS.md); peewee still maps
    driver errors to its own (IntegrityError, OperationalError, ...)."""

    __slots__ = ("_cache", "_db", "_marker", "on_sqlite")

    def __init__(self, db: pw.Database):
        self._db = db
        self._marker: str = db.param
        self._cache: dict[str, str] = {}
        # Statements that differ by dialect ask.
        self.on_sqlite = isinstance(db, pw.SqliteDatabase)

    def __call__(self, text: str, params: Sequence[object] = ()) -> Any:
        if self._marker == "?":
            return self._db.execute_sql(text, params)  # type: ignore[no-untyped-call]
        found = self._cache.get(text)
        if found is None:
            found = self._cache[text] = text.replace("?", self._marker)
        return self._db.execute_sql(found, params)  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class Writer:
    """A transaction of this database that holds an xid: until it ends, the event feed stops
    before it (outbox.py)."""

    pid: int
    application_name: str
    open_seconds: float


@dataclass(frozen=True, slots=True)
class Probe:
    # None: the database answered.
    problem: str | None
    # PostgreSQL: the longest-open writing transaction of this database, if any.
    oldest_writer: Writer | None = None


# Whose transaction holds the feed back (outbox.py), and for how long. Another user's backends
# show their xid only to a superuser or a member of pg_read_all_stats.
_OLDEST_WRITER = (
    "SELECT pid, coalesce(application_name, ''), extract(epoch FROM clock_timestamp() - xact_start) "
    "FROM pg_stat_activity WHERE datname = current_database() AND backend_xid IS NOT NULL "
    "ORDER BY xact_start LIMIT 1"
)


class Storage:
    """An open database: the peewee Database, how to begin a transaction on it with a time limit,
    and the watchdog that interrupts what outlives its limit."""

    def __init__(self, db: PooledDatabase, max_transaction_seconds: float = DEFAULT_MAX_TRANSACTION_SECONDS):
        self.db = db
        self.sql = Sql(db)
        self.is_sqlite = isinstance(db, pw.SqliteDatabase)
        self.system = "sqlite" if self.is_sqlite else "postgresql"
        # No transaction may last longer, whatever its call's deadline (or without one).
        self.max_transaction_seconds = max_transaction_seconds
        self.watchdog = Watchdog()
        # Set when the server shuts down: nothing waits for a database lock any more.
        self.closing = threading.Event()
        # SQLite has one writer at a time. Queueing this process's writers on a lock hands the
        # database from one to the next at once; left to SQLite's busy handler, waiters sleep
        # and poll (up to 100 ms per nap), which is what made p99 hundreds of milliseconds.
        self.write_lock = threading.Lock() if self.is_sqlite else None
        # PostgreSQL stops a transaction's statements at its bound itself (_PG_BEGIN); on SQLite
        # the watchdog must interrupt them at the deadline.
        self.bounds_statements = not self.is_sqlite
        # On a thread that keeps its connection (keep_connections()): when it was opened.
        self._kept = threading.local()

    def keep_connections(self) -> None:
        """Makes this thread keep its connection between transactions instead of handing it
        back to the pool and taking it again around each one (issue 35: 19 K of a cancellation's
        instructions, 49 K of a GetPayment's). For long-lived threads only, fewer than the pool's
        connections: the server's unary workers. A connection is still handed back after a database error, and
        once it is older than the pool's stale timeout."""
        self._kept.opened = None

    def begin(self, write: bool, timeout: float, keep_waiting: Callable[[], bool] = lambda: True) -> Any:
        """Opens this thread's connection and a transaction on it; no statement in it may wait
        longer than `timeout` seconds (PostgreSQL enforces it; on SQLite the watchdog interrupts
        a statement, and waiting for another process's lock stops at the timeout, when
        `keep_waiting()` turns False, or when the storage closes)."""
        if self.db.is_closed():
            self.db.connect()
            if hasattr(self._kept, "opened"):
                self._kept.opened = time.monotonic()
        tx = self.transaction(write)
        if self.is_sqlite:
            self._begin_sqlite(tx, time.monotonic() + timeout, keep_waiting)
            return tx
        self.db.bounds.ms = _ms(timeout)
        tx.__enter__()
        return tx

    def _begin_sqlite(self, tx: Any, deadline: float, keep_waiting: Callable[[], bool]) -> None:
        # SQLite's own busy wait cannot be interrupted, so it is kept short (SQLITE_BUSY_POLL_MS)
        # and retried here, where the deadline, the caller and a shutdown are looked at.
        while True:
            try:
                tx.__enter__()
                return
            except pw.OperationalError as exc:
                locked = "locked" in str(exc) or "busy" in str(exc)
                if not locked or time.monotonic() >= deadline or self.closing.is_set() or not keep_waiting():
                    raise

    def probe(self, timeout: float) -> Probe:
        """Whether the database answers a query on a fresh connection within `timeout` seconds
        (else what went wrong), and on PostgreSQL its longest-open writing transaction. Uses no
        pooled connection, so it sees what a new request would."""
        try:
            if self.is_sqlite:
                conn = sqlite3.connect(self.db.database, timeout=timeout)
                try:
                    conn.execute("SELECT version FROM schema_version").fetchone()
                finally:
                    conn.close()
                return Probe(None)
            params = {**self.db.connect_params, "connect_timeout": max(1, round(timeout))}
            with psycopg.connect(dbname=self.db.database, **params) as pg:
                row = pg.execute(_OLDEST_WRITER).fetchone()
        except (sqlite3.Error, psycopg.Error, OSError) as exc:
            return Probe(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        return Probe(None, None if row is None else Writer(int(row[0]), str(row[1]), float(row[2])))

    def interrupter(self) -> Callable[[], None]:
        """Stops whatever this thread's connection is doing, from another thread."""
        connection = self.db.connection()
        if self.is_sqlite:
            return connection.interrupt  # type: ignore[no-any-return]
        # A cancel request opens a connection of its own: never let it block the caller.
        return lambda: threading.Thread(target=connection.cancel, name="pg-cancel", daemon=True).start()

    def transaction(self, write: bool) -> Any:
        if self.is_sqlite and write:
            # Take SQLite's write lock up front: a deferred transaction that later upgrades to a
            # writer fails with SQLITE_BUSY at once instead of waiting for the busy timeout.
            return self.db.atomic(lock_type="IMMEDIATE")
        return self.db.atomic()

    def bound(self, models: Sequence[type[pw.Model]] = ()) -> Any:
        """A block in which the tables (and `models`) are this database's: for the schema's
        work and for tools that read with peewee's query builder. Requests never need it. The
        binding is the classes', so while a block lasts it holds for the whole process: schema
        work runs before serving (start-up, `migrate`), not beside another database's."""
        return self.db.bind_ctx([*TABLES, *models])

    def release(self, healthy: bool = False) -> None:
        """Hands this thread's connection back to the pool, unless the thread keeps it
        (keep_connections()) and it is `healthy`: no database error ended its transaction."""
        if self.db.is_closed():
            return
        opened = getattr(self._kept, "opened", None)
        if healthy and opened is not None and time.monotonic() - opened < STALE_CONNECTION_SECONDS:
            return
        self.db.close()

    def close(self) -> None:
        self.closing.set()
        self.watchdog.stop()
        self.release()
        self.db.close_all()


def sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite:///PATH` URL; None for any other database."""
    if urlsplit(url).scheme != "sqlite":
        return None
    path = url[len("sqlite:///") :]
    if not path or path == ":memory:":
        raise ValueError(
            "an in-memory SQLite database is private to one connection; give a file path, "
            "e.g. sqlite:///kara-sessions.db"
        )
    return Path(path).expanduser()


def open_storage(
    url: str,
    *,
    max_connections: int = 32,
    sqlite_synchronous: SqliteSynchronous = DEFAULT_SQLITE_SYNCHRONOUS,
    max_transaction_seconds: float = DEFAULT_MAX_TRANSACTION_SECONDS,
) -> Storage:
    """Opens `sqlite:///relative.db`, `sqlite:////absolute.db` or `postgresql://user@host/db`.
    The schema is migrations.py's business."""
    return Storage(
        _connect(url, max_connections, sqlite_synchronous, max_transaction_seconds), max_transaction_seconds
    )


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _connect(
    url: str, max_connections: int, sqlite_synchronous: SqliteSynchronous, max_transaction_seconds: float
) -> PooledDatabase:
    pool = {
        "max_connections": max_connections,
        "stale_timeout": STALE_CONNECTION_SECONDS,
        "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
    }
    path = sqlite_path(url)
    if path is not None:
        if sqlite_synchronous not in ("full", "normal"):
            raise ValueError(f"SQLite synchronous must be full or normal, not {sqlite_synchronous!r}")
        path.resolve().parent.mkdir(parents=True, exist_ok=True)
        return PooledSqliteDatabase(
            str(path),
            # The pool lends a connection to one thread at a time, but not always the same thread.
            check_same_thread=False,
            **pool,
            pragmas={
                "journal_mode": "wal",
                "synchronous": sqlite_synchronous,
                "foreign_keys": 1,
                "busy_timeout": SQLITE_BUSY_POLL_MS,
            },
        )
    scheme = urlsplit(url).scheme
    if scheme in ("postgresql", "postgres"):
        params = parseresult_to_dict(urlparse(url))
        params.setdefault("connect_timeout", PG_CONNECT_TIMEOUT_SECONDS)
        # No server-side prepared statements until a connection is known to be PostgreSQL's own
        # (_PostgresDatabase._connect).
        params["prepare_threshold"] = None
        return _PostgresDatabase(params.pop("database"), max_transaction_seconds, **pool, **params)
    raise ValueError(f"unsupported database URL scheme {scheme!r}: use sqlite:///PATH or postgresql://...")


class _PreparingOnlyOnItsOwnBackend(Psycopg3Adapter):
    """psycopg prepares a query on the server after its fifth run on a connection (a fifth to a
    quarter of a cancellation's cost on PostgreSQL, BENCHMARKS.md). Behind a pooler the next
    transaction may meet another server connection, where that statement's name is unknown or
    names another query: a new connection prepares statements only when the backend answering
    it is the one it was opened to. A pooler (PgBouncer, pgcat, RDS Proxy, Supavisor) answers
    the startup with a process id of its own making, so a connection through one never does."""

    def connect(self, db: Any, **params: Any) -> Any:
        conn = super().connect(db, **params)  # type: ignore[no-untyped-call]
        conn.autocommit = True
        if conn.execute("SELECT pg_backend_pid()").fetchone()[0] == conn.info.backend_pid:
            conn.prepare_threshold = PG_PREPARE_THRESHOLD
        return conn


class _PostgresDatabase(PooledPostgresqlDatabase):  # type: ignore[misc]
    """Begins every transaction with its statement and lock bounds (_PG_BEGIN), in one round
    trip: Storage.begin sets this thread's bound just before. Prepares statements only on a
    connection that is one server backend's own (_PreparingOnlyOnItsOwnBackend)."""

    psycopg3_adapter = _PreparingOnlyOnItsOwnBackend

    def __init__(self, database: str, max_transaction_seconds: float, **params: Any):
        super().__init__(database, prefer_psycopg3=True, **params)
        self.bounds = threading.local()
        self._default_ms = _ms(max_transaction_seconds)

    def begin(self, isolation_level: Any = None) -> None:
        ms = getattr(self.bounds, "ms", None) or self._default_ms
        self.bounds.ms = None
        with pw.__exception_wrapper__:  # type: ignore[attr-defined]  # peewee maps driver errors
            self.cursor().execute(_PG_BEGIN.format(ms=int(ms)))
