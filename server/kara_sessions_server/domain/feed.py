"""The event feed other services read (EventService): one event per committed change, in commit
order. The domain says what each change is called, what it is about and whose it is; the
outbox adapter stores it in the change's own transaction."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from kara_sessions_server.domain.model import CreditAccount, Invoice, Payment, Session
from kara_sessions_server.domain.programme import Programme


class EventType(enum.StrEnum):
    SESSION_BOOKED = "kara.sessions.v1.session.booked"
    SESSION_CANCELLED = "kara.sessions.v1.session.cancelled"
    SESSION_COMPLETED = "kara.sessions.v1.session.completed"
    SESSION_NO_SHOW = "kara.sessions.v1.session.no_show"
    SESSION_CHARGE_WAIVED = "kara.sessions.v1.session.charge_waived"
    # Moved in place, or (charged) settled and booked again: SessionChanged.charged says which.
    SESSION_RESCHEDULED = "kara.sessions.v1.session.rescheduled"
    CREDITS_GRANTED = "kara.sessions.v1.credits.granted"
    # A lot's expire time came: its available credits expired (issue 36).
    CREDITS_EXPIRED = "kara.sessions.v1.credits.expired"
    INVOICE_CREATED = "kara.sessions.v1.invoice.created"
    # Lines added or removed while DRAFT.
    INVOICE_CHANGED = "kara.sessions.v1.invoice.changed"
    INVOICE_SUBMITTED = "kara.sessions.v1.invoice.submitted"
    PROGRAMME_CREATED = "kara.sessions.v1.programme.created"
    PROGRAMME_UPDATED = "kara.sessions.v1.programme.updated"


@dataclass(frozen=True, slots=True)
class Change:
    """What one committed mutation tells the feed: its type, what it is about, and whose it is
    (a professional reads the events of their sessions and invoices, a client of their sessions
    and account)."""

    type: EventType
    subject: str
    professional_id: str | None = None
    client_id: str | None = None

    @classmethod
    def of_session(cls, type: EventType, session: Session) -> Change:
        return cls(type, session.session_id, session.professional_id, session.client_id)

    @classmethod
    def of_account(cls, account: CreditAccount, type: EventType = EventType.CREDITS_GRANTED) -> Change:
        return cls(type, account.client_id, None, account.client_id)

    @classmethod
    def of_invoice(cls, type: EventType, invoice: Invoice) -> Change:
        return cls(type, invoice.invoice_id, invoice.professional_id, None)

    @classmethod
    def of_programme(cls, type: EventType, programme: Programme) -> Change:
        """Read by services only: no professional or client is named."""
        return cls(type, programme.programme_id)


@dataclass(frozen=True, slots=True)
class SessionChanged:
    session: Session
    payment: Payment
    # A charged reschedule: the session it settled (`session` is the one booked in its place).
    charged: Session | None = None
    charged_payment: Payment | None = None


FeedData = SessionChanged | CreditAccount | Invoice | Programme


@dataclass(frozen=True, slots=True)
class FeedEvent:
    event_id: str
    # Opaque: resume just after this event.
    cursor: str
    type: EventType
    subject: str
    time: datetime
    data: FeedData
