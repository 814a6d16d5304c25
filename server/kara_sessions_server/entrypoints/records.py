"""Each record's fields are declared once, by its domain dataclass (Session, Terms, Cancellation,
Move, Waiver, Payment, Programme, Invoice, InvoiceLine, CreditAccount, LedgerEntry); this
module checks that every other spelling of it keeps every field: its table row, its stored
snapshot (a replay's result, an event's data) and its protobuf message.

Two samples of each record are made from the dataclass's own fields, every field set and
different between the two. A row and a snapshot must give each sample back as it was; a message
must differ between the two at every field the record sends, so a field added to the dataclass
and forgotten in a mapping fails here. `start()` runs it before serving and `make lint` runs
this module (`python -m kara_sessions_server.entrypoints.records`)."""

from __future__ import annotations

import dataclasses
import enum
import functools
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf.message import Message

from kara_sessions_server.adapters import invoice_repository, programme_repository, session_repository
from kara_sessions_server.domain.model import (
    CreditAccount,
    Invoice,
    InvoiceLine,
    LedgerEntry,
    Payment,
    Session,
)
from kara_sessions_server.domain.programme import Programme, Terms
from kara_sessions_server.entrypoints.grpc import convert
from kara_sessions_server.service_layer import snapshots

_BASE_TIME = datetime(2027, 3, 1, 9, 0, tzinfo=UTC)


class RecordDrift(RuntimeError):
    """A record's field is missing from one of its other spellings."""


def sample(cls: type, variant: int, path: str = "") -> Any:
    """An instance of the dataclass `cls` with every field set; samples 0 and 1 differ in every
    field (whole seconds apart, so that a message's seconds tell them apart too)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.compare:  # a helper carried along (CreditAccount.entries_after), not data
            continue
        values[f.name] = _value(hints[f.name], variant, f"{path}{f.name}")
    made = cls(**values)
    # An invoice's count and total follow from its lines.
    return made.with_lines(made.lines) if isinstance(made, Invoice) else made


def _value(kind: Any, variant: int, path: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        [inner] = [k for k in typing.get_args(kind) if k is not type(None)]
        return _value(inner, variant, path)
    if origin is tuple:
        return tuple(_value(typing.get_args(kind)[0], variant, f"{path}.{n}") for n in range(variant + 1))
    if dataclasses.is_dataclass(kind):
        return sample(kind, variant, f"{path}.")  # type: ignore[arg-type]
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        members = list(kind)
        return members[-1 - variant] if len(members) > 1 else members[0]
    if kind is bool:
        return variant == 0
    if kind is int:
        return 2 + variant
    if kind is str:
        return f"{path}-{variant}"
    if kind is datetime:
        return _BASE_TIME + timedelta(hours=variant, seconds=len(path))
    if kind is timedelta:
        return timedelta(hours=2 + variant, seconds=len(path))
    raise TypeError(f"no sample for {path}: {kind!r}")


def _leaves(cls: type, prefix: str = "") -> Iterator[str]:
    """Each field's path; a nested record's own fields; a list of records is one field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.compare:
            continue
        kind = hints[f.name]
        args = [k for k in typing.get_args(kind) if k is not type(None)]
        inner = args[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) else kind
        if dataclasses.is_dataclass(inner):
            yield from _leaves(inner, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        else:
            yield f"{prefix}{f.name}"


def round_trip(
    name: str,
    cls: type,
    there: Callable[[Any], Any],
    back: Callable[[Any], Any],
    kept_back: Sequence[str] = (),
) -> list[str]:
    """What `back(there(record))` loses of either sample (but the fields `kept_back`)."""
    lost = []
    for variant in (0, 1):
        record = sample(cls, variant)
        returned = back(there(record))
        lost += [
            f"{name}: {path} is not kept"
            for path in _leaves(cls)
            if path not in kept_back and _at(returned, path) != _at(record, path)
        ]
    return sorted(set(lost))


def unsent(
    name: str,
    cls: type,
    to_message: Callable[[Any], Message],
    renamed: dict[str, str] | None = None,
    kept_back: Sequence[str] = (),
) -> list[str]:
    """The fields of `cls` that `to_message` does not send: the two samples' messages are the
    same there. `renamed` maps a field's path to the message's where they differ (a record's
    own name for it, a unit); `kept_back` names the fields that no message carries, and why
    is the caller's to say."""
    first, second = to_message(sample(cls, 0)), to_message(sample(cls, 1))
    missing = []
    for path in _leaves(cls):
        if path in kept_back:
            continue
        where = (renamed or {}).get(path, path)
        if _at(first, where) == _at(second, where):
            missing.append(f"{name}: {path} is not sent (as {where})")
    return missing


def _at(value: Any, path: str) -> Any:
    for name in path.split("."):
        value = getattr(value, name, _MISSING)
        if value is _MISSING:
            return _MISSING
    if isinstance(value, Message):
        return value.SerializeToString(deterministic=True)
    return list(value) if isinstance(value, tuple) or hasattr(value, "extend") else value


_MISSING = object()


def _session_row(s: Session) -> tuple[list[object], Terms]:
    """The sessions row, and the terms the row points to (a version in programme_terms)."""
    row = session_repository.row_values(s)
    return [row[column] for column in session_repository.COLUMN_NAMES], s.terms


def _session_from_row(stored: tuple[list[object], Terms]) -> Session:
    row, terms = stored
    return session_repository.session_from_row(row, lambda programme_id, version: terms)


def problems() -> list[str]:
    """Every field of every record that one of its spellings leaves out."""
    # A Programme message carries its terms as fields of its own, by the same names.
    terms_as_programme = {f"terms.{f.name}": f.name for f in dataclasses.fields(Terms)}
    notice_in_seconds = {"cancellation.notice": "cancellation.notice_seconds"}
    found = [
        # Tables.
        *round_trip("sessions row", Session, _session_row, _session_from_row),
        *round_trip(
            "programmes row", Programme, programme_repository.row_values, programme_repository.from_row
        ),
        *round_trip(
            "invoice_lines row",
            InvoiceLine,
            invoice_repository.line_row_values,
            invoice_repository.line_from_row,
        ),
        # An invoice's lines are rows of their own (below); its count and total are summed.
        *round_trip(
            "invoices row",
            Invoice,
            invoice_repository.row_values,
            invoice_repository.from_row,
            kept_back=["lines", "line_count", "total_credits"],
        ),
        # Snapshots: a replay's stored result and an event's data.
        *round_trip("session snapshot", Session, snapshots.dump_session, snapshots.load_session),
        *round_trip("programme snapshot", Programme, snapshots.dump_programme, snapshots.load_programme),
        *round_trip("invoice snapshot", Invoice, snapshots.dump_invoice, snapshots.load_invoice),
        # GrantCredits answers with the balance alone; a page of entries is GetCreditAccount's.
        *round_trip(
            "account snapshot",
            CreditAccount,
            snapshots.dump_account,
            snapshots.load_account,
            kept_back=["entries", "next_page_token"],
        ),
        # Messages.
        # Which version of its programme's terms a session or programme holds is the server's own
        # bookkeeping; the terms themselves are sent.
        *unsent(
            "Session message",
            Session,
            convert.session_pb,
            {
                **notice_in_seconds,
                "credit_expires_at": "credit_expire_time",
                # The one figure of its decision (decisions.py) the session alone records.
                "forgiveness_used": "decision.forgiveness_used",
            },
            ["version", "terms_version"],
        ),
        *unsent("Payment message", Payment, convert.payment_pb, notice_in_seconds),
        *unsent(
            "Programme message",
            Programme,
            convert.programme_pb,
            {
                **terms_as_programme,
                "created_at": "create_time",
                "updated_at": "update_time",
                "version": "etag",
            },
            kept_back=["terms_version"],
        ),
        *unsent("Invoice message", Invoice, convert.invoice_pb, kept_back=["version"]),
        # A ledger entry is listed under its account, whose client it names already.
        *unsent("CreditAccount message", CreditAccount, convert.account_pb),
        *unsent(
            "LedgerEntry message",
            LedgerEntry,
            convert.ledger_entry_pb,
            {"expires_at": "expire_time"},
            kept_back=["client_id"],
        ),
    ]
    return found


def check() -> None:
    """Raises RecordDrift naming every field some spelling of its record leaves out."""
    found = problems()
    if found:
        raise RecordDrift("records out of step with their dataclasses:\n  " + "\n  ".join(found))


@functools.cache
def check_once() -> None:
    """check(), once per process (about 20 ms): the code cannot change while it runs."""
    check()


if __name__ == "__main__":
    try:
        check()
    except RecordDrift as drift:
        sys.exit(str(drift))
    print("records: every field of every record is in its rows, snapshots and messages")
