"""A request_id's fingerprint: what its record keeps of the request, to tell a retry (the same
request again: its first result is the answer) from a reuse (another request under the same
request_id: refused).

It is drawn from the request itself, the use case's command, field by field, so no field can be
left out of it by hand. A field at its declared default is left out: a field added to a command
later, with a default, leaves the fingerprints of the requests already stored as they were, and
a retry across the deploy still replays."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from kara_sessions_server.domain.principal import Principal

# The one field that names the request rather than saying what it asks.
_REQUEST_ID = "request_id"
# The caller's place among a request's fields (a field of that name would clash: none has it).
_PRINCIPAL = "principal"
_NO_DEFAULT = dataclasses.MISSING

# Per command class, once: each field's name and its default (MISSING when it has none).
_FIELDS: dict[type, tuple[tuple[str, object], ...]] = {}


def fingerprint(operation: str, request: object, who: Principal) -> str:
    """The fingerprint of `request` (a command dataclass) made by `who` as `operation`. The
    caller is part of it: another principal's request_id replays nothing of theirs."""
    return _digest(operation, _fields(request, str(who)))


def legacy_fingerprint(operation: str, request: object, who: Principal) -> str:
    """The fingerprint 0.10.0 and earlier stored: the same but for a nested record (a
    programme's terms, an update's changes), which it hashed as its repr, so that a field added
    to that record changed the fingerprint. Compared only when the fingerprint above does not
    match; what it made ages out after --request-id-retention-days, and this function with it."""
    return _digest(operation, _fields(request, str(who), nested=False))


def _digest(operation: str, params: dict[str, Any]) -> str:
    # The keys are in sorted order already (_declared), as 0.10.0's sort_keys=True wrote them.
    canonical = json.dumps([operation, params], default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _fields(record: object, principal: str | None = None, nested: bool = True) -> dict[str, Any]:
    """The record's fields not at their defaults, by name in sorted order (with the principal,
    for a request). Enums are StrEnums, which json writes as their values; tuples as lists;
    times and durations by str() (json's default). Only a nested record is taken apart here."""
    kept: dict[str, Any] = {}
    for name, default in _declared(type(record)):
        if name is _PRINCIPAL:
            if principal is not None:
                kept[name] = principal
            continue
        value = getattr(record, name)
        if default is not _NO_DEFAULT and value == default:
            continue
        if hasattr(value, "__dataclass_fields__"):
            value = _fields(value) if nested else _repr_0_10(value)
        kept[name] = value
    return kept


# The fields each nested record had in 0.10.0, whose repr its fingerprints hashed: a term added
# since (issue 36) is left out of the repr while it is at its default, as 0.10.0 never knew it.
FIELDS_0_10 = {
    "Terms": (
        "notice_window",
        "professional_may_charge_late",
        "no_show_takes_credit",
        "late_reschedule",
        "cancellation_grace",
    ),
    "ProgrammeChanges": (
        "display_name",
        "notice_window",
        "professional_may_charge_late",
        "no_show_takes_credit",
        "late_reschedule",
        "cancellation_grace",
    ),
}


def _repr_0_10(record: Any) -> str:
    """The repr 0.10.0 hashed for `record`: the dataclass's own, over the fields it then had. A
    record using anything newer cannot be a 0.10.0 request: its full repr, which matches none."""
    old = FIELDS_0_10.get(type(record).__name__)
    if old is None:
        return repr(record)
    for name, default in _declared(type(record)):
        if name not in old and name is not _PRINCIPAL and getattr(record, name) != default:
            return repr(record)
    shown = ", ".join(f"{name}={getattr(record, name)!r}" for name in old)
    return f"{type(record).__qualname__}({shown})"


def _declared(cls: type) -> tuple[tuple[str, object], ...]:
    """Each field but request_id, with its default (MISSING when it has none), and the
    principal's place among them: sorted by name, once per class."""
    found = _FIELDS.get(cls)
    if found is None:
        fields = [
            (f.name, f.default if f.default_factory is _NO_DEFAULT else f.default_factory())
            for f in dataclasses.fields(cls)
            if f.name != _REQUEST_ID
        ]
        found = _FIELDS[cls] = tuple(sorted([*fields, (_PRINCIPAL, _NO_DEFAULT)], key=lambda f: f[0]))
    return found
