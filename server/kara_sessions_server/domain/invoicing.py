"""Which sessions may go on (or come off) a professional's invoice. Pure rules, no storage.

A session can be invoiced when its payment is PAID (it took place, or was cancelled late with
the credit taken), it is the invoice's professional's, and it is on no other invoice."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

from kara_sessions_server.domain.errors import PreconditionViolation, SessionsRefused, TooManySessions
from kara_sessions_server.domain.model import Invoice, InvoiceLine, Session, paid_reason, payment_state

# Keeps an invoice (every line comes back with it) well under the 1 MiB message limit.
MAX_INVOICE_LINES = 1000


@dataclass(frozen=True, slots=True)
class Candidate:
    """A session as loaded for invoicing, with the invoice it is on ("" for none)."""

    session: Session
    invoice_id: str


def subject(session_id: str) -> str:
    return f"sessions/{session_id}"


def lines_for(
    professional_id: str, candidates: Sequence[Candidate], now: datetime
) -> tuple[InvoiceLine, ...]:
    """The invoice lines for `candidates`; refuses them all, naming each, if any cannot go on."""
    violations = [v for c in candidates if (v := _violation(professional_id, c)) is not None]
    if violations:
        raise SessionsRefused(violations, professional_id=professional_id)
    return tuple(_line(c.session, now) for c in candidates)


def _violation(professional_id: str, candidate: Candidate) -> PreconditionViolation | None:
    s = candidate.session
    if s.professional_id != professional_id:
        return PreconditionViolation(
            "SESSION_OF_ANOTHER_PROFESSIONAL",
            subject(s.session_id),
            f"session {s.session_id} is with professional {s.professional_id}, not {professional_id}",
        )
    if paid_reason(s) is None:
        return PreconditionViolation(
            "SESSION_NOT_PAID",
            subject(s.session_id),
            f"session {s.session_id} is {s.state.value} and its payment "
            f"{payment_state(s).value}; only a session whose payment is PAID can be invoiced",
        )
    if candidate.invoice_id:
        return PreconditionViolation(
            "SESSION_ALREADY_INVOICED",
            subject(s.session_id),
            f"session {s.session_id} is already on invoice {candidate.invoice_id}",
        )
    return None


def _line(session: Session, now: datetime) -> InvoiceLine:
    reason = paid_reason(session)
    assert reason is not None
    return InvoiceLine(
        session_id=session.session_id,
        client_id=session.client_id,
        session_starts_at=session.starts_at,
        paid_reason=reason,
        credits=session.credits,
        added_at=now,
    )


def check_on_invoice(invoice: Invoice, session_ids: Sequence[str], on_invoice: Collection[str]) -> None:
    """Refuses to remove sessions that are not on the invoice, naming each."""
    missing = [sid for sid in session_ids if sid not in on_invoice]
    if missing:
        raise SessionsRefused(
            [
                PreconditionViolation(
                    "SESSION_NOT_ON_INVOICE",
                    subject(sid),
                    f"session {sid} is not on invoice {invoice.invoice_id}",
                )
                for sid in missing
            ],
            invoice_id=invoice.invoice_id,
        )


def check_room(invoice_id: str, lines_now: int, adding: int) -> None:
    if lines_now + adding > MAX_INVOICE_LINES:
        raise TooManySessions(
            f"invoice {invoice_id} would have {lines_now + adding} lines; an invoice holds "
            f"at most {MAX_INVOICE_LINES}: put the rest on another invoice",
            metadata={"invoice_id": invoice_id, "lines": str(lines_now + adding)},
        )
