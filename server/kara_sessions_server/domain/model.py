"""Domain values: what a session, a payment and a credit account are. No gRPC, no SQL."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

from kara_sessions_server.domain.errors import InsufficientCredits, InvalidRequest
from kara_sessions_server.domain.programme import (
    DEFAULT_PROGRAMME_ID,
    DEFAULT_TERMS,
    NONE_FORGIVEN,
    Forgiveness,
    ProgrammeChanges,
    Terms,
)

if TYPE_CHECKING:
    # decisions.py reads sessions; a reschedule's outcome only carries its Decision.
    from kara_sessions_server.domain.decisions import Decision

T = TypeVar("T")

# One booking holds one sponsored credit.
CREDITS_PER_SESSION = 1


class SessionState(enum.StrEnum):
    BOOKED = "BOOKED"
    CANCELLED_VOIDED = "CANCELLED_VOIDED"
    CANCELLED_PAID = "CANCELLED_PAID"
    COMPLETED = "COMPLETED"
    # The client did not come; the session's terms say whether the credit is taken.
    NO_SHOW = "NO_SHOW"


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
    # The client did not come, under terms that charge a no-show.
    NO_SHOW = "NO_SHOW"
    # A late move, charged: the client's under terms whose late_reschedule is CHARGE, or the
    # professional's with the box ticked. The session was booked again at the new time.
    CLIENT_LATE_RESCHEDULE = "CLIENT_LATE_RESCHEDULE"
    CHARGED_LATE_RESCHEDULE = "CHARGED_LATE_RESCHEDULE"


class InvoiceState(enum.StrEnum):
    DRAFT = "DRAFT"
    SUBMITTED = "SUBMITTED"


class LedgerKind(enum.StrEnum):
    GRANT = "GRANT"
    HOLD = "HOLD"
    RETURN = "RETURN"
    TAKE = "TAKE"
    # A waived charge: the taken credit goes back (used -1, available +1).
    REFUND = "REFUND"
    # Credits of a lot whose expire time has come (available -n, expired +n).
    EXPIRE = "EXPIRE"


# What happens to the held credit on entering a settled state (a NO_SHOW: see credit_move).
CREDIT_MOVE_FOR_STATE: dict[SessionState, LedgerKind] = {
    SessionState.CANCELLED_VOIDED: LedgerKind.RETURN,
    SessionState.CANCELLED_PAID: LedgerKind.TAKE,
    SessionState.COMPLETED: LedgerKind.TAKE,
}


def credit_move(state: SessionState, terms: Terms, *, forgiven: bool = False) -> LedgerKind | None:
    """What entering `state` does with the held credit under `terms` (a no-show's charge
    `forgiven` under the terms' free_late_cancellations returns it); None for BOOKED."""
    if state is SessionState.NO_SHOW:
        return LedgerKind.TAKE if terms.no_show_takes_credit and not forgiven else LedgerKind.RETURN
    return CREDIT_MOVE_FOR_STATE.get(state)


@dataclass(frozen=True, slots=True)
class Cancellation:
    cancelled_by: Party
    cancelled_at: datetime
    notified_at: datetime
    notice: timedelta
    late: bool
    charge_client: bool
    reason: str
    # The client cancelled within the terms' cancellation_grace after booking, with less notice
    # than the window: treated as enough notice.
    within_grace: bool = False
    # A late cancellation that would have been charged, voided as one of the client's
    # free_late_cancellations under the programme's terms.
    forgiven: bool = False


@dataclass(frozen=True, slots=True)
class Move:
    """One move of a session in place (a reschedule that took nothing)."""

    moved_at: datetime
    from_starts_at: datetime
    to_starts_at: datetime
    moved_by: Party
    notified_at: datetime
    notice: timedelta
    # Less notice than the window, moved free all the same (see policy.py).
    late: bool
    within_grace: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Waiver:
    """A charge waived afterwards: who (the principal) waived it, when and why."""

    waived_at: datetime
    waived_by: str
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
    # The programme whose credit the session holds, and its terms when the session was booked.
    programme_id: str = DEFAULT_PROGRAMME_ID
    terms: Terms = DEFAULT_TERMS
    no_show_at: datetime | None = None
    waiver: Waiver | None = None
    # Every move in place, oldest first (starts_at is the last one's to_starts_at).
    moves: tuple[Move, ...] = ()
    # A charged late reschedule settles one session and books another: each names the other.
    rescheduled_from: str = ""
    rescheduled_to: str = ""
    # The programme's version of `terms` (Programme.terms_version) the session was booked under.
    terms_version: int = 1
    # A no-show its terms charge, voided as one of the client's free_late_cancellations.
    no_show_forgiven: bool = False
    # Completed or marked a no-show by the server, nobody having marked it within its terms'
    # settle_unmarked_after of its start.
    settled_automatically: bool = False
    # When the credit it holds (or held) expires: its lot's expire time; None, never.
    credit_expires_at: datetime | None = None
    # How many of the client's charges had been forgiven within its terms' forgiveness_period
    # when its own charge was decided (0 where the terms forgive none): the one figure of its
    # decision (decisions.py) that nothing else records.
    forgiveness_used: int = 0


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
    programme_id: str = DEFAULT_PROGRAMME_ID
    terms: Terms = DEFAULT_TERMS
    waiver: Waiver | None = None
    no_show_forgiven: bool = False

    @property
    def section(self) -> PaymentSection:
        return self.state.section

    @classmethod
    def of(cls, session: Session, invoice_id: str = "") -> Payment:
        """A session's payment: every field follows from the session (and the invoice line, if
        any), so it is never read back."""
        return cls(
            session_id=session.session_id,
            client_id=session.client_id,
            professional_id=session.professional_id,
            session_starts_at=session.starts_at,
            state=payment_state(session),
            credits=session.credits,
            updated_at=session.updated_at,
            cancellation=session.cancellation,
            paid_reason=paid_reason(session),
            invoice_id=invoice_id,
            programme_id=session.programme_id,
            terms=session.terms,
            waiver=session.waiver,
            no_show_forgiven=session.no_show_forgiven,
        )


@dataclass(frozen=True, slots=True)
class SessionStep:
    """One settling step of a session's lifecycle (a cancellation, completion, no-show, waiver
    or charged move): the session after it, and what it does with the session's credit."""

    after: Session
    credit_move: LedgerKind


def changed(session: Session, now: datetime, **changes: Any) -> Session:
    """The session after one change at `now`: its next version. Every change is one version,
    and the repository's guarded UPDATE checks the version it replaces is still the row's."""
    return replace(session, updated_at=now, version=session.version + 1, **changes)


def payment_state(session: Session) -> PaymentState:
    """The session's payment: PENDING while booked, PAID while its credit is taken, else VOIDED."""
    return payment_state_for(
        session.state, session.terms, waived=session.waiver is not None, forgiven=session.no_show_forgiven
    )


def payment_state_for(
    state: SessionState, terms: Terms, *, waived: bool = False, forgiven: bool = False
) -> PaymentState:
    """The payment a session in `state` under `terms` has (payment_state's rule, for callers
    that hold the state and terms rather than a session); `forgiven`: a no-show's charge."""
    if state is SessionState.BOOKED:
        return PaymentState.PENDING
    if waived:
        return PaymentState.VOIDED
    move = credit_move(state, terms, forgiven=forgiven)
    return PaymentState.PAID if move is LedgerKind.TAKE else PaymentState.VOIDED


def paid_reason(session: Session) -> PaidReason | None:
    """Why the session's credit was taken; None while it is not (booked, voided or waived)."""
    if payment_state(session) is not PaymentState.PAID:
        return None
    if session.state is SessionState.NO_SHOW:
        return PaidReason.NO_SHOW
    if session.state is SessionState.COMPLETED:
        return PaidReason.COMPLETED
    if session.state is SessionState.CANCELLED_PAID:
        assert session.cancellation is not None
        by_client = session.cancellation.cancelled_by is Party.CLIENT
        if session.rescheduled_to:
            return PaidReason.CLIENT_LATE_RESCHEDULE if by_client else PaidReason.CHARGED_LATE_RESCHEDULE
        return PaidReason.CLIENT_LATE_CANCELLATION if by_client else PaidReason.CHARGED_LATE_CANCELLATION
    return None


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
    # The lot the credits moved in or out of: its expire time (None: never).
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class CreditLot:
    """An account's credits that expire together (issue 36): available + held + used + expired
    is what was granted to it."""

    expires_at: datetime | None
    granted: int
    available: int
    held: int
    used: int
    expired: int = 0


# How far ahead a grant's credits may be set to expire: a typo'd year would otherwise be for ever.
MAX_CREDIT_LIFETIME = timedelta(days=3653)


def check_credit_expiry(expires_at: datetime | None, now: datetime) -> None:
    """A grant's expire time: none (never), or in the future and at most ten years ahead."""
    if expires_at is None:
        return
    if expires_at <= now:
        raise InvalidRequest.single(
            "expire_time",
            f"must be in the future (server time is {now.isoformat()}); leave it empty for credits "
            "that never expire",
            reason="EXPIRE_TIME_NOT_IN_FUTURE",
        )
    if expires_at > now + MAX_CREDIT_LIFETIME:
        raise InvalidRequest.single(
            "expire_time",
            f"must be at most 10 years ahead (server time is {now.isoformat()})",
            reason="EXPIRE_TIME_TOO_FAR",
        )


def expires_on_return(session: Session, now: datetime) -> bool:
    """Whether the credit `session` gives back (a voided cancellation, a waiver) expires as it
    comes back: its lot's time has passed, and it must not come back to life."""
    return session.credit_expires_at is not None and session.credit_expires_at <= now


class Account(NamedTuple):
    """Which credit account: a client has one per programme."""

    client_id: str
    programme_id: str


def insufficient_credits(account: Account, purpose: str = "to book a session") -> InsufficientCredits:
    """The refusal of a move that needs a credit the client's account does not have available."""
    return InsufficientCredits(
        f"client {account.client_id} has no sponsored credit of programme {account.programme_id!r} "
        f"available {purpose}",
        metadata={"client_id": account.client_id, "programme_id": account.programme_id},
    )


@dataclass(frozen=True, slots=True)
class CreditAccount:
    client_id: str
    available: int
    held: int
    used: int
    entries: tuple[LedgerEntry, ...] = field(default=())
    next_page_token: str = ""
    # A client has one account per programme.
    programme_id: str = DEFAULT_PROGRAMME_ID
    # The token that resumes just after entries[i] (Page.token_after); None without entries.
    entries_after: Callable[[int], str] | None = field(default=None, compare=False, repr=False)
    expired: int = 0
    # The account's lots, the soonest to expire first (one that never expires last).
    lots: tuple[CreditLot, ...] = ()


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: tuple[T, ...]
    next_page_token: str
    # The token that resumes just after items[i]: a page cut shorter to fit in one message
    # (entrypoints/grpc/sizes.py) hands it on instead of next_page_token.
    token_after: Callable[[int], str] = field(compare=False, repr=False)


# --- commands: what a caller asks for, already parsed into domain types ---


@dataclass(frozen=True, slots=True)
class BookSession:
    client_id: str
    professional_id: str
    starts_at: datetime
    request_id: str
    programme_id: str = DEFAULT_PROGRAMME_ID


@dataclass(frozen=True, slots=True)
class CancelSession:
    session_id: str
    cancelled_by: Party
    charge_client: bool
    notified_at: datetime | None
    reason: str
    request_id: str


@dataclass(frozen=True, slots=True)
class RescheduleSession:
    session_id: str
    new_starts_at: datetime
    rescheduled_by: Party
    charge_client: bool
    notified_at: datetime | None
    reason: str
    request_id: str


@dataclass(frozen=True, slots=True)
class CompleteSession:
    session_id: str
    request_id: str


@dataclass(frozen=True, slots=True)
class MarkNoShow:
    session_id: str
    request_id: str


@dataclass(frozen=True, slots=True)
class SettleUnmarked:
    """The server's own settlement of a session nobody marked (never a caller's request)."""

    session_id: str
    request_id: str


@dataclass(frozen=True, slots=True)
class WaiveCharge:
    session_id: str
    reason: str
    request_id: str


@dataclass(frozen=True, slots=True)
class GrantCredits:
    client_id: str
    credits: int
    request_id: str
    programme_id: str = DEFAULT_PROGRAMME_ID
    # When the granted credits expire (None: never); grants with one expire time share a lot.
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ExpireCredits:
    """The server's own expiry of a lot whose time has come (never a caller's request)."""

    client_id: str
    programme_id: str
    expires_at: datetime
    request_id: str


@dataclass(frozen=True, slots=True)
class CreateProgramme:
    programme_id: str
    display_name: str
    terms: Terms
    request_id: str


@dataclass(frozen=True, slots=True)
class UpdateProgramme:
    programme_id: str
    changes: ProgrammeChanges
    request_id: str
    # The version the caller changed (Programme.etag); "" applies the change to the latest.
    etag: str = ""


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
    # The session as the cancellation leaves it (what CancelSession records).
    after: Session
    # The client's free late cancellations when it was decided (the preview's figures).
    forgiveness: Forgiveness = NONE_FORGIVEN

    @property
    def credits_returned(self) -> int:
        return CREDITS_PER_SESSION if self.credit_move is LedgerKind.RETURN else 0

    @property
    def credits_taken(self) -> int:
        return CREDITS_PER_SESSION if self.credit_move is LedgerKind.TAKE else 0


@dataclass(frozen=True, slots=True)
class RescheduleOutcome:
    """What a reschedule does (or, previewed, would do): a move in place (the session stays
    BOOKED), or, when `charged`, a late cancellation of the session (`cancellation`, the state
    the lifecycle's table gives it) and a new booking at the new time."""

    session_state: SessionState
    move: Move
    cancellation: Cancellation | None
    # What RescheduleSession records as its decision.
    decision: Decision | None = None

    @property
    def charged(self) -> bool:
        return self.session_state is not SessionState.BOOKED

    @property
    def credits_taken(self) -> int:
        return CREDITS_PER_SESSION if self.charged else 0

    @property
    def credits_held(self) -> int:
        """Newly held: the new booking's credit (a move in place keeps the one it holds)."""
        return CREDITS_PER_SESSION if self.charged else 0


@dataclass(frozen=True, slots=True)
class Rescheduled:
    """A committed reschedule: the session at its new time, and the one a charge settled."""

    session: Session
    charged: Session | None = None
