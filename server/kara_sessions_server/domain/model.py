"""Domain values: what a session, a payment and a credit account are. No gRPC, no SQL."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Generic, TypeVar

T = TypeVar("T")

# One booking holds one sponsored credit.
CREDITS_PER_SESSION = 1


class SessionState(enum.StrEnum):
    BOOKED = "BOOKED"
    CANCELLED_VOIDED = "CANCELLED_VOIDED"
    CANCELLED_PAID = "CANCELLED_PAID"
    COMPLETED = "COMPLETED"


class Party(enum.StrEnum):
    CLIENT = "CLIENT"
    PROFESSIONAL = "PROFESSIONAL"


class PaymentState(enum.StrEnum):
    PENDING = "PENDING"
    VOIDED = "VOIDED"
    PAID = "PAID"

    @property
    def section(self) -> PaymentSection:
        return PaymentSection.PAID if self is PaymentState.PAID else PaymentSection.UNPAID


class PaymentSection(enum.StrEnum):
    UNPAID = "UNPAID"
    PAID = "PAID"


class PaidReason(enum.StrEnum):
    """Why a PAID payment was paid; what an invoice line tells the accounts department."""

    COMPLETED = "COMPLETED"
    CLIENT_LATE_CANCELLATION = "CLIENT_LATE_CANCELLATION"
    # A professional's late cancellation with "Charge the client for this session" ticked.
    CHARGED_LATE_CANCELLATION = "CHARGED_LATE_CANCELLATION"


class InvoiceState(enum.StrEnum):
    DRAFT = "DRAFT"
    SUBMITTED = "SUBMITTED"


class LedgerKind(enum.StrEnum):
    GRANT = "GRANT"
    HOLD = "HOLD"
    RETURN = "RETURN"
    TAKE = "TAKE"


# The payment each session state implies; the state machine and the payment never disagree.
PAYMENT_FOR_STATE: dict[SessionState, PaymentState] = {
    SessionState.BOOKED: PaymentState.PENDING,
    SessionState.CANCELLED_VOIDED: PaymentState.VOIDED,
    SessionState.CANCELLED_PAID: PaymentState.PAID,
    SessionState.COMPLETED: PaymentState.PAID,
}

# What happens to the held credit on entering a settled state.
CREDIT_MOVE_FOR_STATE: dict[SessionState, LedgerKind] = {
    SessionState.CANCELLED_VOIDED: LedgerKind.RETURN,
    SessionState.CANCELLED_PAID: LedgerKind.TAKE,
    SessionState.COMPLETED: LedgerKind.TAKE,
}


@dataclass(frozen=True, slots=True)
class Cancellation:
    cancelled_by: Party
    cancelled_at: datetime
    notified_at: datetime
    notice: timedelta
    late: bool
    charge_client: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    client_id: str
    professional_id: str
    starts_at: datetime
    booked_at: datetime
    updated_at: datetime
    state: SessionState
    version: int
    credits: int = CREDITS_PER_SESSION
    cancellation: Cancellation | None = None
    completed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Payment:
    session_id: str
    client_id: str
    professional_id: str
    session_starts_at: datetime
    state: PaymentState
    credits: int
    updated_at: datetime
    cancellation: Cancellation | None = None
    paid_reason: PaidReason | None = None
    # The invoice this paid session is on; "" while on none.
    invoice_id: str = ""

    @property
    def section(self) -> PaymentSection:
        return self.state.section


def paid_reason(session: Session) -> PaidReason | None:
    """Why the session's credit was taken; None while it is not (booked or voided)."""
    if session.state is SessionState.COMPLETED:
        return PaidReason.COMPLETED
    if session.state is SessionState.CANCELLED_PAID:
        assert session.cancellation is not None
        if session.cancellation.cancelled_by is Party.CLIENT:
            return PaidReason.CLIENT_LATE_CANCELLATION
        return PaidReason.CHARGED_LATE_CANCELLATION
    return None


def payment_of(session: Session, invoice_id: str = "") -> Payment:
    """A session's payment: every field follows from the session (and the invoice line, if
    any), so it is never read back."""
    return Payment(
        session_id=session.session_id,
        client_id=session.client_id,
        professional_id=session.professional_id,
        session_starts_at=session.starts_at,
        state=PAYMENT_FOR_STATE[session.state],
        credits=session.credits,
        updated_at=session.updated_at,
        cancellation=session.cancellation,
        paid_reason=paid_reason(session),
        invoice_id=invoice_id,
    )


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    """One paid session on an invoice. Paid sessions never change state again, so the line is a
    faithful copy of the session taken when it was added."""

    session_id: str
    client_id: str
    session_starts_at: datetime
    paid_reason: PaidReason
    credits: int
    added_at: datetime


@dataclass(frozen=True, slots=True)
class Invoice:
    invoice_id: str
    professional_id: str
    state: InvoiceState
    created_at: datetime
    updated_at: datetime
    # Bumped by every change; the conditional UPDATE that changes the invoice checks it.
    version: int
    submitted_at: datetime | None = None
    # Oldest session first. Left empty (with line_count and total_credits set) in list pages.
    lines: tuple[InvoiceLine, ...] = ()
    line_count: int = 0
    total_credits: int = 0

    def with_lines(self, lines: tuple[InvoiceLine, ...]) -> Invoice:
        ordered = tuple(sorted(lines, key=lambda line: (line.session_starts_at, line.session_id)))
        return replace(
            self,
            lines=ordered,
            line_count=len(ordered),
            total_credits=sum(line.credits for line in ordered),
        )


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    entry_id: str
    client_id: str
    kind: LedgerKind
    credits: int
    session_id: str | None
    request_id: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class CreditAccount:
    client_id: str
    available: int
    held: int
    used: int
    entries: tuple[LedgerEntry, ...] = field(default=())
    next_page_token: str = ""


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: tuple[T, ...]
    next_page_token: str


# --- commands: what a caller asks for, already parsed into domain types ---


@dataclass(frozen=True, slots=True)
class BookSession:
    client_id: str
    professional_id: str
    starts_at: datetime
    request_id: str


@dataclass(frozen=True, slots=True)
class CancelSession:
    session_id: str
    cancelled_by: Party
    charge_client: bool
    notified_at: datetime | None
    reason: str
    request_id: str


@dataclass(frozen=True, slots=True)
class CompleteSession:
    session_id: str
    request_id: str


@dataclass(frozen=True, slots=True)
class GrantCredits:
    client_id: str
    credits: int
    request_id: str


@dataclass(frozen=True, slots=True)
class CreateInvoice:
    """Exactly one of session_ids and up_to."""

    professional_id: str
    session_ids: tuple[str, ...]
    up_to: datetime | None
    request_id: str


@dataclass(frozen=True, slots=True)
class ChangeInvoiceLines:
    """AddToInvoice or RemoveFromInvoice."""

    invoice_id: str
    session_ids: tuple[str, ...]
    request_id: str


@dataclass(frozen=True, slots=True)
class SubmitInvoice:
    invoice_id: str
    request_id: str


@dataclass(frozen=True, slots=True)
class CancellationOutcome:
    """What a cancellation does (or, previewed, would do)."""

    session_state: SessionState
    payment_state: PaymentState
    cancellation: Cancellation
    credit_move: LedgerKind

    @property
    def credits_returned(self) -> int:
        return CREDITS_PER_SESSION if self.credit_move is LedgerKind.RETURN else 0

    @property
    def credits_taken(self) -> int:
        return CREDITS_PER_SESSION if self.credit_move is LedgerKind.TAKE else 0
