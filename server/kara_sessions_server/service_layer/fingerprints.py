"""A request_id's fingerprint: what its record keeps of the request, to tell a retry (the same
request again: its first result is the answer) from a reuse (another request under the same
request_id: refused).

It is drawn from the request itself, the use case's command, field by field, so no field can be
left out of it by hand. A field at its declared default is left out: a field added to a command
later, with a default, leaves the fingerprints of the requests already stored as they were, and
a retry across the deploy still replays."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from typing import Any

from kara_sessions_server.domain.principal import Principal

# The one field that names the request rather than saying what it asks.
_REQUEST_ID = "request_id"
_NO_DEFAULT = dataclasses.MISSING

# Per command class, once: each field's name and its default (MISSING when it has none).
_FIELDS: dict[type, tuple[tuple[str, object], ...]] = {}


def fingerprint(operation: str, request: object, who: Principal) -> str:
    """The fingerprint of `request` (a command dataclass) made by `who` as `operation`. The
    caller is part of it: another principal's request_id replays nothing of theirs."""
    return _digest(operation, {**_fields(request), "principal": str(who)})


def legacy_fingerprint(operation: str, request: object, who: Principal) -> str:
    """The fingerprint 0.10.0 and earlier stored: the same but for a nested record (a
    programme's terms, an update's changes), which it hashed as its repr, so that a field added
    to that record changed the fingerprint. Compared only when the fingerprint above does not
    match; what it made ages out after --request-id-retention-days, and this function with it."""
    return _digest(operation, {**_fields(request, nested=False), "principal": str(who)})


def _digest(operation: str, params: dict[str, Any]) -> str:
    canonical = json.dumps([operation, params], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _fields(record: object, nested: bool = True) -> dict[str, Any]:
    kept = {}
    for name, default in _declared(type(record)):
        value = getattr(record, name)
        if name == _REQUEST_ID or (default is not _NO_DEFAULT and value == default):
            continue
        kept[name] = _plain(value) if nested else value
    return kept


def _plain(value: Any) -> Any:
    """A value as JSON holds it: records as their fields, enums by value, tuples as lists; times
    and durations by str() (through json's default)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _fields(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _declared(cls: type) -> tuple[tuple[str, object], ...]:
    found = _FIELDS.get(cls)
    if found is None:
        found = _FIELDS[cls] = tuple(
            (f.name, f.default if f.default_factory is _NO_DEFAULT else f.default_factory())
            for f in dataclasses.fields(cls)
        )
    return found
