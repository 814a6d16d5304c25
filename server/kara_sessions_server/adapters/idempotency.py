"""request_id bookkeeping: the first result of a mutation is stored with the mutation, in the
same transaction, on the row of the change's event (Outbox.append writes both), so a retry
returns that result and moves nothing. The events table's unique request_id stops a replay."""

from __future__ import annotations

from datetime import datetime

from kara_sessions_server.adapters.storage import Sql, to_micros
from kara_sessions_server.service_layer.repositories import StoredResult

_FIND = "SELECT operation, fingerprint, data FROM events WHERE request_id = ?"


# Through the partial index on events.time of the rows still holding a request_id. The event
# stays in the feed; only its request_id (and what checks a replay against it) is forgotten.
_FORGET = (
    "UPDATE events SET request_id = NULL, operation = NULL, fingerprint = NULL WHERE position IN "
    "(SELECT position FROM events WHERE request_id IS NOT NULL AND time < ? LIMIT ?)"
)


class RequestLog:
    """The request_id records (on the rows of the events their requests told), on one database."""

    def __init__(self, sql: Sql):
        self._sql = sql

    def find(self, request_id: str) -> StoredResult | None:
        row = self._sql(_FIND, (request_id,)).fetchone()
        return None if row is None else StoredResult(*row)

    def prune(self, older_than: datetime, batch: int) -> int:
        """Forgets up to `batch` request_ids whose results were recorded before `older_than`."""
        return int(self._sql(_FORGET, (to_micros(older_than), batch)).rowcount)
