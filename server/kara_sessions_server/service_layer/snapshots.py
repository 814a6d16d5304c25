"""JSON snapshots of domain results, stored with a request_id so a retry gets the first answer."""

from __future__ import annotations

import dataclasses
import enum
import json
import typing
from datetime import datetime, timedelta
from typing import Any

from kara_sessions_server.domain.clock import MICROSECOND
from kara_sessions_server.domain.model import (
    Cancellation,
    CreditAccount,
    CreditLot,
    Invoice,
    InvoiceLine,
    InvoiceState,
    Move,
    PaidReason,
    Party,
    Payment,
    Rescheduled,
    Session,
    SessionState,
    Waiver,
)
from kara_sessions_server.domain.programme import (
    DEFAULT_PROGRAMME_ID,
    DEFAULT_TERMS,
    Programme,
    Terms,
)
from kara_sessions_server.service_layer.fingerprints import FIELDS_0_10


def _dt(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _parse_dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _cancellation(c: Cancellation | None) -> dict[str, Any] | None:
    if c is None:
        return None
    d = {
        "cancelled_by": c.cancelled_by.value,
        "cancelled_at": _dt(c.cancelled_at),
        "notified_at": _dt(c.notified_at),
        "notice_us": c.notice // MICROSECOND,
        "late": c.late,
        "charge_client": c.charge_client,
        "reason": c.reason,
        "within_grace": c.within_grace,
    }
    if c.forgiven:  # since 0.10.0: written only when set (_TERMS_OMITTED_AT says why)
        d["forgiven"] = True
    return d


def _load_cancellation(d: dict[str, Any] | None) -> Cancellation | None:
    if d is None:
        return None
    return Cancellation(
        cancelled_by=Party(d["cancelled_by"]),
        cancelled_at=datetime.fromisoformat(d["cancelled_at"]),
        notified_at=datetime.fromisoformat(d["notified_at"]),
        notice=MICROSECOND * d["notice_us"],
        late=d["late"],
        charge_client=d["charge_client"],
        reason=d["reason"],
        within_grace=d.get("within_grace", False),
        forgiven=d.get("forgiven", False),
    )


def _move(m: Move) -> dict[str, Any]:
    return {
        "moved_at": _dt(m.moved_at),
        "from_starts_at": _dt(m.from_starts_at),
        "to_starts_at": _dt(m.to_starts_at),
        "moved_by": m.moved_by.value,
        "notified_at": _dt(m.notified_at),
        "notice_us": m.notice // MICROSECOND,
        "late": m.late,
        "within_grace": m.within_grace,
        "reason": m.reason,
    }


def _load_move(d: dict[str, Any]) -> Move:
    return Move(
        moved_at=datetime.fromisoformat(d["moved_at"]),
        from_starts_at=datetime.fromisoformat(d["from_starts_at"]),
        to_starts_at=datetime.fromisoformat(d["to_starts_at"]),
        moved_by=Party(d["moved_by"]),
        notified_at=datetime.fromisoformat(d["notified_at"]),
        notice=MICROSECOND * d["notice_us"],
        late=d["late"],
        within_grace=d["within_grace"],
        reason=d["reason"],
    )


def _session(s: Session) -> dict[str, Any]:
    d = {
        "session_id": s.session_id,
        "client_id": s.client_id,
        "professional_id": s.professional_id,
        "starts_at": _dt(s.starts_at),
        "booked_at": _dt(s.booked_at),
        "updated_at": _dt(s.updated_at),
        "state": s.state.value,
        "version": s.version,
        "credits": s.credits,
        "cancellation": _cancellation(s.cancellation),
        "completed_at": _dt(s.completed_at),
        "programme_id": s.programme_id,
        "terms": _terms(s.terms),
        "no_show_at": _dt(s.no_show_at),
        "waiver": None
        if s.waiver is None
        else {
            "waived_at": _dt(s.waiver.waived_at),
            "waived_by": s.waiver.waived_by,
            "reason": s.waiver.reason,
        },
        "moves": [_move(m) for m in s.moves],
        "rescheduled_from": s.rescheduled_from,
        "rescheduled_to": s.rescheduled_to,
        "terms_version": s.terms_version,
    }
    # Since 0.10.0: written only when set (_TERMS_OMITTED_AT says why).
    if s.no_show_forgiven:
        d["no_show_forgiven"] = True
    if s.settled_automatically:
        d["settled_automatically"] = True
    if s.credit_expires_at is not None:
        d["credit_expires_at"] = _dt(s.credit_expires_at)
    if s.forgiveness_used:
        d["forgiveness_used"] = s.forgiveness_used
    return d


def _key(name: str, kind: Any) -> str:
    """A field's key: its name, with the unit for a duration (stored as integer microseconds)."""
    return f"{name}_us" if kind is timedelta else name


# A programme's terms, flat: each field of Terms under its key, drawn from the dataclass (a new
# term needs no edit here). The same keys name programme_terms' columns.
_TERMS_FIELDS = tuple((f.name, typing.get_type_hints(Terms)[f.name]) for f in dataclasses.fields(Terms))
TERMS_KEYS = tuple(_key(name, kind) for name, kind in _TERMS_FIELDS)


_ALWAYS = object()


def terms_values(t: Terms) -> tuple[object, ...]:
    """The terms' values in TERMS_KEYS' order: durations in microseconds, enums by value."""
    out: list[object] = []
    for name, kind in _TERMS_FIELDS:
        value = getattr(t, name)
        out.append(value // MICROSECOND if kind is timedelta else getattr(value, "value", value))
    return tuple(out)


def terms_from(values: dict[str, Any]) -> Terms:
    """Terms from their keys; a key missing (a result stored before that term existed) is the
    term's default, what every session booked before it was promised."""
    found: dict[str, Any] = {}
    for (name, kind), key in zip(_TERMS_FIELDS, TERMS_KEYS, strict=True):
        if key not in values:
            continue
        value = values[key]
        if kind is timedelta:
            value = MICROSECOND * value
        elif kind is bool:
            value = bool(value)  # SQLite keeps a boolean as 0 or 1
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            value = kind(value)
        found[name] = value
    return Terms(**found)


# A term added since 0.10.0 is stored only when it is not at its default, which a missing key
# means (terms_from): every event and stored result carries a session's terms, and with six such
# terms, nearly always at their defaults, a cancellation's record grew by a quarter and SQLite's
# writing of it by 6% of the cancellation's instructions (BENCHMARKS.md). 0.10.0's terms are
# always written, for a reader of that version.
_TERMS_OMITTED_AT = {
    key: default
    for key, (name, _), default in zip(TERMS_KEYS, _TERMS_FIELDS, terms_values(DEFAULT_TERMS), strict=True)
    if name not in FIELDS_0_10["Terms"]
}


def _terms(t: Terms) -> dict[str, Any]:
    return {
        key: value
        for key, value in zip(TERMS_KEYS, terms_values(t), strict=True)
        if _TERMS_OMITTED_AT.get(key, _ALWAYS) != value
    }


def _load_terms(d: dict[str, Any] | None) -> Terms:
    """Results stored before programmes have none: those sessions were booked under the defaults."""
    return DEFAULT_TERMS if d is None else terms_from(d)


def _load_waiver(d: dict[str, Any] | None) -> Waiver | None:
    if d is None:
        return None
    return Waiver(datetime.fromisoformat(d["waived_at"]), d["waived_by"], d["reason"])


def _load_session(d: dict[str, Any]) -> Session:
    return Session(
        session_id=d["session_id"],
        client_id=d["client_id"],
        professional_id=d["professional_id"],
        starts_at=datetime.fromisoformat(d["starts_at"]),
        booked_at=datetime.fromisoformat(d["booked_at"]),
        updated_at=datetime.fromisoformat(d["updated_at"]),
        state=SessionState(d["state"]),
        version=d["version"],
        credits=d["credits"],
        cancellation=_load_cancellation(d["cancellation"]),
        completed_at=_parse_dt(d["completed_at"]),
        programme_id=d.get("programme_id", DEFAULT_PROGRAMME_ID),
        terms=_load_terms(d.get("terms")),
        no_show_at=_parse_dt(d.get("no_show_at")),
        waiver=_load_waiver(d.get("waiver")),
        moves=tuple(_load_move(m) for m in d.get("moves", ())),
        rescheduled_from=d.get("rescheduled_from", ""),
        rescheduled_to=d.get("rescheduled_to", ""),
        # Results stored before terms had versions (schema version 9) name none: the first.
        terms_version=d.get("terms_version", 1),
        no_show_forgiven=d.get("no_show_forgiven", False),
        settled_automatically=d.get("settled_automatically", False),
        credit_expires_at=_parse_dt(d.get("credit_expires_at")),
        forgiveness_used=d.get("forgiveness_used", 0),
    )


def dump_session(s: Session) -> str:
    return json.dumps(_session(s))


def load_session(raw: str) -> Session:
    return _load_session(json.loads(raw))


def dump_settlement(pair: tuple[Session, Payment]) -> str:
    """The session alone: its payment follows from it (load_settlement). Records written by
    0.10.0 and before also hold a "payment", which every version since 0.9.0 ignores."""
    return json.dumps({"session": _session(pair[0])})


def load_settlement(raw: str) -> tuple[Session, Payment]:
    """The payment follows from the session, as when it was first returned: a just-cancelled
    session is on no invoice."""
    session = _load_session(json.loads(raw)["session"])
    return session, Payment.of(session)


def dump_settled_unmarked(s: Session) -> str:
    """A session the server settled, stored as its event's type is everywhere: a no-show's as a
    settlement (dump_settlement), a completion's as the session (dump_session)."""
    if s.state is SessionState.NO_SHOW:
        return dump_settlement((s, Payment.of(s)))
    return dump_session(s)


def load_settled_unmarked(raw: str) -> Session:
    d = json.loads(raw)
    return _load_session(d.get("session", d))


def dump_rescheduled(r: Rescheduled) -> str:
    return json.dumps(
        {"session": _session(r.session), "charged": None if r.charged is None else _session(r.charged)}
    )


def load_rescheduled(raw: str) -> Rescheduled:
    d = json.loads(raw)
    charged = d["charged"]
    return Rescheduled(_load_session(d["session"]), None if charged is None else _load_session(charged))


def dump_account(a: CreditAccount) -> str:
    return json.dumps(
        {
            "client_id": a.client_id,
            "programme_id": a.programme_id,
            "available": a.available,
            "held": a.held,
            "used": a.used,
            "expired": a.expired,
            "lots": [
                [_dt(lot.expires_at), lot.granted, lot.available, lot.held, lot.used, lot.expired]
                for lot in a.lots
            ],
        }
    )


def load_account(raw: str) -> CreditAccount:
    """Records written before lots (schema version 10) have none, and nothing expired."""
    d = json.loads(raw)
    return CreditAccount(
        client_id=d["client_id"],
        available=d["available"],
        held=d["held"],
        used=d["used"],
        programme_id=d.get("programme_id", DEFAULT_PROGRAMME_ID),
        expired=d.get("expired", 0),
        lots=tuple(
            CreditLot(_parse_dt(at), granted, available, held, used, expired)
            for at, granted, available, held, used, expired in d.get("lots", ())
        ),
    )


def dump_programme(p: Programme) -> str:
    return json.dumps(
        {
            "programme_id": p.programme_id,
            "display_name": p.display_name,
            "terms": _terms(p.terms),
            "created_at": _dt(p.created_at),
            "updated_at": _dt(p.updated_at),
            "version": p.version,
            "terms_version": p.terms_version,
        }
    )


def load_programme(raw: str) -> Programme:
    d = json.loads(raw)
    return Programme(
        programme_id=d["programme_id"],
        display_name=d["display_name"],
        terms=_load_terms(d["terms"]),
        created_at=datetime.fromisoformat(d["created_at"]),
        updated_at=datetime.fromisoformat(d["updated_at"]),
        version=d["version"],
        terms_version=d.get("terms_version", 1),
    )


def _invoice_line(line: InvoiceLine) -> dict[str, Any]:
    return {
        "session_id": line.session_id,
        "client_id": line.client_id,
        "session_starts_at": _dt(line.session_starts_at),
        "paid_reason": line.paid_reason.value,
        "credits": line.credits,
        "added_at": _dt(line.added_at),
    }


def _load_invoice_line(d: dict[str, Any]) -> InvoiceLine:
    return InvoiceLine(
        session_id=d["session_id"],
        client_id=d["client_id"],
        session_starts_at=datetime.fromisoformat(d["session_starts_at"]),
        paid_reason=PaidReason(d["paid_reason"]),
        credits=d["credits"],
        added_at=datetime.fromisoformat(d["added_at"]),
    )


def dump_invoice(i: Invoice) -> str:
    return json.dumps(
        {
            "invoice_id": i.invoice_id,
            "professional_id": i.professional_id,
            "state": i.state.value,
            "created_at": _dt(i.created_at),
            "updated_at": _dt(i.updated_at),
            "version": i.version,
            "submitted_at": _dt(i.submitted_at),
            "lines": [_invoice_line(line) for line in i.lines],
        }
    )


def load_invoice(raw: str) -> Invoice:
    d = json.loads(raw)
    return Invoice(
        invoice_id=d["invoice_id"],
        professional_id=d["professional_id"],
        state=InvoiceState(d["state"]),
        created_at=datetime.fromisoformat(d["created_at"]),
        updated_at=datetime.fromisoformat(d["updated_at"]),
        version=d["version"],
        submitted_at=_parse_dt(d["submitted_at"]),
    ).with_lines(tuple(_load_invoice_line(line) for line in d["lines"]))
