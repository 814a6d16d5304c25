"""Fills a database with N booked sessions (each in its Payments tab's Unpaid section), directly
(not through the API), for the growth runs: a tenth belong to one professional, so a list can be
paged deep, and the rest were booked over the year before NOW, most of them cancelled, completed
or missed a day later (a programme's report and simulation read a year of decisions)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from kara_sessions_server.adapters import migrations
from kara_sessions_server.adapters.storage import open_storage, to_micros
from kara_sessions_server.service_layer.pagination import encode

DEEP_PROFESSIONAL = "pro-deep"
_BASE = datetime(2027, 1, 1, tzinfo=UTC)
_BATCH = 20_000


# Of every ten sessions (the deep professional's, i % 10 == 0, stay booked for its list): what
# became of it, so a programme's report and simulation have a year of decisions to count.
# (state, cancelled_by, late, charge_client, payment_section, completed, no-show)
_FATES: dict[int, tuple[str, str | None, bool | None, bool | None, str, bool, bool]] = {
    1: ("CANCELLED_VOIDED", "CLIENT", False, False, "UNPAID", False, False),
    2: ("CANCELLED_PAID", "CLIENT", True, False, "PAID", False, False),
    3: ("CANCELLED_VOIDED", "PROFESSIONAL", True, False, "UNPAID", False, False),
    4: ("CANCELLED_PAID", "PROFESSIONAL", True, True, "PAID", False, False),
    5: ("COMPLETED", None, None, None, "PAID", True, False),
    6: ("COMPLETED", None, None, None, "PAID", True, False),
    7: ("NO_SHOW", None, None, None, "PAID", False, True),
}
_BOOKED: tuple[str, str | None, bool | None, bool | None, str, bool, bool] = (
    "BOOKED",
    None,
    None,
    None,
    "UNPAID",
    False,
    False,
)
# When the decisions were made: booked over the year before NOW, decided a day after booking.
NOW = datetime(2027, 1, 1, tzinfo=UTC)
YEAR = timedelta(days=365)
# The period a report over them covers: every booking and decision.
POPULATED_FROM, POPULATED_TO = NOW - YEAR, NOW + timedelta(days=2)


def _rows(n: int) -> Iterator[tuple[object, ...]]:
    for i in range(n):
        sid = str(uuid.UUID(int=i + 1))
        pro = DEEP_PROFESSIONAL if i % 10 == 0 else f"pro-{i % 997}"
        client = f"client-{i % 50_000}"
        starts = to_micros(_BASE + timedelta(minutes=i))
        booked = to_micros(NOW - YEAR + timedelta(seconds=(i * 7919) % int(YEAR.total_seconds())))
        state, by, late, charge, section, completed, no_show = _FATES.get(i % 10, _BOOKED)
        decided = booked + 86_400_000_000
        notice = (10 if late else 40) * 3_600_000_000
        yield (
            sid,
            client,
            pro,
            starts,
            booked,
            decided if state != "BOOKED" else booked,
            state,
            1 if state == "BOOKED" else 2,
            1,
            "default",
            1,
            section,
            by,
            decided if by else None,
            decided if by else None,
            notice if by else None,
            late,
            charge,
            False if by else None,
            decided if completed else None,
            decided if no_show else None,
        )


_SESSION_COLS = (
    "session_id, client_id, professional_id, starts_at, booked_at, updated_at, state, version, credits, "
    "programme_id, terms_version, payment_section, cancelled_by, cancelled_at, notified_at, notice_us, "
    "late, charge_client, within_grace, completed_at, no_show_at"
)


def populate(url: str, n: int) -> tuple[list[str], str]:
    """Creates the schema and N sessions. Returns a sample of session ids (for GetPayment) and a
    ListPayments page token half-way down the deep professional's Unpaid section."""
    storage = open_storage(url, max_connections=2)
    try:
        migrations.prepare(storage)
        with storage.db.connection_context(), storage.db.atomic():
            rows = _rows(n)
            while True:
                batch = [next(rows, None) for _ in range(_BATCH)]
                chunk = [b for b in batch if b is not None]
                if not chunk:
                    break
                _insert(storage.is_sqlite, storage.db, "sessions", _SESSION_COLS, chunk)
        if not storage.is_sqlite:
            with storage.db.connection_context():
                storage.db.execute_sql("ANALYZE")
    finally:
        storage.close()
    sample = [str(uuid.UUID(int=i + 1)) for i in range(0, n, max(1, n // 5000))]
    deep = [i for i in range(n) if i % 10 == 0]
    middle = deep[len(deep) // 2]
    key: list[str | int] = [to_micros(_BASE + timedelta(minutes=middle)), str(uuid.UUID(int=middle + 1))]
    token = encode(("payments", DEEP_PROFESSIONAL, "UNPAID"), key)
    return sample, token


def _insert(is_sqlite: bool, db: object, table: str, cols: str, rows: list[tuple[object, ...]]) -> None:
    conn = db.connection()  # type: ignore[attr-defined]
    if is_sqlite:
        marks = ", ".join("?" * len(rows[0]))
        conn.executemany(f"INSERT INTO {table} ({cols}) VALUES ({marks})", rows)
        return
    with conn.cursor() as cur, cur.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
