"""The transactional outbox: each committed change's event, written in the change's transaction,
read back in commit order after a cursor, and pruned after the retention period.

Why not order by a sequence alone: on PostgreSQL a transaction takes its sequence value when it
inserts, but commits later, so a transaction that took 41 can commit after one that took 42. A
reader that saw 42 and stored it as its cursor would never see 41. So each event also records
its transaction's id (pg_current_xact_id()), the feed is ordered by (txid, position), and a
reader only reads events below a horizon that no unfinished transaction of this database is
under: the oldest transaction its snapshot still sees running, unless it is known to be another
database's (pg_stat_activity), else the snapshot's xmax. Every transaction below the horizon has
finished, so nothing can ever appear below the cursor after it has passed. A transaction of
ours still open holds the feed back (it delays, it never loses); one in another database of the
cluster does not (issue 33). Without the right to see other users' backends (superuser or
pg_read_all_stats), their transactions count as ours: later, never lost. On SQLite one writer
at a time commits in position order, so txid is 0 and position alone is the order.

The cursor is opaque to callers: base64 of `txid.position`."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

import peewee as pw

from kara_sessions_server.adapters.storage import Sql, from_micros, to_micros
from kara_sessions_server.domain.errors import CursorExpired
from kara_sessions_server.domain.feed import Change, EventType
from kara_sessions_server.service_layer.repositories import (
    Cursor,
    DuplicateRequestId,
    RequestRecord,
    StoredEvent,
)

_COLUMNS = (
    "(txid, event_id, type, subject, professional_id, client_id, time, data, request_id, operation, "
    "fingerprint)"
)
_APPEND_SQLITE = f"INSERT INTO events {_COLUMNS} VALUES (0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_APPEND_POSTGRES = (
    f"INSERT INTO events {_COLUMNS} VALUES (pg_current_xact_id()::text::bigint, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Only transactions that have finished: see the module's docstring. pg_stat_activity shows a
# backend's xid as a 32-bit xid, the snapshot as a 64-bit one (with its epoch).
_HORIZON_POSTGRES = (
    "txid < COALESCE((SELECT min(x::text::bigint) FROM pg_snapshot_xip(pg_current_snapshot()) AS x "
    "WHERE mod(x::text::bigint, 4294967296) NOT IN (SELECT backend_xid::text::bigint FROM pg_stat_activity "
    "WHERE backend_xid IS NOT NULL AND datname IS DISTINCT FROM current_database())), "
    "pg_snapshot_xmax(pg_current_snapshot())::text::bigint)"
)
_SELECT = "SELECT txid, position, event_id, type, subject, time, data FROM events"
_PRUNED = "SELECT pruned_txid, pruned_position FROM event_retention WHERE id = 1"
# Only ever forward: a request_id record behind the feed's start (below) pruned after the
# events must not make an expired cursor look valid again.
_MARK_PRUNED = (
    "INSERT INTO event_retention (id, pruned_txid, pruned_position, updated_at) VALUES (1, ?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET pruned_txid = excluded.pruned_txid, "
    "pruned_position = excluded.pruned_position, updated_at = excluded.updated_at "
    "WHERE (event_retention.pruned_txid, event_retention.pruned_position) "
    "< (excluded.pruned_txid, excluded.pruned_position)"
)
# Every event is after this: on SQLite positions start at 1, on PostgreSQL txids are positive.
# Below it are only request_id records that schema version 8 carried over without their
# (already pruned) events (migrations._v8_move_request_ids): no cursor reaches them.
_FEED_START = Cursor(0, 0)


class Outbox:
    """The event feed, each event its change's record, on one database."""

    def __init__(self, sql: Sql):
        self._sql = sql

    def append(self, change: Change, data: str, now: datetime, request: RequestRecord) -> None:
        """Adds the event of `change` to the transaction that makes the change, as the record of
        `request`: a second append with the same request_id fails on the unique key (the only
        key an insert of a new event can meet: event_id is new, position the database's)."""
        try:
            self._sql(
                _APPEND_SQLITE if self._sql.on_sqlite else _APPEND_POSTGRES,
                (
                    str(uuid.uuid4()),
                    change.type.value,
                    change.subject,
                    change.professional_id,
                    change.client_id,
                    to_micros(now),
                    data,
                    request.request_id,
                    request.operation,
                    request.fingerprint,
                ),
            )
        except pw.IntegrityError as exc:
            raise DuplicateRequestId(f"request_id {request.request_id!r} is recorded already") from exc

    def read(
        self,
        after: Cursor | None,
        limit: int,
        types: Sequence[EventType] = (),
        professional_id: str | None = None,
        client_id: str | None = None,
    ) -> list[StoredEvent]:
        """Up to `limit` events after the cursor in feed order, among those whose transactions have
        finished; refuses a cursor older than the events still kept."""
        where: list[str] = [] if self._sql.on_sqlite else [_HORIZON_POSTGRES]
        start = after or _FEED_START
        where.append("(txid, position) > (?, ?)")
        params: list[object] = [start.txid, start.position]
        for column, value in (("professional_id", professional_id), ("client_id", client_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if types:
            where.append(f"type IN ({', '.join('?' * len(types))})")
            params += [t.value for t in types]
        text = f"{_SELECT} {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY txid, position LIMIT ?"
        rows = self._sql(text, (*params, limit)).fetchall()
        # Checked after reading: on PostgreSQL each statement has its own snapshot, and a prune that
        # committed before the read above is visible here, so a skipped event is always noticed.
        if after is not None:
            pruned = self.pruned_through()
            if pruned is not None and after < pruned:
                raise CursorExpired(
                    "this cursor is older than the events the server keeps (they are pruned after the "
                    "retention period): resynchronise from the current state, then continue from an "
                    "empty cursor",
                    metadata={"after": after.encode(), "oldest_kept_after": pruned.encode()},
                )
        return [
            StoredEvent(Cursor(txid, position), event_id, EventType(kind), subject, from_micros(at), data)
            for txid, position, event_id, kind, subject, at, data in rows
        ]

    def pruned_through(self) -> Cursor | None:
        row = self._sql(_PRUNED).fetchone()
        return None if row is None else Cursor(int(row[0]), int(row[1]))

    def prune(self, older_than: datetime, request_ids_older_than: datetime, batch: int, now: datetime) -> int:
        """Deletes up to `batch` of the oldest events, in feed order, that are older than
        `older_than` and whose request_id, if they still hold one, is older than
        `request_ids_older_than`, and remembers the newest one deleted. Returns how many it deleted."""
        where = "" if self._sql.on_sqlite else f"WHERE {_HORIZON_POSTGRES}"
        head = self._sql(
            f"SELECT txid, position, time, request_id FROM events {where} ORDER BY txid, position LIMIT ?",
            (batch,),
        )
        cutoff, requests_cutoff = to_micros(older_than), to_micros(request_ids_older_than)
        last = None
        # The feed is pruned from its head only, up to the first event still to be kept, so what is
        # gone is always everything at or before one cursor. An event whose request_id a replay may
        # still ask for (a --request-id-retention-days longer than the feed's) is kept until then.
        for txid, position, at, request_id in head.fetchall():
            if at >= cutoff or (request_id is not None and at >= requests_cutoff):
                break
            last = Cursor(txid, position)
        if last is None:
            return 0
        deleted: int = self._sql(
            "DELETE FROM events WHERE (txid, position) <= (?, ?)", (last.txid, last.position)
        ).rowcount
        self._sql(_MARK_PRUNED, (last.txid, last.position, to_micros(now)))
        return deleted
