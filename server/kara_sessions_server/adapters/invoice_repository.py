"""Invoices, their lines and their audit trail.

invoice_lines' primary key is the session_id, so a session is on at most one invoice however
many replicas ask at once: lines go in with INSERT ... ON CONFLICT DO NOTHING, and a line that
did not go in was taken by another invoice first. Lines are inserted in session_id order so two
transactions never wait on each other's lines in opposite orders (no deadlock on PostgreSQL).
An invoice changes by a conditional UPDATE on its state and version, taken before its lines are
touched, so of two concurrent changes to one invoice exactly one goes through."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from kara_sessions_server.adapters.session_repository import S_SESSION_COLUMNS, TermsOf, session_from_row
from kara_sessions_server.adapters.storage import (
    Sql,
    from_micros,
    micros_or_none,
    time_or_none,
    to_micros,
)
from kara_sessions_server.domain.errors import (
    Conflict,
    InvoiceNotDraft,
    NotFound,
    PreconditionViolation,
    SessionsRefused,
)
from kara_sessions_server.domain.invoicing import Candidate, subject
from kara_sessions_server.domain.model import Invoice, InvoiceLine, InvoiceState, Page, PaidReason
from kara_sessions_server.domain.principal import Principal
from kara_sessions_server.service_layer.pagination import cut, decode

# Statements with an IN (...) list or many VALUES rows take at most this many items each.
_CHUNK = 200

_INVOICE_COLUMNS = "invoice_id, professional_id, state, version, created_at, updated_at, submitted_at"
_GET_INVOICE = f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE invoice_id = ?"
_GET_LINES = (
    "SELECT session_id, client_id, session_starts_at, paid_reason, credits, added_at "
    "FROM invoice_lines WHERE invoice_id = ? ORDER BY session_starts_at, session_id"
)
_INSERT_INVOICE = (
    "INSERT INTO invoices (invoice_id, professional_id, state, version, created_at, updated_at, "
    "submitted_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_CHANGE_INVOICE = (
    "UPDATE invoices SET state = ?, version = ?, updated_at = ?, submitted_at = ? "
    "WHERE invoice_id = ? AND state = ? AND version = ?"
)
_LINE_VALUES = "(?, ?, ?, ?, ?, ?, ?)"
_INSERT_LINES = (
    "INSERT INTO invoice_lines (session_id, invoice_id, client_id, session_starts_at, paid_reason, "
    "credits, added_at) VALUES {values} ON CONFLICT (session_id) DO NOTHING"
)
_INSERT_AUDIT = (
    "INSERT INTO invoice_audit (invoice_id, action, session_ids, principal, request_id, at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
# Through the Payments tab's index (professional_id, payment_section, starts_at, session_id).
_UNINVOICED_PAID = (
    f"SELECT {S_SESSION_COLUMNS} FROM sessions s"
    " WHERE s.professional_id = ? AND s.payment_section = 'PAID' AND s.starts_at <= ?"
    " AND NOT EXISTS (SELECT 1 FROM invoice_lines l WHERE l.session_id = s.session_id)"
    " ORDER BY s.starts_at, s.session_id LIMIT ?"
)
# PostgreSQL: lock the sessions read for invoicing until the transaction ends, so a WaiveCharge
# (which updates the session's row) and an invoice cannot both go through on one session: the
# second waits for the first and then sees it. SQLite has one writer at a time already.
_LOCK_SESSIONS = " FOR UPDATE OF s"
# Summaries for the list: the line count and total are summed here, never stored twice.
_LIST_INVOICES = (
    "SELECT i.invoice_id, i.professional_id, i.state, i.version, i.created_at, i.updated_at, "
    "i.submitted_at, COUNT(l.session_id), COALESCE(SUM(l.credits), 0) "
    "FROM invoices i LEFT JOIN invoice_lines l ON l.invoice_id = i.invoice_id "
    "WHERE i.professional_id = ? {where} "
    "GROUP BY i.invoice_id, i.professional_id, i.state, i.version, i.created_at, i.updated_at, "
    "i.submitted_at ORDER BY i.created_at DESC, i.invoice_id DESC LIMIT ?"
)


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def from_row(row: Sequence[Any]) -> Invoice:
    invoice_id, professional_id, state, version, created, updated, submitted, *summary = row
    invoice = Invoice(
        invoice_id=invoice_id,
        professional_id=professional_id,
        state=InvoiceState(state),
        version=version,
        created_at=from_micros(created),
        updated_at=from_micros(updated),
        submitted_at=time_or_none(submitted),
    )
    if summary:
        count, total = summary
        invoice = replace(invoice, line_count=int(count), total_credits=int(total))
    return invoice


def line_from_row(row: Sequence[Any]) -> InvoiceLine:
    session_id, client_id, starts_at, reason, credits, added_at = row
    return InvoiceLine(
        session_id=session_id,
        client_id=client_id,
        session_starts_at=from_micros(starts_at),
        paid_reason=PaidReason(reason),
        credits=credits,
        added_at=from_micros(added_at),
    )


def row_values(invoice: Invoice) -> tuple[object, ...]:
    """An invoice's own row, in the order from_row reads it (its lines are rows of their own)."""
    return (
        invoice.invoice_id,
        invoice.professional_id,
        invoice.state.value,
        invoice.version,
        to_micros(invoice.created_at),
        to_micros(invoice.updated_at),
        micros_or_none(invoice.submitted_at),
    )


def line_row_values(line: InvoiceLine) -> tuple[object, ...]:
    """A line's row as line_from_row reads it (the INSERT adds its invoice_id second)."""
    return (
        line.session_id,
        line.client_id,
        to_micros(line.session_starts_at),
        line.paid_reason.value,
        line.credits,
        to_micros(line.added_at),
    )


class InvoiceRepository:
    """Invoices, their lines and their audit rows, on one database."""

    def __init__(self, sql: Sql, terms: TermsOf):
        self._sql = sql
        self._terms = terms

    def _locking(self) -> str:
        return "" if self._sql.on_sqlite else _LOCK_SESSIONS

    def get(self, invoice_id: str) -> Invoice:
        row = self._sql(_GET_INVOICE, (invoice_id,)).fetchone()
        if row is None:
            raise NotFound(f"invoice {invoice_id} does not exist", metadata={"invoice_id": invoice_id})
        lines = tuple(line_from_row(r) for r in self._sql(_GET_LINES, (invoice_id,)).fetchall())
        return from_row(row).with_lines(lines)

    def add(self, invoice: Invoice) -> None:
        self._sql(_INSERT_INVOICE, row_values(invoice))

    def change(self, before: Invoice, after: Invoice) -> None:
        """Writes `after` only if the invoice is still exactly `before` (same state and version)."""
        changed = self._sql(
            _CHANGE_INVOICE,
            (
                after.state.value,
                before.version + 1,
                to_micros(after.updated_at),
                micros_or_none(after.submitted_at),
                before.invoice_id,
                before.state.value,
                before.version,
            ),
        ).rowcount
        if changed == 1:
            return
        current = self.get(before.invoice_id)
        if current.state is not InvoiceState.DRAFT:
            raise InvoiceNotDraft(
                f"invoice {before.invoice_id} was submitted by another request; a submitted invoice "
                "is frozen",
                metadata={"invoice_id": before.invoice_id, "state": current.state.value},
            )
        raise Conflict(
            f"invoice {before.invoice_id} was changed by another request; read it again and retry",
            metadata={"invoice_id": before.invoice_id},
        )

    def add_lines(self, invoice_id: str, lines: Sequence[InvoiceLine]) -> None:
        """Puts `lines` on the invoice; refuses them all if another invoice took any of them first."""
        ordered = sorted(lines, key=lambda line: line.session_id)
        inserted = 0
        for start in range(0, len(ordered), _CHUNK):
            chunk = ordered[start : start + _CHUNK]
            params: list[object] = []
            for line in chunk:
                session_id, *rest = line_row_values(line)
                params += [session_id, invoice_id, *rest]
            text = _INSERT_LINES.format(values=", ".join([_LINE_VALUES] * len(chunk)))
            inserted += self._sql(text, params).rowcount
        if inserted != len(ordered):
            self._refuse_taken(invoice_id, [line.session_id for line in ordered])

    def _refuse_taken(self, invoice_id: str, session_ids: Sequence[str]) -> None:
        taken = {sid: other for sid, other in self.invoices_of(session_ids).items() if other != invoice_id}
        if not taken:
            raise Conflict(f"the lines of invoice {invoice_id} changed concurrently; read it again and retry")
        raise SessionsRefused(
            [
                PreconditionViolation(
                    "SESSION_ALREADY_INVOICED",
                    subject(sid),
                    f"session {sid} was put on invoice {other} by a concurrent request",
                )
                for sid, other in sorted(taken.items())
            ]
        )

    def remove_lines(self, invoice_id: str, session_ids: Sequence[str]) -> None:
        removed = 0
        for chunk in _chunks(sorted(session_ids)):
            text = f"DELETE FROM invoice_lines WHERE invoice_id = ? AND session_id IN ({_marks(len(chunk))})"
            removed += self._sql(text, (invoice_id, *chunk)).rowcount
        if removed != len(session_ids):
            # The conditional UPDATE of the invoice went first, so its lines cannot have moved.
            raise Conflict(f"the lines of invoice {invoice_id} changed concurrently; read it again and retry")

    def invoices_of(self, session_ids: Sequence[str]) -> dict[str, str]:
        """session_id -> the invoice it is on, for those of `session_ids` that are on one."""
        found: dict[str, str] = {}
        for chunk in _chunks(session_ids):
            text = (
                f"SELECT session_id, invoice_id FROM invoice_lines WHERE session_id IN ({_marks(len(chunk))})"
            )
            found.update((sid, inv) for sid, inv in self._sql(text, chunk).fetchall())
        return found

    def candidates(self, session_ids: Sequence[str]) -> dict[str, Candidate]:
        """The sessions among `session_ids` that exist, each with the invoice it is on; locked in
        session_id order on PostgreSQL (see _LOCK_SESSIONS; one order, so no deadlock)."""
        found: dict[str, Candidate] = {}
        for chunk in _chunks(sorted(session_ids)):
            text = (
                f"SELECT {S_SESSION_COLUMNS}, l.invoice_id FROM sessions s "
                "LEFT JOIN invoice_lines l ON l.session_id = s.session_id "
                f"WHERE s.session_id IN ({_marks(len(chunk))}) ORDER BY s.session_id{self._locking()}"
            )
            for row in self._sql(text, chunk).fetchall():
                session = session_from_row(row[:-1], self._terms)
                found[session.session_id] = Candidate(session, row[-1] or "")
        return found

    def uninvoiced_paid(self, professional_id: str, up_to: datetime, limit: int) -> list[Candidate]:
        """The professional's paid sessions on no invoice that start at or before `up_to`, oldest first."""
        rows = self._sql(
            _UNINVOICED_PAID + self._locking(), (professional_id, to_micros(up_to), limit)
        ).fetchall()
        return [Candidate(session_from_row(row, self._terms), "") for row in rows]

    def audit(
        self,
        invoice_id: str,
        action: str,
        session_ids: Sequence[str],
        principal: Principal,
        request_id: str,
        now: datetime,
    ) -> None:
        self._sql(
            _INSERT_AUDIT,
            (invoice_id, action, ",".join(session_ids) or None, str(principal), request_id, to_micros(now)),
        )

    def page(self, professional_id: str, state: InvoiceState | None, size: int, token: str) -> Page[Invoice]:
        """Newest first; each invoice with its line count and total, without its lines."""
        query_id = ("invoices", professional_id, state.value if state else "")
        after = decode(query_id, token, (int, str))
        where = ""
        params: list[object] = [professional_id]
        if state is not None:
            where += "AND i.state = ? "
            params.append(state.value)
        if after is not None:
            where += "AND (i.created_at, i.invoice_id) < (?, ?) "
            params += after
        rows = self._sql(_LIST_INVOICES.format(where=where), (*params, size + 1)).fetchall()
        page, token_out, resume = cut(query_id, rows, size, lambda r: [r[4], r[0]])
        return Page(tuple(from_row(r) for r in page), token_out, resume)
