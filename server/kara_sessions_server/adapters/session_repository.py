"""Sessions, their payments (a session's payment follows from it: the Payments tab is a column
and an index on sessions) and the audit log.

State changes are conditional UPDATEs (state and version must still be what was read), so of
two concurrent cancellations exactly one changes the row; the other sees zero rows updated.
The statements are prebuilt SQL run through peewee's connection (Storage.sql): building them
with peewee's query builder cost more than executing them (BENCHMARKS.md)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from kara_sessions_server.adapters.storage import (
    EPOCH,
    SessionRow,
    Sql,
    from_micros,
    micros_or_none,
    time_or_none,
    to_micros,
)
from kara_sessions_server.domain.clock import MICROSECOND
from kara_sessions_server.domain.errors import NotFound
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
    payment_state,
)
from kara_sessions_server.domain.principal import Principal
from kara_sessions_server.domain.programme import DEFAULT_TERMS, Terms
from kara_sessions_server.domain.session_lifecycle import lost_race
from kara_sessions_server.service_layer.pagination import cut, decode

# The terms a programme's version holds (programme_repository.TermsVersions).
TermsOf = Callable[[str, int], Terms]


def row_values(s: Session) -> dict[str, object]:
    """What each column of `sessions` holds of a Session, by name. The columns themselves
    (name, type, default) are SessionRow's; every statement below is generated from these
    two, and session_from_row reads a row by these names. A column added to one but not the
    other fails at import. (One function, not a function per column: it runs on every write,
    and one call costs a cancellation a twentieth fewer instructions than thirty-two.)"""
    c, w = s.cancellation, s.waiver
    return {
        "session_id": s.session_id,
        "client_id": s.client_id,
        "professional_id": s.professional_id,
        "starts_at": to_micros(s.starts_at),
        "booked_at": to_micros(s.booked_at),
        "updated_at": to_micros(s.updated_at),
        "state": s.state.value,
        "version": s.version,
        "credits": s.credits,
        "cancelled_by": c.cancelled_by.value if c else None,
        "cancelled_at": to_micros(c.cancelled_at) if c else None,
        "notified_at": to_micros(c.notified_at) if c else None,
        "notice_us": c.notice // MICROSECOND if c else None,
        "late": c.late if c else None,
        "charge_client": c.charge_client if c else None,
        "reason": c.reason if c else None,
        "completed_at": micros_or_none(s.completed_at),
        "programme_id": s.programme_id,
        "terms_version": s.terms_version,
        "no_show_at": micros_or_none(s.no_show_at),
        "waived_at": to_micros(w.waived_at) if w else None,
        "waived_by": w.waived_by if w else None,
        "waive_reason": w.reason if w else None,
        "within_grace": c.within_grace if c else None,
        "moves": _dump_moves(s.moves),
        "rescheduled_from": s.rescheduled_from or None,
        "rescheduled_to": s.rescheduled_to or None,
        "payment_section": payment_state(s).section.value,
        # Null unless forgiven, as a row from before schema version 10 reads.
        "forgiven": True if c and c.forgiven else None,
        "no_show_forgiven": s.no_show_forgiven or None,
        "settled_automatically": s.settled_automatically or None,
        "credit_expires_at": micros_or_none(s.credit_expires_at),
        "forgiveness_used": s.forgiveness_used or None,
    }


COLUMN_NAMES: tuple[str, ...] = tuple(SessionRow._meta.sorted_field_names)

SESSION_COLUMNS = ", ".join(COLUMN_NAMES)
# A session row's keyset for paging by start: (starts_at, session_id).
_START_KEY = (COLUMN_NAMES.index("starts_at"), COLUMN_NAMES.index("session_id"))
# The same, for a query that joins sessions as `s`.
S_SESSION_COLUMNS = ", ".join(f"s.{c}" for c in COLUMN_NAMES)
_GET_SESSION = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = ?"
_GET_SESSION_AND_INVOICE = (
    f"SELECT {S_SESSION_COLUMNS}, l.invoice_id FROM sessions s "
    "LEFT JOIN invoice_lines l ON l.session_id = s.session_id WHERE s.session_id = ?"
)
_INSERT_SESSION = f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES ({', '.join('?' * len(COLUMN_NAMES))})"


def _guarded_update(columns: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """An UPDATE of `columns` that changes the row only if it is still what was read, and the
    columns to bind. Only the columns an operation can change: SQLite rewrites the entries of
    every index on a column in SET, changed or not."""
    assert set(columns) <= set(COLUMN_NAMES) and "version" in columns
    assignments = ", ".join(f"{c} = ?" for c in columns)
    return f"UPDATE sessions SET {assignments} WHERE session_id = ? AND state = ? AND version = ?", columns


# A state change: what a cancellation, completion, no-show, waiver or charged move can change.
_CHANGE_SESSION = _guarded_update(
    (
        "state",
        "version",
        "updated_at",
        "completed_at",
        "cancelled_by",
        "cancelled_at",
        "notified_at",
        "notice_us",
        "late",
        "charge_client",
        "reason",
        "no_show_at",
        "waived_at",
        "waived_by",
        "waive_reason",
        "within_grace",
        "rescheduled_to",
        "payment_section",
        "forgiven",
        "no_show_forgiven",
        "settled_automatically",
        "forgiveness_used",
    )
)
# A move in place: only a BOOKED session moves, and only from the start it was read with.
_MOVE_SESSION = _guarded_update(("starts_at", "moves", "version", "updated_at"))
_INSERT_AUDIT = (
    "INSERT INTO audit_log (session_id, action, actor, principal, from_state, to_state, notified_at, "
    "notice_us, charge_client, reason, request_id, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
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


def session_from_row(row: Sequence[Any], terms: TermsOf) -> Session:
    """A row of SESSION_COLUMNS (a longer row's extra values are ignored), read by name; its
    terms are the version of its programme's that it names (`terms`, TermsVersions)."""
    r = dict(zip(COLUMN_NAMES, row, strict=False))
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
        terms=terms(r["programme_id"], r["terms_version"]),
        terms_version=r["terms_version"],
        no_show_at=time_or_none(r["no_show_at"]),
        waiver=_waiver(r),
        moves=load_moves(r["moves"]),
        rescheduled_from=r["rescheduled_from"] or "",
        rescheduled_to=r["rescheduled_to"] or "",
        no_show_forgiven=bool(r["no_show_forgiven"]),
        settled_automatically=bool(r["settled_automatically"]),
        credit_expires_at=time_or_none(r["credit_expires_at"]),
        forgiveness_used=r["forgiveness_used"] or 0,
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
                m.notice // MICROSECOND,
                m.late,
                m.within_grace,
                m.reason,
            ]
            for m in moves
        ]
    )


def load_moves(raw: str | None) -> tuple[Move, ...]:
    if not raw:
        return ()
    return tuple(
        Move(
            moved_at=from_micros(at),
            from_starts_at=from_micros(from_),
            to_starts_at=from_micros(to),
            moved_by=Party(by),
            notified_at=from_micros(notified),
            notice=MICROSECOND * notice,
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
        notice=MICROSECOND * r["notice_us"],
        late=bool(r["late"]),
        charge_client=bool(r["charge_client"]),
        reason=r["reason"] or "",
        within_grace=bool(r["within_grace"]),
        forgiven=bool(r["forgiven"]),
    )


def _start_key(row: Sequence[Any]) -> list[str | int]:
    return [row[i] for i in _START_KEY]


# A client's forgiven charges under one programme since a time, through the client's index.
_FORGIVEN_SINCE = (
    "SELECT COUNT(*) FROM sessions WHERE client_id = ? AND programme_id = ? "
    "AND ((forgiven AND cancelled_at >= ?) OR (no_show_forgiven AND no_show_at >= ?))"
)
_HOLD_SESSION = "SELECT 1 FROM sessions WHERE session_id = ? FOR UPDATE"

# The versions of terms that settle unmarked sessions, and each one's booked sessions due, through
# the partial index of booked sessions by (programme_id, terms_version, starts_at, session_id): a
# few versions settle, and a session of any other is never read.
_SETTLING_TERMS = (
    "SELECT programme_id, terms_version, settle_unmarked_after_us FROM programme_terms "
    "WHERE settle_unmarked_after_us > 0"
)
_UNMARKED_DUE = (
    "SELECT session_id FROM sessions WHERE state = 'BOOKED' AND programme_id = ? AND terms_version = ? "
    "AND starts_at <= ? ORDER BY starts_at, session_id LIMIT ?"
)

_PRUNE_AUDIT = "DELETE FROM audit_log WHERE audit_id IN (SELECT audit_id FROM audit_log WHERE at < ? LIMIT ?)"


class SessionRepository:
    """Sessions, their payments and their audit rows, on one database."""

    def __init__(self, sql: Sql, terms: TermsOf):
        self._sql = sql
        self._terms = terms

    def get_with_invoice(self, session_id: str) -> tuple[Session, str]:
        """The session and the invoice it is on ("" for none), in one query: "View details"."""
        row = self._sql(_GET_SESSION_AND_INVOICE, (session_id,)).fetchone()
        if row is None:
            raise NotFound(f"session {session_id} does not exist", metadata={"session_id": session_id})
        return session_from_row(row[:-1], self._terms), row[-1] or ""

    def get(self, session_id: str) -> Session:
        row = self._sql(_GET_SESSION, (session_id,)).fetchone()
        if row is None:
            raise NotFound(f"session {session_id} does not exist", metadata={"session_id": session_id})
        return session_from_row(row, self._terms)

    def add(self, session: Session) -> None:
        row = row_values(session)
        self._sql(_INSERT_SESSION, tuple(row[c] for c in COLUMN_NAMES))

    def change_state(self, before: Session, after: Session) -> Session:
        """Writes `after` (model.changed: `before`'s next version) only if the row is still
        exactly `before` (same state and version); returns it."""
        return self._save(_CHANGE_SESSION, before, after)

    def move(self, before: Session, after: Session) -> Session:
        """Writes `after`'s start and moves only if the row is still exactly `before` (a move in
        place leaves the payment as it was: still PENDING, in the Unpaid section)."""
        return self._save(_MOVE_SESSION, before, after)

    def _save(self, update: tuple[str, tuple[str, ...]], before: Session, after: Session) -> Session:
        """Runs a _guarded_update of `after`; refuses as the race it lost says if the row was no
        longer `before`."""
        if after.version != before.version + 1:
            raise ValueError(f"session {before.session_id}: a change is one version (model.changed)")
        statement, columns = update
        row = row_values(after)
        bound = (*(row[c] for c in columns), before.session_id, before.state.value, before.version)
        if self._sql(statement, bound).rowcount != 1:
            raise lost_race(before, self.get(before.session_id))
        return after

    def hold(self, session: Session) -> None:
        """Holds the session's row from change by others until this unit of work ends (SQLite's
        one writer holds everything already)."""
        if not self._sql.on_sqlite:
            self._sql(_HOLD_SESSION, (session.session_id,))

    def forgiven_since(self, session: Session, since: datetime) -> int:
        """How many charges of `session`'s client under its programme were forgiven at or after
        `since`."""
        at = to_micros(since)
        row = self._sql(_FORGIVEN_SINCE, (session.client_id, session.programme_id, at, at)).fetchone()
        return int(row[0])

    def unmarked_due(self, now: datetime, limit: int) -> list[str]:
        """Up to `limit` sessions still BOOKED their terms' settle_unmarked_after past their
        start, earliest first within each version of terms."""
        due: list[str] = []
        for programme_id, version, after_us in self._sql(_SETTLING_TERMS).fetchall():
            if len(due) >= limit:
                break
            started_by = to_micros(now) - after_us
            params = (programme_id, version, started_by, limit - len(due))
            due += [row[0] for row in self._sql(_UNMARKED_DUE, params).fetchall()]
        return due

    def audit(
        self,
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
        self._sql(
            _INSERT_AUDIT,
            (
                after.session_id,
                action,
                actor,
                str(principal),
                before.state.value if before else None,
                after.state.value,
                micros_or_none(c.notified_at) if c else None,
                c.notice // MICROSECOND if c else None,
                c.charge_client if c else None,
                reason,
                request_id,
                to_micros(now),
            ),
        )

    def page(
        self, professional_id: str, client_id: str, state: SessionState | None, size: int, token: str
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
        rows, token_out, resume = cut(
            query_id, self._sql(text, (*params, size + 1)).fetchall(), size, _start_key
        )
        return Page(tuple(session_from_row(r, self._terms) for r in rows), token_out, resume)

    def payments(self, professional_id: str, section: PaymentSection, size: int, token: str) -> Page[Payment]:
        """Most recent session first."""
        query_id = ("payments", professional_id, section.value)
        after = decode(query_id, token, (int, str))
        if after is None:
            cursor = self._sql(_LIST_PAYMENTS_FIRST, (professional_id, section.value, size + 1))
        else:
            cursor = self._sql(_LIST_PAYMENTS_AFTER, (professional_id, section.value, *after, size + 1))
        rows, token_out, resume = cut(query_id, cursor.fetchall(), size, _start_key)
        return Page(
            tuple(Payment.of(session_from_row(r[:-1], self._terms), r[-1] or "") for r in rows),
            token_out,
            resume,
        )

    def prune_audit(self, older_than: datetime, batch: int) -> int:
        """Deletes up to `batch` audit rows written before `older_than` (only when an operator asks
        for an audit retention: the audit log is the record)."""
        return int(self._sql(_PRUNE_AUDIT, (to_micros(older_than), batch)).rowcount)


# Checked once every function above exists.
_PROBE = Session("", "", "", EPOCH, EPOCH, EPOCH, SessionState.BOOKED, 0, terms=DEFAULT_TERMS)
if set(row_values(_PROBE)) != set(COLUMN_NAMES):
    raise ImportError(
        f"sessions columns and row_values' keys differ: {set(row_values(_PROBE)) ^ set(COLUMN_NAMES)}"
    )
