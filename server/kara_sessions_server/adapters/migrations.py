"""The database schema is versioned. `kara-sessions migrate` upgrades it; the server refuses to
start on a schema older or newer than the one it was written for.

Version 1 is the schema before versioning (no schema_version table). An empty database is
created at the latest version directly, from the models. Each later version is one Migration:
playhouse.migrate operations and tables to create; every step runs in one transaction under a
lock (BEGIN IMMEDIATE on SQLite, an advisory lock on PostgreSQL), so two processes never migrate
at once."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import peewee as pw
from playhouse.migrate import Operation, PostgresqlMigrator, SchemaMigrator, SqliteMigrator, migrate

from kara_sessions_server.adapters.storage import (
    TABLES,
    CreditLotRow,
    DurationField,
    EventRetentionRow,
    InvoiceAuditRow,
    InvoiceLineRow,
    InvoiceRow,
    SchemaVersionRow,
    Storage,
    Table,
    UtcTimestampField,
)
from kara_sessions_server.domain.clock import MICROSECOND
from kara_sessions_server.domain.programme import DEFAULT_PROGRAMME_ID, DEFAULT_TERMS, default_programme

# A schema step may rewrite a large table: its statements get far longer than a request's.
_MIGRATION_SECONDS = 3600.0
# Any fixed number: PostgreSQL advisory locks are keyed by an integer.
_PG_LOCK_KEY = 0x6B61_7261


@dataclass(frozen=True, slots=True)
class Context:
    """What a migration may need to know of how the server ran before it."""

    # The --notice-window-hours the server ran with: what sessions booked before programmes
    # were promised (schema version 5).
    notice_window: timedelta = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    operations: Callable[[SchemaMigrator, Storage], list[Operation]] = lambda m, s: []
    # Created from their models as they are now. A later step that alters one of these tables
    # must first freeze its shape here (test_migrations compares the result with a fresh schema).
    tables: tuple[type[Table], ...] = ()
    # Moves data, after the operations and the new tables, in the same transaction.
    data: Callable[[Storage, Context], None] = lambda s, c: None


class _ProgrammeV5(Table):
    """The programmes table as version 5 created it (version 7 adds the reschedule terms)."""

    programme_id = pw.CharField(primary_key=True, max_length=64)
    display_name = pw.CharField(max_length=200)
    notice_window = DurationField()
    professional_may_charge_late = pw.BooleanField()
    no_show_takes_credit = pw.BooleanField()
    version = pw.IntegerField()
    created_at = UtcTimestampField()
    updated_at = UtcTimestampField()

    class Meta:
        table_name = "programmes"


class _CreditAccountV5(Table):
    """The credit_accounts table as version 5 created it (version 10 adds `expired` and
    `expiring_available`)."""

    client_id = pw.CharField(max_length=128)
    programme_id = pw.CharField(max_length=64)
    available = pw.IntegerField(constraints=[pw.Check("available >= 0")])
    held = pw.IntegerField(constraints=[pw.Check("held >= 0")])
    used = pw.IntegerField(constraints=[pw.Check("used >= 0")])
    updated_at = UtcTimestampField()

    class Meta:
        table_name = "credit_accounts"
        primary_key = pw.CompositeKey("client_id", "programme_id")


class _ProgrammeTermsV9(Table):
    """The programme_terms table as version 9 created it (version 10 adds the sponsor's terms)."""

    programme_id = pw.CharField(max_length=64)
    terms_version = pw.IntegerField()
    notice_window_us = DurationField()
    professional_may_charge_late = pw.BooleanField()
    no_show_takes_credit = pw.BooleanField()
    late_reschedule = pw.CharField(max_length=16)
    cancellation_grace_us = DurationField()
    created_at = UtcTimestampField()

    class Meta:
        table_name = "programme_terms"
        primary_key = pw.CompositeKey("programme_id", "terms_version")


class _EventV4(Table):
    """The events table as version 4 created it (version 8 adds each change's request_id)."""

    position = pw.BigAutoField()
    txid = pw.BigIntegerField()
    event_id = pw.CharField(max_length=36, unique=True)
    type = pw.CharField(max_length=64)
    subject = pw.CharField(max_length=128)
    professional_id = pw.CharField(max_length=128, null=True)
    client_id = pw.CharField(max_length=128, null=True)
    time = UtcTimestampField()
    data = pw.TextField()

    class Meta:
        table_name = "events"
        indexes = (
            (("txid", "position"), True),
            (("professional_id", "txid", "position"), False),
            (("client_id", "txid", "position"), False),
        )


def _v5_operations(m: SchemaMigrator, storage: Storage) -> list[Operation]:
    """Sessions record their programme and terms; ledger entries their programme; the old
    one-per-client credit_accounts makes way for one per client and programme (filled by
    _v5_data). The columns are frozen here as version 5 defines them."""
    session_columns = {
        "programme_id": pw.CharField(max_length=64, default=DEFAULT_PROGRAMME_ID),
        "notice_window": DurationField(default=DEFAULT_TERMS.notice_window),
        "professional_may_charge_late": pw.BooleanField(default=True),
        "no_show_takes_credit": pw.BooleanField(default=True),
        "no_show_at": UtcTimestampField(null=True),
        "waived_at": UtcTimestampField(null=True),
        "waived_by": pw.CharField(max_length=160, null=True),
        "waive_reason": pw.TextField(null=True),
    }
    ops = [m.add_column("sessions", name, field) for name, field in session_columns.items()]
    ops += [
        m.add_column(
            "ledger_entries", "programme_id", pw.CharField(max_length=64, default=DEFAULT_PROGRAMME_ID)
        ),
        m.drop_index("ledger_entries", "ledger_entries_client_id_entry_id"),
        m.add_index("ledger_entries", ("client_id", "programme_id", "entry_id"), False),
        m.rename_table("credit_accounts", "credit_accounts_v4"),
    ]
    if not storage.is_sqlite:
        # PostgreSQL names the primary key's index after the table it was made for.
        ops.append(m.sql("ALTER INDEX credit_accounts_pkey RENAME TO credit_accounts_v4_pkey"))
    return ops


def _v5_data(storage: Storage, context: Context) -> None:
    now = datetime.now(UTC)
    db = storage.db
    window = context.notice_window // timedelta(microseconds=1)
    db.execute_sql(f"UPDATE sessions SET notice_window = {db.param}", (window,))
    copy = (
        "INSERT INTO credit_accounts (client_id, programme_id, available, held, used, updated_at) "
        f"SELECT client_id, {db.param}, available, held, used, updated_at FROM credit_accounts_v4"
    )
    db.execute_sql(copy, (DEFAULT_PROGRAMME_ID,))
    db.execute_sql("DROP TABLE credit_accounts_v4")
    default = default_programme(now, context.notice_window)
    _ProgrammeV5.insert(
        programme_id=default.programme_id,
        display_name=default.display_name,
        notice_window=default.terms.notice_window,
        professional_may_charge_late=default.terms.professional_may_charge_late,
        no_show_takes_credit=default.terms.no_show_takes_credit,
        version=default.version,
        created_at=now,
        updated_at=now,
    ).execute()


def _v7_operations(m: SchemaMigrator, storage: Storage) -> list[Operation]:
    """Reschedules and a grace after booking. Every programme, and every session booked before,
    gets the article's rule: a late move is charged, no grace. Frozen as version 7 defines them."""
    ops = [
        op
        for table in ("sessions", "programmes")
        for op in (
            m.add_column(table, "late_reschedule", pw.CharField(max_length=16, default="CHARGE")),
            m.add_column(table, "cancellation_grace", DurationField(default=timedelta(0))),
        )
    ]
    session_columns = {
        "within_grace": pw.BooleanField(null=True),
        "moves": pw.TextField(null=True),
        "rescheduled_from": pw.CharField(max_length=64, null=True),
        "rescheduled_to": pw.CharField(max_length=64, null=True),
    }
    return ops + [m.add_column("sessions", name, field) for name, field in session_columns.items()]


def _v8_operations(m: SchemaMigrator, storage: Storage) -> list[Operation]:
    """One row per change: the Payments tab's section on the session itself, with the tab's
    index, and each change's request_id record on its event's row (frozen as version 8 defines
    them). _v8_data fills both, indexes the request_ids and drops the two tables they leave."""
    return [
        m.add_column("sessions", "payment_section", pw.CharField(max_length=16, default="UNPAID")),
        m.add_index("sessions", ("professional_id", "payment_section", "starts_at", "session_id"), False),
        m.add_column("events", "request_id", pw.CharField(max_length=128, null=True)),
        m.add_column("events", "operation", pw.CharField(max_length=64, null=True)),
        m.add_column("events", "fingerprint", pw.CharField(max_length=64, null=True)),
    ]


def _v8_move_request_ids(storage: Storage) -> None:
    """Each stored result goes onto the row of the event its change appended: the one written
    in the same transaction, at the same instant, with the same data (mutate stored one string
    in both), in one statement. A result whose event was pruned already (a feed kept for less
    time than request ids), or that matches more than one event, gets a row of its own behind
    the feed's start: txid 0 and a negative position, which no cursor reaches (outbox.read),
    and no type: it is a request_id record, not an event. Either way it replays."""
    db = storage.db
    db.execute_sql("CREATE INDEX events_v8_time ON events (time)")
    # One event per key and one key per event: the first of each in order, the rest left over.
    db.execute_sql(
        "WITH matched AS ("
        " SELECT k.request_id, k.operation, k.fingerprint, e.position,"
        "  ROW_NUMBER() OVER (PARTITION BY k.request_id ORDER BY e.txid, e.position) AS per_key,"
        "  ROW_NUMBER() OVER (PARTITION BY e.position ORDER BY k.created_at, k.request_id) AS per_event"
        " FROM idempotency_keys k JOIN events e ON e.time = k.created_at AND e.data = k.result)"
        " UPDATE events SET request_id = m.request_id, operation = m.operation, fingerprint = m.fingerprint"
        " FROM matched m WHERE events.position = m.position AND m.per_key = 1 AND m.per_event = 1"
    )
    db.execute_sql("DROP INDEX events_v8_time")
    # Made after the move: with it, the join could take it for `request_id IS NULL` and scan.
    db.execute_sql("CREATE UNIQUE INDEX events_request_id ON events (request_id)")
    db.execute_sql("CREATE INDEX events_time ON events (time) WHERE request_id IS NOT NULL")
    left_over = db.execute_sql(
        "SELECT request_id, operation, fingerprint, result, created_at FROM idempotency_keys k "
        "WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.request_id = k.request_id) "
        "ORDER BY created_at, request_id"
    ).fetchall()
    behind_the_feed = (
        "INSERT INTO events (position, txid, event_id, type, subject, time, data, request_id, operation, "
        f"fingerprint) VALUES ({', '.join([db.param] * 10)})"
    )
    for n, (request_id, operation, fingerprint, result, created_at) in enumerate(left_over, start=1):
        row = (
            -n,
            0,
            str(uuid.uuid4()),
            "",
            request_id,
            created_at,
            result,
            request_id,
            operation,
            fingerprint,
        )
        db.execute_sql(behind_the_feed, row)
    db.execute_sql("DROP TABLE idempotency_keys")


def _v8_data(storage: Storage, context: Context) -> None:
    """Each session's section is the one its payments row had (they were written in the same
    transaction); a session without a row, which no version wrote, gets the one its state says
    by the rule as version 8 has it (model.payment_state). Everything else a payments row held
    is the session's own (Payment.of derives it)."""
    db = storage.db
    db.execute_sql(
        "UPDATE sessions SET payment_section = "
        "(SELECT p.section FROM payments p WHERE p.session_id = sessions.session_id) "
        "WHERE EXISTS (SELECT 1 FROM payments p WHERE p.session_id = sessions.session_id)"
    )
    db.execute_sql(
        "UPDATE sessions SET payment_section = CASE "
        "WHEN waived_at IS NOT NULL THEN 'UNPAID' "
        "WHEN state IN ('CANCELLED_PAID', 'COMPLETED') THEN 'PAID' "
        "WHEN state = 'NO_SHOW' AND no_show_takes_credit THEN 'PAID' "
        "ELSE 'UNPAID' END "
        "WHERE NOT EXISTS (SELECT 1 FROM payments p WHERE p.session_id = sessions.session_id)"
    )
    db.execute_sql("DROP TABLE payments")
    _v8_move_request_ids(storage)


# The five columns of terms that sessions and programmes carried before version 9.
_TERMS_COLUMNS_V8 = (
    "notice_window",
    "professional_may_charge_late",
    "no_show_takes_credit",
    "late_reschedule",
    "cancellation_grace",
)


def _v9_operations(m: SchemaMigrator, storage: Storage) -> list[Operation]:
    """Terms stored once, as versions that programmes and sessions point to (frozen as version
    9 defines them), and every stored duration named with its unit. _v9_data fills
    programme_terms and the pointers, then drops the copied columns."""
    return [
        m.add_column("sessions", "terms_version", pw.IntegerField(default=1)),
        m.add_column("programmes", "terms_version", pw.IntegerField(default=1)),
        m.rename_column("sessions", "notice", "notice_us"),
        m.rename_column("audit_log", "notice", "notice_us"),
    ]


def _v9_data(storage: Storage, context: Context) -> None:
    """Each programme's terms become its versions, in the order they were first used: the terms
    its sessions were booked under, earliest booking first, then its current terms (the same
    version as the last of those when they are equal). Each session points to the version equal
    to the terms it was promised, and each programme to its current one: nothing any session
    was promised changes. A version is dated by the programme's creation (the first), its first
    booking (the others), or the programme's last change (current terms no session has yet)."""
    db, mark = storage.db, storage.db.param
    columns = ", ".join(_TERMS_COLUMNS_V8)

    def key(values: Sequence[object]) -> tuple[object, ...]:
        window, may_charge, no_show, late, grace = values
        return (int(window), bool(may_charge), bool(no_show), str(late), int(grace))  # type: ignore[call-overload]

    programmes = {
        programme_id: (key(terms), created, updated)
        for programme_id, *terms, created, updated in db.execute_sql(
            f"SELECT programme_id, {columns}, created_at, updated_at FROM programmes"
        ).fetchall()
    }
    versions: dict[str, list[tuple[tuple[object, ...], int]]] = {}
    used = db.execute_sql(
        f"SELECT programme_id, {columns}, MIN(booked_at) FROM sessions GROUP BY programme_id, {columns}"
    ).fetchall()
    # By first booking; equal times (a batch, a test's clock) in an order every database shares.
    for programme_id, *terms, first in sorted(used, key=lambda row: (row[0], row[-1], key(row[1:-1]))):
        found = versions.setdefault(programme_id, [])
        dated = programmes[programme_id][1] if not found and programme_id in programmes else first
        found.append((key(terms), dated))
    current: dict[str, int] = {}
    for programme_id, (terms, created, updated) in programmes.items():
        found = versions.setdefault(programme_id, [])
        if not found:
            found.append((terms, created))
        elif found[-1][0] != terms:
            found.append((terms, updated))
        current[programme_id] = len(found)
    insert = (
        "INSERT INTO programme_terms (programme_id, terms_version, notice_window_us, "
        "professional_may_charge_late, no_show_takes_credit, late_reschedule, cancellation_grace_us, "
        f"created_at) VALUES ({', '.join([mark] * 8)})"
    )
    point = f"UPDATE sessions SET terms_version = {mark} WHERE programme_id = {mark} AND " + " AND ".join(
        f"{column} = {mark}" for column in _TERMS_COLUMNS_V8
    )
    for programme_id, found in versions.items():
        pointed: set[tuple[object, ...]] = set()
        for number, (terms, at) in enumerate(found, start=1):
            db.execute_sql(insert, (programme_id, number, *terms, at))
            if terms not in pointed:  # equal terms twice (changed, then changed back): the first
                pointed.add(terms)
                db.execute_sql(point, (number, programme_id, *terms))
    point_programme = f"UPDATE programmes SET terms_version = {mark} WHERE programme_id = {mark}"
    for programme_id, number in current.items():
        db.execute_sql(point_programme, (number, programme_id))
    for table in ("sessions", "programmes"):
        for column in _TERMS_COLUMNS_V8:
            db.execute_sql(f"ALTER TABLE {table} DROP COLUMN {column}")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        2,
        "audit_log.principal: the authenticated caller of each change",
        lambda m, s: [m.add_column("audit_log", "principal", pw.CharField(max_length=160, null=True))],
    ),
    Migration(
        3,
        "invoices, invoice_lines and invoice_audit: paid sessions on professionals' invoices",
        tables=(InvoiceRow, InvoiceLineRow, InvoiceAuditRow),
    ),
    Migration(
        4,
        "events and event_retention: the outbox other services read through EventService",
        tables=(_EventV4, EventRetentionRow),
    ),
    Migration(
        5,
        "programmes: credits per programme, each session's terms, no-shows and waivers",
        _v5_operations,
        tables=(_ProgrammeV5, _CreditAccountV5),
        data=_v5_data,
    ),
    Migration(
        6,
        "indexes on idempotency_keys.created_at and audit_log.at: pruning by age",
        lambda m, s: [
            m.add_index("idempotency_keys", ("created_at",), False),
            m.add_index("audit_log", ("at",), False),
        ],
    ),
    Migration(
        7,
        "reschedules: each programme's late_reschedule and cancellation_grace, moves on sessions",
        _v7_operations,
    ),
    Migration(
        8,
        "one row per change: the Payments tab on sessions (payments dropped), request_ids on events",
        _v8_operations,
        data=_v8_data,
    ),
    Migration(
        9,
        "terms stored once: programme_terms, versions that programmes and sessions point to; units named",
        _v9_operations,
        tables=(_ProgrammeTermsV9,),
        data=_v9_data,
    ),
    Migration(
        10,
        "the sponsor's terms: client_late_cancel, max_reschedules, forgiveness and settlement on "
        "programme_terms; forgiven and automatically settled sessions",
        lambda m, s: [
            # What every version of terms stored so far promised: the article's rule, no cap,
            # nothing forgiven (and a year, the period the default names).
            m.add_column(
                "programme_terms", "client_late_cancel", pw.CharField(max_length=24, default="CHARGE")
            ),
            m.add_column("programme_terms", "max_reschedules", pw.IntegerField(default=0)),
            m.add_column("programme_terms", "free_late_cancellations", pw.IntegerField(default=0)),
            m.add_column(
                "programme_terms",
                "forgiveness_period_us",
                pw.BigIntegerField(default=DEFAULT_TERMS.forgiveness_period // MICROSECOND),
            ),
            m.add_column("programme_terms", "settle_unmarked_after_us", pw.BigIntegerField(default=0)),
            m.add_column(
                "programme_terms", "unmarked_outcome", pw.CharField(max_length=16, default="COMPLETED")
            ),
            # Nullable (null: no), so that adding them rewrites no session's row.
            m.add_column("sessions", "forgiven", pw.BooleanField(null=True)),
            m.add_column("sessions", "no_show_forgiven", pw.BooleanField(null=True)),
            m.add_column("sessions", "settled_automatically", pw.BooleanField(null=True)),
            m.sql(
                "CREATE INDEX sessions_booked_by_terms_version ON sessions "
                "(programme_id, terms_version, starts_at, session_id) WHERE state = 'BOOKED'"
            ),
            m.add_column("sessions", "credit_expires_at", UtcTimestampField(null=True)),
            m.add_column("sessions", "forgiveness_used", pw.IntegerField(null=True)),
            m.add_column("ledger_entries", "expires_at", UtcTimestampField(null=True)),
            m.add_column("credit_accounts", "expired", pw.IntegerField(default=0)),
            m.add_column("credit_accounts", "expiring_available", pw.IntegerField(default=0)),
            m.sql(
                "CREATE INDEX ledger_grants_and_expiries ON ledger_entries (programme_id, created_at) "
                "WHERE kind IN ('GRANT', 'EXPIRE')"
            ),
        ],
        # Empty: every credit granted so far never expires, and those have no lot row.
        tables=(CreditLotRow,),
    ),
)
BASELINE = 1
LATEST = MIGRATIONS[-1].version if MIGRATIONS else BASELINE


class SchemaError(Exception):
    """The database's schema is not the one this server was written for."""


def current_version(storage: Storage) -> int | None:
    """The schema version, or None for an empty database."""
    tables = set(storage.db.get_tables())
    if SchemaVersionRow._meta.table_name in tables:
        row = storage.sql("SELECT version FROM schema_version WHERE id = 1").fetchone()
        if row is not None:
            return int(row[0])
    return BASELINE if "sessions" in tables else None


def prepare(storage: Storage) -> int:
    """At server start: creates the schema in an empty database; refuses any other version
    than LATEST with a message that says what to do."""
    with _locked(storage):
        version = current_version(storage)
        if version is None:
            _create(storage)
            return LATEST
    check(version)
    return version


def check(version: int) -> None:
    if version > LATEST:
        raise SchemaError(
            f"the database schema is at version {version}, newer than this server knows ({LATEST}); "
            "run a newer kara-sessions, or restore a backup taken before the upgrade"
        )
    if version < LATEST:
        raise SchemaError(
            f"the database schema is at version {version}; this server needs {LATEST}: "
            "run `kara-sessions migrate` with the same --database-url first"
        )


def pending(storage: Storage) -> list[Migration] | None:
    """What `migrate` would apply; None for an empty database (it has no schema to upgrade);
    raises SchemaError on a schema newer than LATEST."""
    with _locked(storage):
        version = current_version(storage)
    if version is None:
        return None
    if version > LATEST:
        check(version)
    return [m for m in MIGRATIONS if m.version > version]


def upgrade(
    storage: Storage, on_step: Callable[[Migration], None] = lambda m: None, context: Context = Context()
) -> tuple[int | None, int]:
    """Brings the schema to LATEST, one committed step per migration. Returns (from, to)."""
    with _locked(storage):
        start = current_version(storage)
        if start is None:
            _create(storage)
            return None, LATEST
    if start > LATEST:
        check(start)
    for step in MIGRATIONS:
        with _locked(storage):
            # Re-read under the lock: another process may have applied this step meanwhile.
            if _version_or_baseline(storage) >= step.version:
                continue
            migrate(*step.operations(_migrator(storage), storage))
            storage.db.create_tables(step.tables)
            step.data(storage, context)
            _stamp(step.version)
        on_step(step)
    return start, LATEST


def _version_or_baseline(storage: Storage) -> int:
    return current_version(storage) or BASELINE


def _create(storage: Storage) -> None:
    storage.db.create_tables(TABLES, safe=True)
    _stamp(LATEST)


def _stamp(version: int) -> None:
    SchemaVersionRow.create_table(safe=True)  # absent from a version-1 database
    now = datetime.now(UTC)
    (
        SchemaVersionRow.insert(id=1, version=version, updated_at=now)
        .on_conflict(
            conflict_target=[SchemaVersionRow.id],
            update={SchemaVersionRow.version: version, SchemaVersionRow.updated_at: now},
        )
        .execute()
    )


def _migrator(storage: Storage) -> SchemaMigrator:
    if storage.is_sqlite:
        return SqliteMigrator(storage.db)
    return PostgresqlMigrator(storage.db)


@contextmanager
def _locked(storage: Storage) -> Iterator[None]:
    """A write transaction that no other process's schema work can overlap, in which the
    tables (today's and the frozen ones above) are `storage`'s."""
    with storage.bound([_ProgrammeV5, _EventV4, _ProgrammeTermsV9, _CreditAccountV5]), _transaction(storage):
        yield


@contextmanager
def _transaction(storage: Storage) -> Iterator[None]:
    tx = storage.begin(write=True, timeout=_MIGRATION_SECONDS)
    try:
        if not storage.is_sqlite:
            storage.db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK_KEY,))
        yield
    except BaseException as exc:
        tx.__exit__(type(exc), exc, exc.__traceback__)
        raise
    else:
        tx.__exit__(None, None, None)
    finally:
        storage.release()
