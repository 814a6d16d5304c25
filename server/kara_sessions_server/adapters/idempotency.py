"""request_id bookkeeping: the first result of a mutation is stored with the mutation, in the
same transaction, on the row of the change's event (outbox.append writes both), so a retry
returns that result and moves nothing. The events table's unique request_id stops a replay."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from kara_sessions_server.adapters.storage import sql, to_micros
from kara_sessions_server.domain.errors import RequestIdReused


@dataclass(frozen=True, slots=True)
class StoredResult:
    operation: str
    fingerprint: str
    result: str


def fingerprint(operation: str, params: Mapping[str, object]) -> str:
    canonical = json.dumps([operation, params], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


_FIND = "SELECT operation, fingerprint, data FROM events WHERE request_id = ?"


def find(request_id: str) -> StoredResult | None:
    row = sql(_FIND, (request_id,)).fetchone()
    return None if row is None else StoredResult(*row)


def check_same_request(stored: StoredResult, request_id: str, operation: str, fp: str) -> str:
    """The stored result, if `request_id` was first used for this very request."""
    if stored.operation != operation or stored.fingerprint != fp:
        raise RequestIdReused.single(
            "request_id",
            f"{request_id!r} was already used for a {stored.operation} request with other parameters "
            "or by another caller; use a new request_id for a new request",
        )
    return stored.result


# Through the partial index on events.time of the rows still holding a request_id. The event
# stays in the feed; only its request_id (and what checks a replay against it) is forgotten.
_FORGET = (
    "UPDATE events SET request_id = NULL, operation = NULL, fingerprint = NULL WHERE position IN "
    "(SELECT position FROM events WHERE request_id IS NOT NULL AND time < ? LIMIT ?)"
)


def prune(older_than: datetime, batch: int) -> int:
    """Forgets up to `batch` request_ids whose results were recorded before `older_than`."""
    return int(sql(_FORGET, (to_micros(older_than), batch)).rowcount)
