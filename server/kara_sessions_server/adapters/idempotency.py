"""request_id bookkeeping: the first result of a mutation is stored with the mutation, in the
same transaction, so a retry returns that result and moves nothing."""

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


_FIND = "SELECT operation, fingerprint, result FROM idempotency_keys WHERE request_id = ?"
_RECORD = (
    "INSERT INTO idempotency_keys (request_id, operation, fingerprint, result, created_at) "
    "VALUES (?, ?, ?, ?, ?)"
)


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


def record(request_id: str, operation: str, fp: str, result: str, now: datetime) -> None:
    sql(_RECORD, (request_id, operation, fp, result, to_micros(now)))


_PRUNE = (
    "DELETE FROM idempotency_keys WHERE request_id IN "
    "(SELECT request_id FROM idempotency_keys WHERE created_at < ? LIMIT ?)"
)


def prune(older_than: datetime, batch: int) -> int:
    """Forgets up to `batch` stored results recorded before `older_than`."""
    return int(sql(_PRUNE, (to_micros(older_than), batch)).rowcount)
