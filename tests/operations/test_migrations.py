"""The schema is versioned: an empty database is created at the latest version, an older one is
upgraded by `kara-sessions migrate`, and the server refuses to start on any other version."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest
from kara.sessions.v1 import programmes_pb2 as ppb
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import KaraError, SessionsClient
from kara_sessions_server.adapters import migrations
from kara_sessions_server.adapters.storage import TABLES, Storage, open_storage
from kara_sessions_server.entrypoints.grpc.server import Settings, start

from ..support.booking import book
from ..support.clock import FakeClock
from ..support.database import db_snapshot, reset_postgres


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


V5_SESSION_COLUMNS = (
    "programme_id",
    "notice_window",
    "professional_may_charge_late",
    "no_show_takes_credit",
    "no_show_at",
    "waived_at",
    "waived_by",
    "waive_reason",
)


V7_COLUMNS = {
    "sessions": (
        "late_reschedule",
        "cancellation_grace",
        "within_grace",
        "moves",
        "rescheduled_from",
        "rescheduled_to",
    ),
    "programmes": ("late_reschedule", "cancellation_grace"),
}


# The payments table as versions 1 to 7 had it: one row per session, its Payments tab entry.
_PAYMENTS_V7 = (
    "CREATE TABLE payments (session_id VARCHAR(64) NOT NULL PRIMARY KEY, client_id VARCHAR(128) NOT NULL, "
    "professional_id VARCHAR(128) NOT NULL, session_starts_at BIGINT NOT NULL, state VARCHAR(16) NOT NULL, "
    "section VARCHAR(16) NOT NULL, credits INTEGER NOT NULL, updated_at BIGINT NOT NULL)"
)
_FILL_PAYMENTS_V7 = (
    "INSERT INTO payments SELECT session_id, client_id, professional_id, starts_at, "
    "CASE WHEN state = 'BOOKED' THEN 'PENDING' WHEN payment_section = 'PAID' THEN 'PAID' ELSE 'VOIDED' END, "
    "payment_section, credits, updated_at FROM sessions"
)


_IDEMPOTENCY_V7 = (
    "CREATE TABLE idempotency_keys (request_id VARCHAR(128) NOT NULL PRIMARY KEY, "
    "operation VARCHAR(64) NOT NULL, fingerprint VARCHAR(64) NOT NULL, result TEXT NOT NULL, "
    "created_at BIGINT NOT NULL)"
)


# The terms each session and programme row copied before version 9, as version 8 declared them.
_TERMS_COLUMNS_V8 = {
    "notice_window": ("BIGINT NOT NULL DEFAULT 0", "notice_window_us"),
    "professional_may_charge_late": ("BOOLEAN NOT NULL DEFAULT FALSE", "professional_may_charge_late"),
    "no_show_takes_credit": ("BOOLEAN NOT NULL DEFAULT FALSE", "no_show_takes_credit"),
    "late_reschedule": ("VARCHAR(16) NOT NULL DEFAULT 'CHARGE'", "late_reschedule"),
    "cancellation_grace": ("BIGINT NOT NULL DEFAULT 0", "cancellation_grace_us"),
}


# The columns of programme_terms that version 10 added (issue 36).
TERMS_SINCE_9 = (
    "client_late_cancel",
    "max_reschedules",
    "free_late_cancellations",
    "forgiveness_period_us",
    "settle_unmarked_after_us",
    "unmarked_outcome",
)


def downgrade_to_version_9(database_url: str) -> None:
    """The database as version 9 left it (terms without the sponsor's, sessions without a
    forgiven charge), with its data."""
    storage = open_storage(database_url)
    db = storage.db
    with db.connection_context(), db.atomic():
        for column in TERMS_SINCE_9:
            db.execute_sql(f"ALTER TABLE programme_terms DROP COLUMN {column}")
        db.execute_sql("DROP INDEX sessions_booked_by_terms_version")
        db.execute_sql("DROP INDEX ledger_grants_and_expiries")
        for column in (
            "forgiven",
            "no_show_forgiven",
            "settled_automatically",
            "credit_expires_at",
            "forgiveness_used",
        ):
            db.execute_sql(f"ALTER TABLE sessions DROP COLUMN {column}")
        # Credits in lots: version 9 had only accounts, whose credits never expired.
        db.execute_sql("DROP TABLE credit_lots")
        for column in ("expired", "expiring_available"):
            db.execute_sql(f"ALTER TABLE credit_accounts DROP COLUMN {column}")
        db.execute_sql("ALTER TABLE ledger_entries DROP COLUMN expires_at")
        db.execute_sql("UPDATE schema_version SET version = 9")
    storage.close()


def downgrade_to_version_8(database_url: str) -> None:
    """The database as version 8 left it (each session and programme row with its own copy of
    its terms, durations without their unit in their names), with its data."""
    downgrade_to_version_9(database_url)
    storage = open_storage(database_url)
    db = storage.db
    with db.connection_context(), db.atomic():
        for table in ("sessions", "programmes"):
            for column, (declared, source) in _TERMS_COLUMNS_V8.items():
                db.execute_sql(f"ALTER TABLE {table} ADD COLUMN {column} {declared}")
                db.execute_sql(
                    f"UPDATE {table} SET {column} = (SELECT t.{source} FROM programme_terms t WHERE "
                    f"t.programme_id = {table}.programme_id AND t.terms_version = {table}.terms_version)"
                )
            db.execute_sql(f"ALTER TABLE {table} DROP COLUMN terms_version")
        db.execute_sql("DROP TABLE programme_terms")
        db.execute_sql("ALTER TABLE sessions RENAME COLUMN notice_us TO notice")
        db.execute_sql("ALTER TABLE audit_log RENAME COLUMN notice_us TO notice")
        db.execute_sql("UPDATE schema_version SET version = 8")
    storage.close()


def downgrade_to_version_7(database_url: str) -> None:
    """The database as version 7 left it (the Payments tab in its own table, each request_id's
    result in idempotency_keys), with its data."""
    downgrade_to_version_8(database_url)
    storage = open_storage(database_url)
    db = storage.db
    with db.connection_context(), db.atomic():
        db.execute_sql(_IDEMPOTENCY_V7)
        db.execute_sql("CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at)")
        db.execute_sql(
            "INSERT INTO idempotency_keys SELECT request_id, operation, fingerprint, data, time FROM events "
            "WHERE request_id IS NOT NULL"
        )
        for index in ("events_request_id", "events_time"):
            db.execute_sql(f"DROP INDEX {index}")
        for column in ("request_id", "operation", "fingerprint"):
            db.execute_sql(f"ALTER TABLE events DROP COLUMN {column}")
        db.execute_sql(_PAYMENTS_V7)
        db.execute_sql(
            "CREATE INDEX payments_professional_id_section_session_starts_at_session_id "
            "ON payments (professional_id, section, session_starts_at, session_id)"
        )
        db.execute_sql(_FILL_PAYMENTS_V7)
        db.execute_sql("DROP INDEX sessions_professional_id_payment_section_starts_at_session_id")
        db.execute_sql("ALTER TABLE sessions DROP COLUMN payment_section")
        db.execute_sql("UPDATE schema_version SET version = 7")
    storage.close()


def downgrade_to_version_6(database_url: str) -> None:
    """The database as version 6 left it (before reschedules), with the data it holds."""
    downgrade_to_version_7(database_url)
    storage = open_storage(database_url)
    db = storage.db
    with db.connection_context(), db.atomic():
        for table, names in V7_COLUMNS.items():
            for column in names:
                db.execute_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
        db.execute_sql("UPDATE schema_version SET version = 6")
    storage.close()


def downgrade_to_version_4(database_url: str) -> None:
    """The database as version 4 left it (before programmes), with the data it holds: the new
    session and ledger columns dropped, one credit account per client, no programmes table, and
    none of version 6's indexes."""
    downgrade_to_version_6(database_url)
    storage = open_storage(database_url)
    db = storage.db
    with db.connection_context(), db.atomic():
        db.execute_sql("DROP INDEX idempotency_keys_created_at")
        db.execute_sql("DROP INDEX audit_log_at")
        for column in V5_SESSION_COLUMNS:
            db.execute_sql(f"ALTER TABLE sessions DROP COLUMN {column}")
        db.execute_sql("DROP INDEX ledger_entries_client_id_programme_id_entry_id")
        db.execute_sql("ALTER TABLE ledger_entries DROP COLUMN programme_id")
        db.execute_sql(
            "CREATE INDEX ledger_entries_client_id_entry_id ON ledger_entries (client_id, entry_id)"
        )
        accounts = db.execute_sql(
            "SELECT client_id, available, held, used, updated_at FROM credit_accounts"
        ).fetchall()
        db.execute_sql("DROP TABLE credit_accounts")
        db.execute_sql(
            "CREATE TABLE credit_accounts (client_id VARCHAR(128) NOT NULL PRIMARY KEY, "
            "available INTEGER NOT NULL CHECK (available >= 0), held INTEGER NOT NULL CHECK (held >= 0), "
            "used INTEGER NOT NULL CHECK (used >= 0), updated_at BIGINT NOT NULL)"
        )
        for row in accounts:
            db.execute_sql(f"INSERT INTO credit_accounts VALUES ({', '.join([db.param] * 5)})", row)
        db.execute_sql("DROP TABLE programmes")
        db.execute_sql("UPDATE schema_version SET version = 4")
    storage.close()


def make_version_1(database_url: str, clock: FakeClock) -> str:
    """A database as the first release left it: no schema_version table, no audit principal, no
    invoice tables and no event tables, with one booked session in it. Returns the session's id."""
    running = start(Settings(listen="127.0.0.1:0", database_url=database_url), clock=clock)
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            session_id = book(kara, clock, timedelta(days=2))
    finally:
        running.stop(grace=0)
    downgrade_to_version_4(database_url)
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
    assert all(f"pending: {n}" in check.stdout for n in (2, 3, 4, 5, 6, 7, 8, 9)), check.stdout
    done = migrate_cli(database_url)
    assert done.returncode == 0, done.stderr
    assert all(f"applied {n}" in done.stdout for n in (2, 3, 4, 5, 6, 7, 8, 9)) and "(was 1)" in done.stdout
    again = migrate_cli(database_url)
    assert "nothing to do" in again.stdout

    running = start(Settings(listen="127.0.0.1:0", database_url=database_url), clock=clock)
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            kara.cancel(session_id, "client")
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


def test_a_version_4_database_upgrades_to_programmes_keeping_everything(
    database_url: str, clock: FakeClock
) -> None:
    """Today's data, from before programmes: every session, payment, ledger entry, invoice and
    event is kept, all of it in the default programme, under the window the server ran with."""
    window = timedelta(hours=48)
    running = start(
        Settings(listen="127.0.0.1:0", database_url=database_url, notice_window=window), clock=clock
    )
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            kara.grant_credits("client-1", 4)
            paid = kara.book("client-1", "pro-1", clock.now() + timedelta(hours=30)).session_id
            voided = kara.book("client-1", "pro-1", clock.now() + timedelta(days=4)).session_id
            booked = kara.book("client-1", "pro-1", clock.now() + timedelta(days=5)).session_id
            kara.cancel(paid, "client")  # 30 h notice, but the server ran with a 48-hour window
            kara.cancel(voided, "client")
            invoice = kara.create_invoice("pro-1", [paid]).invoice_id
            events = kara.list_events()
        before = db_snapshot(running)
    finally:
        running.stop(grace=0)
    downgrade_to_version_4(database_url)

    done = migrate_cli(database_url, "--notice-window-hours", "48")
    assert done.returncode == 0 and "applied 5" in done.stdout, done.stderr

    running = start(
        Settings(listen="127.0.0.1:0", database_url=database_url, notice_window=timedelta(hours=48)),
        clock=clock,
    )
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            for session_id in (paid, voided, booked):
                session = kara.get_session(session_id)
                assert session.programme_id == "default"
                assert session.terms.notice_window.ToTimedelta() == timedelta(hours=48)
                assert session.terms.professional_may_charge_late and session.terms.no_show_takes_credit
            account = kara.get_credit_account("client-1")
            assert (account.programme_id, account.available, account.held, account.used) == (
                "default",
                2,
                1,
                1,
            )
            assert [e.kind for e in account.entries][::-1] == [
                1,
                2,
                2,
                2,
                4,
                3,
            ]  # GRANT, 3 HOLD, TAKE, RETURN
            assert kara.get_invoice(invoice).line_count == 1
            assert kara.list_events()[: len(events)] == events
            default = kara.get_programme("default")
            assert default.notice_window.ToTimedelta() == timedelta(hours=48)
            # The upgraded sessions settle as they were promised.
            kara.cancel(booked, "client")
            assert kara.get_payment(booked).state == 2  # VOIDED: 4 days of notice
        after = db_snapshot(running)
    finally:
        running.stop(grace=0)
    for table in ("invoices", "invoice_lines", "invoice_audit"):
        assert after[table] == before[table], table

    def settled(tables: dict[str, list[dict[str, object]]]) -> list[tuple[object, object]]:
        return [
            (s["session_id"], s["payment_section"]) for s in tables["sessions"] if s["session_id"] != booked
        ]

    assert settled(after) == settled(before)
    assert len(after["ledger_entries"]) == len(before["ledger_entries"]) + 1
    assert_balances(after)


def assert_balances(tables: dict[str, list[dict[str, object]]]) -> None:
    for account in tables["credit_accounts"]:
        entries = [
            e
            for e in tables["ledger_entries"]
            if (e["client_id"], e["programme_id"]) == (account["client_id"], account["programme_id"])
        ]
        granted = sum(int(e["credits"]) for e in entries if e["kind"] == "GRANT")  # type: ignore[call-overload]
        assert int(account["available"]) + int(account["held"]) + int(account["used"]) == granted  # type: ignore[call-overload]


def test_a_version_6_database_upgrades_to_reschedules_keeping_every_row(
    database_url: str, clock: FakeClock
) -> None:
    """Every session (each state, a waiver, an invoice line), audit row, event, stored result,
    payment and programme is kept; every programme and every session booked before gets the
    article's rule: a late move charged, no grace after booking."""
    running = start(Settings(listen="127.0.0.1:0", database_url=database_url), clock=clock)
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            kara.create_programme(
                "employer", "Employer", timedelta(hours=48), professional_may_charge_late=False
            )
            kara.grant_credits("client-1", 5)
            kara.grant_credits("client-1", 1, programme_id="employer")
            starts = clock.now() + timedelta(hours=5)
            paid, voided, waived, booked = (
                kara.book("client-1", "pro-1", starts + timedelta(days=n)).session_id for n in (0, 2, 0, 3)
            )
            employer = kara.book("client-1", "pro-1", starts + timedelta(days=4), programme_id="employer")
            kara.cancel(paid, "client", reason="late")
            kara.cancel(voided, "client")
            kara.cancel(waived, "client")
            kara.waive_charge(waived, "goodwill")
            invoice = kara.create_invoice("pro-1", [paid]).invoice_id
        before = db_snapshot(running)
    finally:
        running.stop(grace=0)
    downgrade_to_version_6(database_url)

    done = migrate_cli(database_url)
    assert done.returncode == 0 and "applied 7" in done.stdout and "(was 6)" in done.stdout, done

    running = start(Settings(listen="127.0.0.1:0", database_url=database_url), clock=clock)
    try:
        after = db_snapshot(running)
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            for programme in kara.list_programmes().programmes:
                assert (
                    programme.late_reschedule == 1
                    and programme.cancellation_grace.ToTimedelta() == timedelta(0)
                )
            assert kara.get_invoice(invoice).line_count == 1
            # An upgraded session moves under the terms it was booked with.
            moved = kara.reschedule(employer.session_id, starts + timedelta(days=5), "client")
            assert moved.session.session_id == employer.session_id and len(moved.session.moves) == 1
            charged = kara.reschedule(booked, clock.now() + timedelta(hours=2), "client")
            assert not charged.HasField("charged")  # 3 days of notice: moved in place
    finally:
        running.stop(grace=0)
    new_columns = {column for names in V7_COLUMNS.values() for column in names}

    def without_new(rows: list[dict[str, object]]) -> list[dict[str, object]]:
        return [{k: v for k, v in row.items() if k not in new_columns} for row in rows]

    for table, rows in before.items():
        if table == "schema_version":
            continue
        assert without_new(after[table]) == without_new(rows), f"{table} changed in the upgrade"
    # The terms are stored once (schema version 9), each session and programme pointing to theirs.
    terms = {(t["programme_id"], t["terms_version"]): t for t in after["programme_terms"]}

    def rule(row: dict[str, object]) -> tuple[object, object]:
        t = terms[(row["programme_id"], row["terms_version"])]
        return t["late_reschedule"], t["cancellation_grace_us"]

    for session in after["sessions"]:
        assert (*rule(session), session["moves"]) == ("CHARGE", timedelta(0), None)
        assert session["rescheduled_from"] is None and session["rescheduled_to"] is None
    assert {p["programme_id"]: rule(p) for p in after["programmes"]} == {
        "default": ("CHARGE", timedelta(0)),
        "employer": ("CHARGE", timedelta(0)),
    }
    assert_balances(after)


def test_a_version_7_database_upgrades_to_the_payments_tab_on_sessions_keeping_every_payment(
    database_url: str, clock: FakeClock
) -> None:
    """Every payments row (each state and section: booked, voided, paid, waived, a charged and
    a free no-show, completed, on an invoice) is what GetPayment and ListPayments answer after
    the upgrade, the payments table is gone, and nothing else changed. A session whose payments
    row is missing gets the section its state says."""
    running = start(Settings(listen="127.0.0.1:0", database_url=database_url), clock=clock)
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            kara.create_programme("free", "Free no-shows", timedelta(hours=24), no_show_takes_credit=False)
            kara.grant_credits("client-1", 6)
            kara.grant_credits("client-1", 1, programme_id="free")
            soon = clock.now() + timedelta(hours=5)
            late, voided, waived, booked, shown = (
                kara.book("client-1", "pro-1", soon + timedelta(days=n)).session_id for n in (0, 2, 0, 3, 0)
            )
            free = kara.book("client-1", "pro-1", soon, programme_id="free").session_id
            kara.cancel(late, "client")
            kara.cancel(voided, "client")
            kara.cancel(waived, "client")
            kara.waive_charge(waived, "goodwill")
            kara.create_invoice("pro-1", [late])
            clock.advance(timedelta(hours=6))
            kara.mark_no_show(shown)
            kara.mark_no_show(free)
            ids = (late, voided, waived, booked, shown, free)
            answered = {i: kara.get_payment(i) for i in ids}
            listed = {s: kara.list_payments("pro-1", s).payments for s in ("unpaid", "paid")}
        before = db_snapshot(running)
    finally:
        running.stop(grace=0)
    downgrade_to_version_7(database_url)
    storage = open_storage(database_url)
    with storage.db.connection_context():
        rows = storage.db.execute_sql("SELECT session_id, state, section FROM payments").fetchall()
        storage.db.execute_sql(f"DELETE FROM payments WHERE session_id = {storage.db.param}", (shown,))
    storage.close()
    assert {r[0]: (r[1], r[2]) for r in rows} == {
        late: ("PAID", "PAID"),
        voided: ("VOIDED", "UNPAID"),
        waived: ("VOIDED", "UNPAID"),
        booked: ("PENDING", "UNPAID"),
        shown: ("PAID", "PAID"),
        free: ("VOIDED", "UNPAID"),
    }

    done = migrate_cli(database_url)
    assert done.returncode == 0 and "applied 8" in done.stdout and "(was 7)" in done.stdout, done

    running = start(Settings(listen="127.0.0.1:0", database_url=database_url), clock=clock)
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            assert {i: kara.get_payment(i) for i in ids} == answered
            assert {s: kara.list_payments("pro-1", s).payments for s in ("unpaid", "paid")} == listed
        after = db_snapshot(running)
        with running.storage.db.connection_context():
            assert "payments" not in running.storage.db.get_tables()
    finally:
        running.stop(grace=0)
    after.pop("schema_version")
    before.pop("schema_version")
    assert after == before


def test_a_version_7_database_upgrades_to_one_row_per_change_keeping_every_stored_result(
    database_url: str, clock: FakeClock
) -> None:
    """Each request_id's result moves onto its event's row; one whose event a shorter feed
    retention pruned already is kept behind the feed's start, where no cursor reaches it. Both
    replay after the upgrade, and the feed is the events it was."""
    running = start(Settings(listen="127.0.0.1:0", database_url=database_url), clock=clock)
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            kara.grant_credits("client-1", 2, request_id="grant")
            late = kara.book("client-1", "pro-1", clock.now() + timedelta(hours=5)).session_id
            voided = kara.book("client-1", "pro-1", clock.now() + timedelta(days=3)).session_id
            kara.cancel(late, "client", request_id="cancel-late")
            cancelled = kara.cancel(voided, "client", request_id="cancel-voided")
        before = db_snapshot(running)
    finally:
        running.stop(grace=0)
    downgrade_to_version_7(database_url)
    storage = open_storage(database_url)
    pruned = next(e for e in before["events"] if e["request_id"] == "cancel-voided")
    with storage.db.connection_context():
        results = storage.db.execute_sql("SELECT COUNT(*) FROM idempotency_keys").fetchone()[0]
        storage.db.execute_sql(
            f"DELETE FROM events WHERE event_id = {storage.db.param}", (pruned["event_id"],)
        )
    storage.close()
    assert results == len(before["events"]) == 5  # every change's result, as version 7 kept them

    done = migrate_cli(database_url)
    assert done.returncode == 0 and "applied 8" in done.stdout, done

    running = start(Settings(listen="127.0.0.1:0", database_url=database_url), clock=clock)
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            feed = kara.list_events()
            after = db_snapshot(running)
            assert kara.cancel(voided, "client", request_id="cancel-voided") == cancelled
            assert kara.cancel(late, "client", request_id="cancel-late").session.session_id == late
            with pytest.raises(KaraError) as reused:
                kara.cancel(voided, "professional", request_id="cancel-late")
            assert reused.value.reason == "REQUEST_ID_REUSED"
            assert db_snapshot(running) == after, "a replay changes nothing"
        with running.storage.db.connection_context():
            assert "idempotency_keys" not in running.storage.db.get_tables()
    finally:
        running.stop(grace=0)
    [carried] = [e for e in after["events"] if e["position"] < 0]
    after["events"].remove(carried)
    assert (carried["txid"], carried["type"], carried["request_id"], carried["data"]) == (
        0,
        "",
        "cancel-voided",
        pruned["data"],
    )
    assert after["events"] == [e for e in before["events"] if e != pruned]
    assert [e.event_id for e in feed] == [e["event_id"] for e in after["events"]]


def test_a_version_8_database_upgrades_to_terms_stored_once_keeping_what_each_session_was_promised(
    database_url: str, clock: FakeClock
) -> None:
    """A programme whose terms changed twice (and back) between bookings, one whose name alone
    changed, and the default programme: after the upgrade every session has the terms it was
    booked under (GetSession, GetPayment, ListSessions answer as before), every programme its
    current ones, each version is stored once, and a new booking gets the current terms."""
    running = start(Settings(listen="127.0.0.1:0", database_url=database_url), clock=clock)
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            ids = _terms_history(kara, clock)
            kara.cancel(ids[0], "client")
            sessions = {i: kara.get_session(i) for i in ids}
            payments = {i: kara.get_payment(i) for i in ids}
            listed = kara.list_sessions("pro-1").sessions
            programmes = {p: kara.get_programme(p) for p in ("p48", "named", "default")}
        before = db_snapshot(running)
    finally:
        running.stop(grace=0)
    assert sessions[ids[0]].terms.notice_window.ToTimedelta() == timedelta(hours=48)
    assert sessions[ids[3]].terms.notice_window.ToTimedelta() == timedelta(hours=72)
    downgrade_to_version_8(database_url)

    done = migrate_cli(database_url)
    assert done.returncode == 0 and "applied 9" in done.stdout and "(was 8)" in done.stdout, done

    running = start(Settings(listen="127.0.0.1:0", database_url=database_url), clock=clock)
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            assert {i: kara.get_session(i) for i in ids} == sessions
            assert {i: kara.get_payment(i) for i in ids} == payments
            assert kara.list_sessions("pro-1").sessions == listed
            assert {p: kara.get_programme(p) for p in programmes} == programmes
            # A booking now gets the programme's current terms.
            new = kara.book("client-1", "pro-1", clock.now() + timedelta(days=5), programme_id="p48")
            assert new.terms.notice_window.ToTimedelta() == timedelta(hours=48)
            assert new.terms.late_reschedule == sessions[ids[0]].terms.late_reschedule
        after = db_snapshot(running)
    finally:
        running.stop(grace=0)
    versions = {(r["programme_id"], r["terms_version"]) for r in after["programme_terms"]}
    # p48: 48 h, 72 h, then 48 h again (its current version); named and default: one each.
    assert versions == {("p48", 1), ("p48", 2), ("p48", 3), ("named", 1), ("default", 1)}
    assert {r["programme_id"]: r["terms_version"] for r in after["programmes"]} == {
        "p48": 3,
        "named": 1,
        "default": 1,
    }
    # Everything but the terms' bookkeeping (and the new booking) is as it was.
    for table in ("ledger_entries", "credit_accounts", "audit_log", "events", "invoices"):
        assert len(after[table]) >= len(before[table])
    assert [r for r in after["ledger_entries"] if r["entry_id"] <= len(before["ledger_entries"])] == before[
        "ledger_entries"
    ]


def test_a_version_9_database_upgrades_to_the_sponsors_terms_keeping_what_each_session_was_promised(
    database_url: str, clock: FakeClock
) -> None:
    """Issue 36: every version of terms stored before gets the new terms' defaults (the
    article's rule for a client's late cancellation, no limit on moves), so every session keeps
    what it was promised and nothing else changes."""
    running = start(Settings(listen="127.0.0.1:0", database_url=database_url), clock=clock)
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            ids = _terms_history(kara, clock)
            sessions = {i: kara.get_session(i) for i in ids}
            programmes = {p: kara.get_programme(p) for p in ("p48", "named", "default")}
        before = db_snapshot(running)
    finally:
        running.stop(grace=0)
    downgrade_to_version_9(database_url)

    done = migrate_cli(database_url)
    assert done.returncode == 0 and "applied 10" in done.stdout and "(was 9)" in done.stdout, done

    running = start(Settings(listen="127.0.0.1:0", database_url=database_url), clock=clock)
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            assert {i: kara.get_session(i) for i in ids} == sessions
            assert {p: kara.get_programme(p) for p in programmes} == programmes
            for session in sessions.values():
                assert session.terms.client_late_cancel == ppb.CLIENT_LATE_CANCEL_CHARGE
                assert session.terms.max_reschedules == 0
                assert session.terms.free_late_cancellations == 0
                assert session.terms.forgiveness_period.ToTimedelta() == timedelta(days=365)
                assert not session.no_show_forgiven and not session.settled_automatically
                assert session.terms.settle_unmarked_after.ToTimedelta() == timedelta(0)
            # Every account's credits are ones that never expire, shown as such a lot.
            for programme_id in ("p48", "named", "default"):
                account = kara.get_credit_account("client-1", programme_id=programme_id)
                [lot] = account.lots
                assert not lot.HasField("expire_time") and account.expired == 0
                assert (lot.available, lot.held, lot.used, lot.expired) == (
                    account.available,
                    account.held,
                    account.used,
                    0,
                )
                assert lot.granted == account.available + account.held + account.used
            # A late client cancellation is charged, as the article says.
            clock.advance(timedelta(days=4, hours=12))
            cancelled = kara.cancel(ids[1], "client")
            assert cancelled.session.state == pb.SESSION_STATE_CANCELLED_PAID
            assert not cancelled.session.cancellation.forgiven
        after = db_snapshot(running)
    finally:
        running.stop(grace=0)
    new = TERMS_SINCE_9
    year = timedelta(days=365)
    assert {tuple(r[k] for k in new) for r in after["programme_terms"]} == {
        ("CHARGE", 0, 0, year, timedelta(0), "COMPLETED")
    }

    def kept(rows: list[dict[str, object]]) -> list[dict[str, object]]:
        return [{k: v for k, v in r.items() if k not in new} for r in rows]

    assert kept(after["programme_terms"]) == kept(before["programme_terms"])
    for table in ("sessions", "programmes", "ledger_entries", "credit_accounts", "events"):
        assert len(after[table]) >= len(before[table])


def _terms_history(kara: SessionsClient, clock: FakeClock) -> list[str]:
    """Sessions booked between changes of their programmes' terms: p48 at 48 h, at 72 h (with
    free late moves), then at 48 h again; "named" renamed only; the default programme."""
    kara.create_programme("p48", "Forty-eight", timedelta(hours=48))
    kara.create_programme("named", "Named", timedelta(hours=24), no_show_takes_credit=False)
    kara.grant_credits("client-1", 3)
    kara.grant_credits("client-1", 5, programme_id="p48")
    kara.grant_credits("client-1", 1, programme_id="named")
    ahead = clock.now() + timedelta(days=5)

    def booked(programme: str) -> str:
        clock.advance(timedelta(minutes=1))
        return kara.book("client-1", "pro-1", ahead, programme_id=programme).session_id

    ids = [booked("p48"), booked("default"), booked("named")]
    kara.update_programme("p48", notice_window=timedelta(hours=72), late_reschedule="free")
    ids.append(booked("p48"))
    kara.update_programme("named", display_name="Renamed")
    kara.update_programme("p48", notice_window=timedelta(hours=48), late_reschedule="charge")
    ids.append(booked("p48"))
    return ids
