"""Fills a database with N booked sessions (each in its Payments tab's Unpaid section), directly
(not through the API), for the growth runs: a tenth belong to one professional, so a list can be
paged deep."""

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


def _rows(n: int) -> Iterator[tuple[object, ...]]:
    now = to_micros(datetime.now(UTC))
    for i in range(n):
        sid = str(uuid.UUID(int=i + 1))
        pro = DEEP_PROFESSIONAL if i % 10 == 0 else f"pro-{i % 997}"
        client = f"client-{i % 50_000}"
        starts = to_micros(_BASE + timedelta(minutes=i))
        yield (
            sid,
            client,
            pro,
            starts,
            now,
            now,
            "BOOKED",
            1,
            1,
            "default",
            1,
            "UNPAID",
        )


_SESSION_COLS = (
    "session_id, client_id, professional_id, starts_at, booked_at, updated_at, state, version, credits, "
    "programme_id, terms_version, payment_section"
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
