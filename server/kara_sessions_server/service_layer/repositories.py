"""What the use cases ask of storage, reached through their unit of work (uow.sessions,
uow.ledger, ...): the repositories as the service layer sees them, and the values they trade in.
adapters/ implements them on SQLite and PostgreSQL; tests/support/memory.py in memory.

Each states what a caller may rely on, whatever holds the data: a guarded change refuses as
the race it lost says (SessionNotBooked, Conflict, ...) and changes nothing; a list is one
keyset page (pagination.py) whose token belongs to its query."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple, Protocol

from kara_sessions_server.domain.errors import InvalidRequest
from kara_sessions_server.domain.feed import Change, EventType
from kara_sessions_server.domain.invoicing import Candidate
from kara_sessions_server.domain.model import (
    Account,
    CreditAccount,
    Invoice,
    InvoiceLine,
    InvoiceState,
    LedgerKind,
    Page,
    Payment,
    PaymentSection,
    Session,
    SessionState,
)
from kara_sessions_server.domain.principal import Principal
from kara_sessions_server.domain.programme import Programme
from kara_sessions_server.domain.usage import Record, Usage
from kara_sessions_server.service_layer.pagination import from_token, to_token


class SessionRepository(Protocol):
    def get(self, session_id: str) -> Session:
        """Raises NotFound."""
        ...

    def get_with_invoice(self, session_id: str) -> tuple[Session, str]:
        """The session and the invoice it is on ("" for none); raises NotFound."""
        ...

    def add(self, session: Session) -> None: ...

    def change_state(self, before: Session, after: Session) -> Session:
        """Writes `after` (model.changed: `before`'s next version) only if the session is still
        exactly `before`; else refuses as the race it lost says. Returns `after`."""
        ...

    def move(self, before: Session, after: Session) -> Session:
        """As change_state, for a move in place: the start and the moves."""
        ...

    def hold(self, session: Session) -> None:
        """No change of the session by others can commit before this unit of work ends."""
        ...

    def forgiven_since(self, session: Session, since: datetime) -> int:
        """How many charges of `session`'s client under its programme were forgiven at or after
        `since`."""
        ...

    def unmarked_due(self, now: datetime, limit: int) -> list[str]:
        """Up to `limit` sessions still BOOKED their terms' settle_unmarked_after past their
        start (by `now`)."""
        ...

    def audit(
        self,
        before: Session | None,
        after: Session,
        action: str,
        actor: str,
        principal: Principal,
        request_id: str,
        now: datetime,
    ) -> None: ...

    def page(
        self, professional_id: str, client_id: str, state: SessionState | None, size: int, token: str
    ) -> Page[Session]:
        """Oldest start first."""
        ...

    def payments(self, professional_id: str, section: PaymentSection, size: int, token: str) -> Page[Payment]:
        """Most recent session first."""
        ...

    def prune_audit(self, older_than: datetime, batch: int) -> int: ...


class Ledger(Protocol):
    """Balances change only with an entry for the move, so available + held + used + expired
    always equals the credits granted, for an account and for each of its lots (the credits
    that expire together; None: never)."""

    def grant(
        self,
        account: Account,
        credits: int,
        request_id: str,
        now: datetime,
        expires_at: datetime | None = None,
    ) -> None: ...

    def hold(
        self,
        account: Account,
        session_id: str,
        credits: int,
        request_id: str,
        now: datetime,
        valid_at: datetime,
        purpose: str = "to book a session",
    ) -> datetime | None:
        """Holds from the lot that expires soonest among those valid at `valid_at`; returns its
        expire time. Raises InsufficientCredits, or CreditsExpireBeforeSession when credits are
        there but none is valid then, and holds nothing."""
        ...

    def hold_lot(self, account: Account, expires_at: datetime) -> None:
        """No change of the lot of `expires_at` by others can commit before this unit of work
        ends: taken before anything of the account's, the order every change takes them in."""
        ...

    def hold_account(self, account: Account) -> None:
        """No change of the account by others can commit before this unit of work ends."""
        ...

    def check_hold(
        self, account: Account, credits: int, now: datetime, valid_at: datetime, purpose: str
    ) -> None:
        """Refuses as `hold` would, holding nothing."""
        ...

    def settle(
        self,
        account: Account,
        session_id: str,
        kind: LedgerKind,
        credits: int,
        request_id: str,
        now: datetime,
        expires_at: datetime | None = None,
    ) -> None:
        """RETURN or TAKE a held credit, or REFUND a taken one, in the lot of `expires_at`."""
        ...

    def expire(
        self,
        account: Account,
        session_id: str | None,
        credits: int,
        request_id: str,
        now: datetime,
        expires_at: datetime,
    ) -> None:
        """EXPIRE available credits of the lot of `expires_at`."""
        ...

    def due_lots(self, now: datetime, limit: int) -> list[tuple[Account, datetime]]:
        """Lots whose expire time has come with credits still available."""
        ...

    def lot_available(self, account: Account, expires_at: datetime | None) -> int: ...

    def balance(self, key: Account) -> CreditAccount:
        """With its lots. Raises NotFound for an account never granted a credit."""
        ...

    def account(self, key: Account, size: int, token: str) -> CreditAccount:
        """The balance with one page of its entries, newest first."""
        ...


class ProgrammeRepository(Protocol):
    def find(self, programme_id: str, *, for_change: bool = False) -> Programme | None:
        """`for_change`: no other change to it can commit before this unit of work ends."""
        ...

    def get(self, programme_id: str, *, for_change: bool = False) -> Programme:
        """Raises NotFound."""
        ...

    def add(self, programme: Programme) -> bool:
        """False if a programme with its id exists already."""
        ...

    def create(self, programme: Programme) -> None:
        """Raises AlreadyExists."""
        ...

    def change(self, before: Programme, after: Programme) -> None:
        """Only if it is still `before`'s version; else raises Conflict."""
        ...

    def page(self, size: int, token: str) -> Page[Programme]: ...


class Reports(Protocol):
    """What a programme's report reads (usage.py): counts and recorded decisions, no rows kept."""

    def usage(self, programme_id: str, bounds: Sequence[datetime]) -> list[Usage]:
        """The counts of each period [bounds[i], bounds[i + 1]) (distinct_clients left 0)."""
        ...

    def distinct_clients(self, programme_id: str, start: datetime, end: datetime) -> int:
        """How many clients booked a session of the programme in [start, end)."""
        ...

    def records(
        self, programme_id: str, start: datetime, end: datetime, *, forgiven_only: bool = False
    ) -> list[Record]:
        """The sessions that recorded a decision in [start, end) a simulation replays (a
        cancellation, a move, a no-show, a settlement: usage.decided reads them), or with
        `forgiven_only` those whose charge was forgiven then."""
        ...


class InvoiceRepository(Protocol):
    def get(self, invoice_id: str) -> Invoice:
        """With its lines; raises NotFound."""
        ...

    def add(self, invoice: Invoice) -> None: ...

    def change(self, before: Invoice, after: Invoice) -> None:
        """Only if it is still exactly `before`; else InvoiceNotDraft or Conflict."""
        ...

    def add_lines(self, invoice_id: str, lines: Sequence[InvoiceLine]) -> None:
        """All or none: SessionsRefused if another invoice took any of them first."""
        ...

    def remove_lines(self, invoice_id: str, session_ids: Sequence[str]) -> None: ...

    def invoices_of(self, session_ids: Sequence[str]) -> dict[str, str]:
        """session_id -> the invoice it is on, for those on one."""
        ...

    def candidates(self, session_ids: Sequence[str]) -> dict[str, Candidate]:
        """The sessions among `session_ids` that exist, each with its invoice, held from change
        by others until this unit of work ends."""
        ...

    def uninvoiced_paid(self, professional_id: str, up_to: datetime, limit: int) -> list[Candidate]:
        """The professional's paid sessions on no invoice starting by `up_to`, oldest first."""
        ...

    def audit(
        self,
        invoice_id: str,
        action: str,
        session_ids: Sequence[str],
        principal: Principal,
        request_id: str,
        now: datetime,
    ) -> None: ...

    def page(self, professional_id: str, state: InvoiceState | None, size: int, token: str) -> Page[Invoice]:
        """Newest first, each with its line count and total, without its lines."""
        ...


class Cursor(NamedTuple):
    """A place in the event feed: events are ordered by (txid, position)."""

    txid: int
    position: int

    def encode(self) -> str:
        return to_token(f"{self.txid}.{self.position}")


# What Cursor.encode writes, and nothing else: no sign, space, underscore or leading zero, and
# each part within a 64-bit column (checked after the match).
_CANONICAL = re.compile(r"(0|[1-9][0-9]{0,18})\.(0|[1-9][0-9]{0,18})")
_MAX_BIGINT = 2**63 - 1


def decode_cursor(token: str, field: str = "after") -> Cursor | None:
    """The cursor an event's `cursor` encodes; None for the feed's start ("")."""
    if not token:
        return None
    match = _CANONICAL.fullmatch(from_token(token) or "")
    cursor = Cursor(int(match[1]), int(match[2])) if match else None
    if cursor is None or max(cursor) > _MAX_BIGINT:
        raise InvalidRequest.single(field, "is not an event cursor: pass an event's `cursor`, or omit it")
    return cursor


@dataclass(frozen=True, slots=True)
class StoredEvent:
    cursor: Cursor
    event_id: str
    type: EventType
    subject: str
    time: datetime
    data: str


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """The request that made a change: its request_id, and what a replay is checked against."""

    request_id: str
    operation: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class StoredResult:
    """What a request_id's first request stored: checked against a replay, then returned."""

    operation: str
    fingerprint: str
    result: str


class DuplicateRequestId(Exception):
    """Another request recorded this request_id first (a retry that overtook its original)."""


class Outbox(Protocol):
    """The event feed: each committed change's event, which is also its request's record."""

    def append(self, change: Change, data: str, now: datetime, request: RequestRecord) -> None:
        """In the change's unit of work; raises DuplicateRequestId if the request_id is taken."""
        ...

    def read(
        self,
        after: Cursor | None,
        limit: int,
        types: Sequence[EventType] = (),
        professional_id: str | None = None,
        client_id: str | None = None,
    ) -> list[StoredEvent]:
        """Up to `limit` events after the cursor, in feed order; raises CursorExpired for a
        cursor older than the events kept."""
        ...

    def prune(self, older_than: datetime, request_ids_older_than: datetime, batch: int, now: datetime) -> int:
        """Deletes up to `batch` of the oldest events older than `older_than` whose request_id
        (if still held) is older than `request_ids_older_than`; returns how many."""
        ...


class RequestLog(Protocol):
    def find(self, request_id: str) -> StoredResult | None: ...

    def prune(self, older_than: datetime, batch: int) -> int:
        """Forgets up to `batch` request_ids recorded before `older_than` (their events stay)."""
        ...
