"""Sessions, their payments (a session's payment follows from it: the Payments tab is a column
and an index on sessions) and the audit log.

State changes are conditional UPDATEs (state and version must still be what was read), so of
two concurrent cancellations exactly one changes the row; the other sees zero rows updated.
The statements are prebuilt SQL run through peewee's connection (storage.sql): building them
with peewee's query builder cost more than executing them (BENCHMARKS.md)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from kara_sessions_server.adapters.pagination import cut, decode
from kara_sessions_server.adapters.storage import from_micros, micros_or_none, sql, time_or_none, to_micros
from kara_sessions_server.domain.errors import Conflict, NotFound, NotWaivable, SessionNotBooked
from kara_sessions_server.domain.model import (
    Cancellation,
    Move,
    Page,
    Party,
    Payment,
    PaymentSection,
    Session,
    SessionState,
    Waiver,
    payment_of,
    payment_state,
)
from kara_sessions_server.domain.principal import Principal
from kara_sessions_server.domain.programme import LateReschedule, Terms

_MICROSECOND = timedelta(microseconds=1)

SESSION_COLUMNS = (
    "session_id, client_id, professional_id, starts_at, booked_at, updated_at, state, version, credits, "
    "cancelled_by, cancelled_at, notified_at, notice, late, charge_client, reason, completed_at, "
    "programme_id, notice_window, professional_may_charge_late, no_show_takes_credit, no_show_at, "
    "waived_at, waived_by, waive_reason, late_reschedule, cancellation_grace, within_grace, moves, "
    "rescheduled_from, rescheduled_to"
)
_COLUMN_NAMES = tuple(c.strip() for c in SESSION_COLUMNS.split(","))
# The same, for a query that joins sessions as `s`.
S_SESSION_COLUMNS = ", ".join(f"s.{c.strip()}" for c in SESSION_COLUMNS.split(","))
_GET_SESSION = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = ?"
_GET_SESSION_AND_INVOICE = (
    f"SELECT {S_SESSION_COLUMNS}, l.invoice_id FROM sessions s "
    "LEFT JOIN invoice_lines l ON l.session_id = s.session_id WHERE s.session_id = ?"
)
_INSERT_SESSION = (
    "INSERT INTO sessions (session_id, client_id, professional_id, starts_at, booked_at, updated_at, "
    "state, version, credits, programme_id, notice_window, professional_may_charge_late, "
    "no_show_takes_credit, late_reschedule, cancellation_grace, rescheduled_from, payment_section) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_CHANGE_SESSION = (
    "UPDATE sessions SET state = ?, version = ?, updated_at = ?, completed_at = ?, cancelled_by = ?, "
    "cancelled_at = ?, notified_at = ?, notice = ?, late = ?, charge_client = ?, reason = ?, "
    "no_show_at = ?, waived_at = ?, waived_by = ?, waive_reason = ?, within_grace = ?, "
    "rescheduled_to = ?, payment_section = ? WHERE session_id = ? AND state = ? AND version = ?"
)
# A move in place: only a BOOKED session moves, and only from the start it was read with.
_MOVE_SESSION = (
    "UPDATE sessions SET starts_at = ?, moves = ?, version = ?, updated_at = ? "
    "WHERE session_id = ? AND state = ? AND version = ?"
)
_INSERT_AUDIT = (
    "INSERT INTO audit_log (session_id, action, actor, principal, from_state, to_state, notified_at, "
    "notice, charge_client, reason, request_id, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Newest session first, through the (professional_id, payment_section, starts_at, session_id)
# index; each payment is derived from its session and the invoice line it is on, if any.
_LIST_PAYMENTS = (
    f"SELECT {S_SESSION_COLUMNS}, l.invoice_id FROM sessions s"
    " LEFT JOIN invoice_lines l ON l.session_id = s.session_id"
    " WHERE s.professional_id = ? AND s.payment_section = ? {after}"
    " ORDER BY s.starts_at DESC, s.session_id DESC LIMIT ?"
)
_LIST_PAYMENTS_FIRST = _LIST_PAYMENTS.format(after="")
_LIST_PAYMENTS_AFTER = _LIST_PAYMENTS.format(
    # A row-value comparison, not `a < x OR (a = x AND b < y)`: PostgreSQL turns only the former
    # into an index range, and without it a deep page scanned every row above it.
    after="AND (s.starts_at, s.session_id) < (?, ?)"
)


def session_from_row(row: Sequence[Any]) -> Session:
    """A row of SESSION_COLUMNS (a longer row's extra values are ignored), read by name."""
    r = dict(zip(_COLUMN_NAMES, row, strict=False))
    return Session(
        session_id=r["session_id"],
        client_id=r["client_id"],
        professional_id=r["professional_id"],
        starts_at=from_micros(r["starts_at"]),
        booked_at=from_micros(r["booked_at"]),
        updated_at=from_micros(r["updated_at"]),
        state=SessionState(r["state"]),
        version=r["version"],
        credits=r["credits"],
        cancellation=_cancellation(r),
        completed_at=time_or_none(r["completed_at"]),
        programme_id=r["programme_id"],
        terms=Terms(
            timedelta(microseconds=r["notice_window"]),
            bool(r["professional_may_charge_late"]),
            bool(r["no_show_takes_credit"]),
            LateReschedule(r["late_reschedule"]),
            timedelta(microseconds=r["cancellation_grace"]),
        ),
        no_show_at=time_or_none(r["no_show_at"]),
        waiver=_waiver(r),
        moves=_load_moves(r["moves"]),
        rescheduled_from=r["rescheduled_from"] or "",
        rescheduled_to=r["rescheduled_to"] or "",
    )


def _dump_moves(moves: tuple[Move, ...]) -> str | None:
    """JSON, times in microseconds like every other column: a session's moves are read with it."""
    if not moves:
        return None
    return json.dumps(
        [
            [
                to_micros(m.moved_at),
                to_micros(m.from_starts_at),
                to_micros(m.to_starts_at),
                m.moved_by.value,
                to_micros(m.notified_at),
                m.notice // _MICROSECOND,
                m.late,
                m.within_grace,
                m.reason,
            ]
            for m in moves
        ]
    )


def _load_moves(raw: str | None) -> tuple[Move, ...]:
    if not raw:
        return ()
    return tuple(
        Move(
            moved_at=from_micros(at),
            from_starts_at=from_micros(from_),
            to_starts_at=from_micros(to),
            moved_by=Party(by),
            notified_at=from_micros(notified),
            notice=timedelta(microseconds=notice),
            late=late,
            within_grace=grace,
            reason=reason,
        )
        for at, from_, to, by, notified, notice, late, grace, reason in json.loads(raw)
    )


def _waiver(r: dict[str, Any]) -> Waiver | None:
    at = r["waived_at"]
    return None if at is None else Waiver(from_micros(at), r["waived_by"], r["waive_reason"] or "")


def _cancellation(r: dict[str, Any]) -> Cancellation | None:
    if r["cancelled_by"] is None:
        return None
    return Cancellation(
        cancelled_by=Party(r["cancelled_by"]),
        cancelled_at=from_micros(r["cancelled_at"]),
        notified_at=from_micros(r["notified_at"]),
        notice=timedelta(microseconds=r["notice"]),
        late=bool(r["late"]),
        charge_client=bool(r["charge_client"]),
        reason=r["reason"] or "",
        within_grace=bool(r["within_grace"]),
    )


def get_session_and_invoice(session_id: str) -> tuple[Session, str]:
    """The session and the invoice it is on ("" for none), in one query: "View details"."""
    row = sql(_GET_SESSION_AND_INVOICE, (session_id,)).fetchone()
    if row is None:
        raise NotFound(f"session {session_id} does not exist", metadata={"session_id": session_id})
    return session_from_row(row[:-1]), row[-1] or ""


def get_session(session_id: str) -> Session:
    row = sql(_GET_SESSION, (session_id,)).fetchone()
    if row is None:
        raise NotFound(f"session {session_id} does not exist", metadata={"session_id": session_id})
    return session_from_row(row)


def add_session(session: Session) -> None:
    sql(
        _INSERT_SESSION,
        (
            session.session_id,
            session.client_id,
            session.professional_id,
            to_micros(session.starts_at),
            to_micros(session.booked_at),
            to_micros(session.updated_at),
            session.state.value,
            session.version,
            session.credits,
            session.programme_id,
            session.terms.notice_window // _MICROSECOND,
            session.terms.professional_may_charge_late,
            session.terms.no_show_takes_credit,
            session.terms.late_reschedule.value,
            session.terms.cancellation_grace // _MICROSECOND,
            session.rescheduled_from or None,
            payment_state(session).section.value,
        ),
    )


def change_state(before: Session, after: Session) -> None:
    """Writes `after` only if the row is still exactly `before` (same state and version)."""
    c = after.cancellation
    w = after.waiver
    _guarded(
        _CHANGE_SESSION,
        (
            after.state.value,
            before.version + 1,
            to_micros(after.updated_at),
            micros_or_none(after.completed_at),
            c.cancelled_by.value if c else None,
            micros_or_none(c.cancelled_at) if c else None,
            micros_or_none(c.notified_at) if c else None,
            c.notice // _MICROSECOND if c else None,
            c.late if c else None,
            c.charge_client if c else None,
            c.reason if c else None,
            micros_or_none(after.no_show_at),
            micros_or_none(w.waived_at) if w else None,
            w.waived_by if w else None,
            w.reason if w else None,
            c.within_grace if c else None,
            after.rescheduled_to or None,
            payment_state(after).section.value,
        ),
        before,
    )


def move(before: Session, after: Session) -> None:
    """Writes `after`'s start and moves only if the row is still exactly `before` (a move in
    place leaves the payment as it was: still PENDING, in the Unpaid section)."""
    _guarded(
        _MOVE_SESSION,
        (
            to_micros(after.starts_at),
            _dump_moves(after.moves),
            before.version + 1,
            to_micros(after.updated_at),
        ),
        before,
    )


def _guarded(statement: str, values: tuple[object, ...], before: Session) -> None:
    """Runs an UPDATE of the session that ends `WHERE session_id = ? AND state = ? AND version = ?`
    with `before`'s; refuses as the race it lost says if the row was no longer `before`."""
    if sql(statement, (*values, before.session_id, before.state.value, before.version)).rowcount != 1:
        _raise_lost_race(before)


def _raise_lost_race(before: Session) -> None:
    current = get_session(before.session_id)
    if current.waiver is not None and before.waiver is None:
        raise NotWaivable(
            f"session {before.session_id}'s charge was waived by another request",
            metadata={"session_id": before.session_id, "state": current.state.value},
        )
    if current.state is not SessionState.BOOKED:
        raise SessionNotBooked(
            f"session {before.session_id} is {current.state.value}, not BOOKED; it was changed by "
            "another request",
            metadata={"session_id": before.session_id, "state": current.state.value},
        )
    raise Conflict(
        f"session {before.session_id} was changed by another request; read it again and retry",
        metadata={"session_id": before.session_id},
    )


def audit(
    before: Session | None,
    after: Session,
    action: str,
    actor: str,
    principal: Principal,
    request_id: str,
    now: datetime,
) -> None:
    """`actor` is the party the domain acted for (CLIENT, PROFESSIONAL, SYSTEM); `principal` the
    authenticated caller who asked. A cancellation's details are recorded with it, a waiver's
    reason with the waiver."""
    c = None if action == "WAIVE" else after.cancellation
    reason = after.waiver.reason if action == "WAIVE" and after.waiver else (c.reason if c else None)
    sql(
        _INSERT_AUDIT,
        (
            after.session_id,
            action,
            actor,
            str(principal),
            before.state.value if before else None,
            after.state.value,
            micros_or_none(c.notified_at) if c else None,
            c.notice // _MICROSECOND if c else None,
            c.charge_client if c else None,
            reason,
            request_id,
            to_micros(now),
        ),
    )


def list_sessions(
    professional_id: str, client_id: str, state: SessionState | None, size: int, token: str
) -> Page[Session]:
    """Oldest start first. Filters are fixed fragments; values always go as parameters."""
    query_id = ("sessions", professional_id, client_id, state.value if state else "")
    after = decode(query_id, token, (int, str))
    where: list[str] = []
    params: list[object] = []
    for fragment, value in (
        ("professional_id = ?", professional_id),
        ("client_id = ?", client_id),
        ("state = ?", state.value if state else ""),
    ):
        if value:
            where.append(fragment)
            params.append(value)
    if after is not None:
        where.append("(starts_at, session_id) > (?, ?)")
        params += after
    text = (
        f"SELECT {SESSION_COLUMNS} FROM sessions WHERE {' AND '.join(where)} "
        "ORDER BY starts_at, session_id LIMIT ?"
    )
    rows, token_out = cut(query_id, sql(text, (*params, size + 1)).fetchall(), size, lambda r: [r[3], r[0]])
    return Page(tuple(session_from_row(r) for r in rows), token_out)


def list_payments(professional_id: str, section: PaymentSection, size: int, token: str) -> Page[Payment]:
    """Most recent session first."""
    query_id = ("payments", professional_id, section.value)
    after = decode(query_id, token, (int, str))
    if after is None:
        cursor = sql(_LIST_PAYMENTS_FIRST, (professional_id, section.value, size + 1))
    else:
        cursor = sql(_LIST_PAYMENTS_AFTER, (professional_id, section.value, *after, size + 1))
    rows, token_out = cut(query_id, cursor.fetchall(), size, lambda r: [r[3], r[0]])
    return Page(tuple(payment_of(session_from_row(r[:-1]), r[-1] or "") for r in rows), token_out)


_PRUNE_AUDIT = "DELETE FROM audit_log WHERE audit_id IN (SELECT audit_id FROM audit_log WHERE at < ? LIMIT ?)"


def prune_audit(older_than: datetime, batch: int) -> int:
    """Deletes up to `batch` audit rows written before `older_than` (only when an operator asks
    for an audit retention: the audit log is the record)."""
    return int(sql(_PRUNE_AUDIT, (to_micros(older_than), batch)).rowcount)
