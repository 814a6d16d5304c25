"""A unit of work in memory, for the service layer's tests (tests/service_layer/): the use cases
run against it in milliseconds, with no server and no database.

It keeps the promises service_layer/repositories.py states, not the SQL's details: a unit of
work sees a copy of the data, one at a time, and only commit() makes its copy the data; a
guarded change of a session or an invoice that is no longer what was read refuses as the race
it lost says. The real ones (adapters/) are tested against real SQLite and PostgreSQL in
tests/api/ and tests/operations/; this one never stands in for them there."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self, TypeVar

from kara_sessions_server.domain.clock import MICROSECOND
from kara_sessions_server.domain.errors import (
    AlreadyExists,
    Conflict,
    CreditsExpireBeforeSession,
    CursorExpired,
    InvoiceNotDraft,
    NotFound,
    PreconditionViolation,
    SessionsRefused,
)
from kara_sessions_server.domain.feed import Change, EventType
from kara_sessions_server.domain.invoicing import Candidate, subject
from kara_sessions_server.domain.model import (
    Account,
    CreditAccount,
    CreditLot,
    Invoice,
    InvoiceLine,
    InvoiceState,
    LedgerEntry,
    LedgerKind,
    Page,
    Payment,
    PaymentSection,
    PaymentState,
    Session,
    SessionState,
    insufficient_credits,
    payment_state,
)
from kara_sessions_server.domain.principal import Principal
from kara_sessions_server.domain.programme import Programme
from kara_sessions_server.domain.session_lifecycle import lost_race
from kara_sessions_server.domain.usage import Record, Usage, record_of, recorded
from kara_sessions_server.service_layer.pagination import cut, decode
from kara_sessions_server.service_layer.repositories import (
    Cursor,
    DuplicateRequestId,
    RequestRecord,
    StoredEvent,
    StoredResult,
)
from kara_sessions_server.service_layer.unit_of_work import UnitOfWork

T = TypeVar("T")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# How a ledger move changes (available, held, used), and what it needs there first.
# What each move does to (available, held, used, expired), and which of them it needs enough of.
_MOVES = {
    LedgerKind.GRANT: ((1, 0, 0, 0), None),
    LedgerKind.HOLD: ((-1, 1, 0, 0), 0),
    LedgerKind.RETURN: ((1, -1, 0, 0), 1),
    LedgerKind.TAKE: ((0, -1, 1, 0), 1),
    LedgerKind.REFUND: ((1, 0, -1, 0), 2),
    LedgerKind.EXPIRE: ((-1, 0, 0, 1), 0),
}
Balance = tuple[int, int, int, int]


def _micros(at: datetime) -> int:
    return (at - _EPOCH) // MICROSECOND


@dataclass(frozen=True)
class Event:
    stored: StoredEvent
    change: Change
    request: RequestRecord | None


@dataclass(frozen=True)
class AuditRow:
    subject: str
    action: str
    principal: str
    request_id: str
    at: datetime
    detail: tuple[Any, ...] = ()


@dataclass
class Data:
    """Everything a database would hold. Values are immutable, so a copy of each collection is a
    copy of it all."""

    sessions: dict[str, Session] = field(default_factory=dict)
    accounts: dict[Account, Balance] = field(default_factory=dict)
    entries: list[tuple[Account, LedgerEntry]] = field(default_factory=list)
    programmes: dict[str, Programme] = field(default_factory=dict)
    invoices: dict[str, Invoice] = field(default_factory=dict)
    # session_id -> (invoice_id, line): a session is on one invoice at most.
    lines: dict[str, tuple[str, InvoiceLine]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    audit: list[AuditRow] = field(default_factory=list)
    pruned: Cursor | None = None
    # (account, expire time or None) -> (granted, the lot's balance)
    lots: dict[tuple[Account, datetime | None], tuple[int, Balance]] = field(default_factory=dict)

    def copy(self) -> Data:
        return Data(
            dict(self.sessions),
            dict(self.accounts),
            list(self.entries),
            dict(self.programmes),
            dict(self.invoices),
            dict(self.lines),
            list(self.events),
            list(self.audit),
            self.pruned,
            dict(self.lots),
        )


def _page(
    query: tuple[str, ...],
    items: Sequence[T],
    key: Callable[[T], list[str | int]],
    shape: Sequence[type],
    size: int,
    token: str,
    *,
    newest_first: bool = False,
) -> Page[T]:
    """One keyset page of `items` (already in order), as the SQL lists page."""
    after = decode(query, token, shape)
    if after is not None:
        items = [i for i in items if (key(i) < after if newest_first else key(i) > after)]
    rows, next_token, resume = cut(query, list(items[: size + 1]), size, key)
    return Page(tuple(rows), next_token, resume)


class MemorySessions:
    def __init__(self, data: Data):
        self._data = data

    def get(self, session_id: str) -> Session:
        found = self._data.sessions.get(session_id)
        if found is None:
            raise NotFound(f"session {session_id} does not exist", metadata={"session_id": session_id})
        return found

    def get_with_invoice(self, session_id: str) -> tuple[Session, str]:
        return self.get(session_id), self._data.lines.get(session_id, ("", None))[0]

    def add(self, session: Session) -> None:
        assert session.session_id not in self._data.sessions, "a session id is used once"
        self._data.sessions[session.session_id] = session

    def change_state(self, before: Session, after: Session) -> Session:
        if after.version != before.version + 1:
            raise ValueError(f"session {before.session_id}: a change is one version (model.changed)")
        current = self.get(before.session_id)
        if (current.state, current.version) != (before.state, before.version):
            raise lost_race(before, current)
        self._data.sessions[after.session_id] = after
        return after

    def move(self, before: Session, after: Session) -> Session:
        return self.change_state(before, after)

    def unmarked_due(self, now: datetime, limit: int) -> list[str]:
        # Earliest first (the adapters' order within each version of terms).
        due = sorted(
            (s.starts_at, s.session_id)
            for s in self._data.sessions.values()
            if s.state is SessionState.BOOKED
            and s.terms.settle_unmarked_after
            and s.starts_at + s.terms.settle_unmarked_after <= now
        )
        return [session_id for _, session_id in due[:limit]]

    def hold(self, session: Session) -> None:
        pass  # one unit of work at a time holds everything

    def forgiven_since(self, session: Session, since: datetime) -> int:
        def forgiven_at(s: Session) -> datetime | None:
            if s.cancellation is not None and s.cancellation.forgiven:
                return s.cancellation.cancelled_at
            return s.no_show_at if s.no_show_forgiven else None

        return sum(
            1
            for s in self._data.sessions.values()
            if (s.client_id, s.programme_id) == (session.client_id, session.programme_id)
            and (at := forgiven_at(s)) is not None
            and at >= since
        )

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
        detail = (actor, before.state if before else None, after.state)
        self._data.audit.append(AuditRow(after.session_id, action, str(principal), request_id, now, detail))

    def page(
        self, professional_id: str, client_id: str, state: SessionState | None, size: int, token: str
    ) -> Page[Session]:
        found = sorted(
            (
                s
                for s in self._data.sessions.values()
                if (not professional_id or s.professional_id == professional_id)
                and (not client_id or s.client_id == client_id)
                and (state is None or s.state is state)
            ),
            key=lambda s: (s.starts_at, s.session_id),
        )
        query = ("sessions", professional_id, client_id, state.value if state else "")
        return _page(query, found, lambda s: [_micros(s.starts_at), s.session_id], (int, str), size, token)

    def payments(self, professional_id: str, section: PaymentSection, size: int, token: str) -> Page[Payment]:
        found = sorted(
            (
                s
                for s in self._data.sessions.values()
                if s.professional_id == professional_id and payment_state(s).section is section
            ),
            key=lambda s: (s.starts_at, s.session_id),
            reverse=True,
        )
        query = ("payments", professional_id, section.value)
        page = _page(
            query,
            found,
            lambda s: [_micros(s.starts_at), s.session_id],
            (int, str),
            size,
            token,
            newest_first=True,
        )
        invoice_of = self._data.lines
        return Page(
            tuple(Payment.of(s, invoice_of.get(s.session_id, ("", None))[0]) for s in page.items),
            page.next_page_token,
            page.token_after,
        )

    def prune_audit(self, older_than: datetime, batch: int) -> int:
        old = [row for row in self._data.audit if row.at < older_than][:batch]
        for row in old:
            self._data.audit.remove(row)
        return len(old)


def _moved(balance: Balance, kind: LedgerKind, credits: int) -> Balance | None:
    """`balance` after the move, or None if it has not enough of what the move takes."""
    delta, needs = _MOVES[kind]
    if needs is not None and balance[needs] < credits:
        return None
    a, h, u, e = (b + d * credits for b, d in zip(balance, delta, strict=True))
    return a, h, u, e


def _soonest_first(expires_at: datetime | None) -> tuple[bool, datetime | None]:
    return (expires_at is None, expires_at)


class MemoryLedger:
    def __init__(self, data: Data):
        self._data = data

    def _move(
        self,
        account: Account,
        lot: datetime | None,
        kind: LedgerKind,
        credits: int,
        session_id: str | None,
        request_id: str,
        now: datetime,
    ) -> bool:
        granted, lot_balance = self._data.lots.get((account, lot), (0, (0, 0, 0, 0)))
        if kind is not LedgerKind.GRANT and (account, lot) not in self._data.lots:
            return False
        account_after = _moved(self._data.accounts.get(account, (0, 0, 0, 0)), kind, credits)
        lot_after = _moved(lot_balance, kind, credits)
        if account_after is None or lot_after is None:
            return False
        self._data.accounts[account] = account_after
        granted += credits if kind is LedgerKind.GRANT else 0
        self._data.lots[account, lot] = (granted, lot_after)
        entry_id = str(len(self._data.entries) + 1)
        entry = LedgerEntry(entry_id, account.client_id, kind, credits, session_id, request_id, now, lot)
        self._data.entries.append((account, entry))
        return True

    def grant(
        self,
        account: Account,
        credits: int,
        request_id: str,
        now: datetime,
        expires_at: datetime | None = None,
    ) -> None:
        self._move(account, expires_at, LedgerKind.GRANT, credits, None, request_id, now)

    def _valid_lots(self, account: Account, credits: int, valid_at: datetime) -> list[datetime | None]:
        """The lots valid at `valid_at` with the credits, the soonest to expire first."""
        valid = [
            lot
            for (key, lot), (_, balance) in self._data.lots.items()
            if key == account and balance[0] >= credits and (lot is None or lot > valid_at)
        ]
        return sorted(valid, key=_soonest_first)

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
        self.check_hold(account, credits, now, valid_at, purpose)
        lot = self._valid_lots(account, credits, valid_at)[0]
        assert self._move(account, lot, LedgerKind.HOLD, credits, session_id, request_id, now)
        return lot

    def hold_lot(self, account: Account, expires_at: datetime) -> None:
        pass  # one unit of work at a time holds everything

    def hold_account(self, account: Account) -> None:
        pass

    def check_hold(
        self, account: Account, credits: int, now: datetime, valid_at: datetime, purpose: str
    ) -> None:
        if self._valid_lots(account, credits, valid_at):
            return
        early = [
            lot for lot in self._valid_lots(account, credits, now) if lot is not None and lot <= valid_at
        ]
        if not early:
            raise insufficient_credits(account, purpose)
        raise CreditsExpireBeforeSession(
            f"client {account.client_id}'s credits expire at {early[-1].isoformat()}, before "
            f"{valid_at.isoformat()}",
            metadata={"client_id": account.client_id, "programme_id": account.programme_id},
        )

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
        if kind not in (LedgerKind.RETURN, LedgerKind.TAKE, LedgerKind.REFUND):
            raise ValueError(f"cannot settle a credit with {kind}")
        if not self._move(account, expires_at, kind, credits, session_id, request_id, now):
            raise AssertionError(f"no credit to {kind.value.lower()} for session {session_id}")

    def expire(
        self,
        account: Account,
        session_id: str | None,
        credits: int,
        request_id: str,
        now: datetime,
        expires_at: datetime,
    ) -> None:
        if not self._move(account, expires_at, LedgerKind.EXPIRE, credits, session_id, request_id, now):
            raise AssertionError(f"no credit to expire in {account}'s lot of {expires_at}")

    def due_lots(self, now: datetime, limit: int) -> list[tuple[Account, datetime]]:
        due = sorted(
            (lot, key)
            for (key, lot), (_, balance) in self._data.lots.items()
            if lot is not None and lot <= now and balance[0] > 0
        )
        return [(key, lot) for lot, key in due[:limit]]

    def lot_available(self, account: Account, expires_at: datetime | None) -> int:
        return self._data.lots.get((account, expires_at), (0, (0, 0, 0, 0)))[1][0]

    def balance(self, key: Account) -> CreditAccount:
        if key not in self._data.accounts:
            raise NotFound(
                f"client {key.client_id} has no credit account in programme {key.programme_id!r}",
                metadata={"client_id": key.client_id, "programme_id": key.programme_id},
            )
        available, held, used, expired = self._data.accounts[key]
        lots = tuple(
            CreditLot(lot, granted, *balance)
            for (account, lot), (granted, balance) in sorted(
                self._data.lots.items(), key=lambda item: _soonest_first(item[0][1])
            )
            if account == key
        )
        return CreditAccount(
            key.client_id, available, held, used, programme_id=key.programme_id, expired=expired, lots=lots
        )

    def account(self, key: Account, size: int, token: str) -> CreditAccount:
        current = self.balance(key)
        newest = [entry for account, entry in reversed(self._data.entries) if account == key]
        query = ("ledger", key.client_id, key.programme_id)
        page = _page(query, newest, lambda e: [int(e.entry_id)], (int,), size, token, newest_first=True)
        return replace(
            current, entries=page.items, next_page_token=page.next_page_token, entries_after=page.token_after
        )


class MemoryProgrammes:
    def __init__(self, data: Data):
        self._data = data

    def find(self, programme_id: str, *, for_change: bool = False) -> Programme | None:
        return self._data.programmes.get(programme_id)

    def get(self, programme_id: str, *, for_change: bool = False) -> Programme:
        found = self.find(programme_id)
        if found is None:
            raise NotFound(
                f"programme {programme_id!r} does not exist", metadata={"programme_id": programme_id}
            )
        return found

    def add(self, programme: Programme) -> bool:
        if programme.programme_id in self._data.programmes:
            return False
        self._data.programmes[programme.programme_id] = programme
        return True

    def create(self, programme: Programme) -> None:
        if not self.add(programme):
            raise AlreadyExists(
                f"programme {programme.programme_id!r} already exists",
                metadata={"programme_id": programme.programme_id},
            )

    def change(self, before: Programme, after: Programme) -> None:
        if self.get(before.programme_id).version != before.version:
            raise Conflict(f"programme {before.programme_id!r} was changed by another request")
        self._data.programmes[before.programme_id] = replace(after, version=before.version + 1)

    def page(self, size: int, token: str) -> Page[Programme]:
        ordered = sorted(self._data.programmes.values(), key=lambda p: p.programme_id)
        return _page(("programmes",), ordered, lambda p: [p.programme_id], (str,), size, token)


class MemoryInvoices:
    def __init__(self, data: Data):
        self._data = data

    def _lines_of(self, invoice_id: str) -> tuple[InvoiceLine, ...]:
        return tuple(line for on, line in self._data.lines.values() if on == invoice_id)

    def get(self, invoice_id: str) -> Invoice:
        found = self._data.invoices.get(invoice_id)
        if found is None:
            raise NotFound(f"invoice {invoice_id} does not exist", metadata={"invoice_id": invoice_id})
        return found.with_lines(self._lines_of(invoice_id))

    def add(self, invoice: Invoice) -> None:
        self._data.invoices[invoice.invoice_id] = replace(invoice, lines=())

    def change(self, before: Invoice, after: Invoice) -> None:
        current = self.get(before.invoice_id)
        if (current.state, current.version) == (before.state, before.version):
            self._data.invoices[before.invoice_id] = replace(after, version=before.version + 1, lines=())
            return
        if current.state is not InvoiceState.DRAFT:
            raise InvoiceNotDraft(f"invoice {before.invoice_id} was submitted by another request")
        raise Conflict(f"invoice {before.invoice_id} was changed by another request")

    def add_lines(self, invoice_id: str, lines: Sequence[InvoiceLine]) -> None:
        taken = {
            line.session_id: self._data.lines[line.session_id][0]
            for line in lines
            if line.session_id in self._data.lines and self._data.lines[line.session_id][0] != invoice_id
        }
        if taken:
            raise SessionsRefused(
                [
                    PreconditionViolation(
                        "SESSION_ALREADY_INVOICED", subject(sid), f"session {sid} was put on invoice {other}"
                    )
                    for sid, other in sorted(taken.items())
                ]
            )
        for line in lines:
            self._data.lines[line.session_id] = (invoice_id, line)

    def remove_lines(self, invoice_id: str, session_ids: Sequence[str]) -> None:
        for session_id in session_ids:
            if self._data.lines.get(session_id, ("", None))[0] != invoice_id:
                raise Conflict(f"the lines of invoice {invoice_id} changed concurrently")
            del self._data.lines[session_id]

    def invoices_of(self, session_ids: Sequence[str]) -> dict[str, str]:
        return {sid: self._data.lines[sid][0] for sid in session_ids if sid in self._data.lines}

    def candidates(self, session_ids: Sequence[str]) -> dict[str, Candidate]:
        on = self.invoices_of(session_ids)
        return {
            sid: Candidate(self._data.sessions[sid], on.get(sid, ""))
            for sid in sorted(session_ids)
            if sid in self._data.sessions
        }

    def uninvoiced_paid(self, professional_id: str, up_to: datetime, limit: int) -> list[Candidate]:
        paid = sorted(
            (
                s
                for s in self._data.sessions.values()
                if s.professional_id == professional_id
                and s.starts_at <= up_to
                and payment_state(s) is PaymentState.PAID
                and s.session_id not in self._data.lines
            ),
            key=lambda s: (s.starts_at, s.session_id),
        )
        return [Candidate(s, "") for s in paid[:limit]]

    def audit(
        self,
        invoice_id: str,
        action: str,
        session_ids: Sequence[str],
        principal: Principal,
        request_id: str,
        now: datetime,
    ) -> None:
        self._data.audit.append(
            AuditRow(invoice_id, action, str(principal), request_id, now, tuple(session_ids))
        )

    def page(self, professional_id: str, state: InvoiceState | None, size: int, token: str) -> Page[Invoice]:
        found = sorted(
            (
                self.get(i.invoice_id)
                for i in self._data.invoices.values()
                if i.professional_id == professional_id and (state is None or i.state is state)
            ),
            key=lambda i: (i.created_at, i.invoice_id),
            reverse=True,
        )
        query = ("invoices", professional_id, state.value if state else "")
        page = _page(
            query,
            found,
            lambda i: [_micros(i.created_at), i.invoice_id],
            (int, str),
            size,
            token,
            newest_first=True,
        )
        return Page(tuple(replace(i, lines=()) for i in page.items), page.next_page_token, page.token_after)


class MemoryOutbox:
    def __init__(self, data: Data):
        self._data = data

    def append(self, change: Change, data: str, now: datetime, request: RequestRecord) -> None:
        if any(e.request and e.request.request_id == request.request_id for e in self._data.events):
            raise DuplicateRequestId(request.request_id)
        position = self._data.events[-1].stored.cursor.position + 1 if self._data.events else 1
        stored = StoredEvent(Cursor(0, position), str(uuid.uuid4()), change.type, change.subject, now, data)
        self._data.events.append(Event(stored, change, request))

    def read(
        self,
        after: Cursor | None,
        limit: int,
        types: Sequence[EventType] = (),
        professional_id: str | None = None,
        client_id: str | None = None,
    ) -> list[StoredEvent]:
        if after is not None and self._data.pruned is not None and after < self._data.pruned:
            raise CursorExpired("this cursor is older than the events kept")
        start = after or Cursor(0, 0)
        found = [
            e.stored
            for e in self._data.events
            if e.stored.cursor > start
            and (not types or e.stored.type in types)
            and (professional_id is None or e.change.professional_id == professional_id)
            and (client_id is None or e.change.client_id == client_id)
        ]
        return found[:limit]

    def prune(self, older_than: datetime, request_ids_older_than: datetime, batch: int, now: datetime) -> int:
        gone = 0
        for event in list(self._data.events[:batch]):
            kept_for_replay = event.request is not None and event.stored.time >= request_ids_older_than
            if event.stored.time >= older_than or kept_for_replay:
                break
            self._data.events.remove(event)
            self._data.pruned = event.stored.cursor
            gone += 1
        return gone


class MemoryRequests:
    def __init__(self, data: Data):
        self._data = data

    def find(self, request_id: str) -> StoredResult | None:
        for event in self._data.events:
            if event.request is not None and event.request.request_id == request_id:
                return StoredResult(event.request.operation, event.request.fingerprint, event.stored.data)
        return None

    def prune(self, older_than: datetime, batch: int) -> int:
        old = [i for i, e in enumerate(self._data.events) if e.request and e.stored.time < older_than][:batch]
        for i in old:
            self._data.events[i] = replace(self._data.events[i], request=None)
        return len(old)


class MemoryReports:
    """A programme's report from the sessions and ledger in memory, counted as the SQL counts."""

    def __init__(self, data: Data):
        self._data = data

    def usage(self, programme_id: str, bounds: Sequence[datetime]) -> list[Usage]:
        per_month = [Usage() for _ in bounds[1:]]

        def month(at: datetime | None) -> int:
            return next((i for i in range(len(per_month)) if at and bounds[i] <= at < bounds[i + 1]), -1)

        for s in self._data.sessions.values():
            if s.programme_id != programme_id:
                continue
            if (booked := month(s.booked_at)) >= 0:
                per_month[booked].sessions_booked += 1
            c = s.cancellation
            charged = payment_state(s) is PaymentState.PAID or s.waiver is not None
            outcome = recorded(
                s.state.value, bool(s.rescheduled_to), bool(c and c.late), bool(c and c.within_grace), charged
            )
            decided = month(c.cancelled_at if c else s.completed_at or s.no_show_at)
            if outcome is not None and decided >= 0:
                per_month[decided].count(outcome, 1, s.credits)
                per_month[decided].sessions_settled_automatically += s.settled_automatically
            if s.waiver is not None and (waived := month(s.waiver.waived_at)) >= 0:
                per_month[waived].charges_waived += 1
                per_month[waived].credits_returned += s.credits
        for account, entry in self._data.entries:
            at = month(entry.created_at)
            if account.programme_id != programme_id or at < 0:
                continue
            if entry.kind is LedgerKind.GRANT:
                per_month[at].credits_granted += entry.credits
            elif entry.kind is LedgerKind.EXPIRE:
                per_month[at].credits_expired += entry.credits
        return per_month

    def distinct_clients(self, programme_id: str, start: datetime, end: datetime) -> int:
        sessions = self._data.sessions.values()
        return len(
            {s.client_id for s in sessions if s.programme_id == programme_id and start <= s.booked_at < end}
        )

    def records(
        self, programme_id: str, start: datetime, end: datetime, *, forgiven_only: bool = False
    ) -> list[Record]:
        found = [record_of(s) for s in self._data.sessions.values() if s.programme_id == programme_id]
        return [r for r in found if r.forgiven or r.no_show_forgiven] if forgiven_only else found


class MemoryUnitOfWork(UnitOfWork):
    def __init__(self, store: MemoryStore):
        super().__init__()
        self._store = store
        self.data = Data()

    def __enter__(self) -> Self:
        # One at a time, as SQLite's writers are: a unit of work sees the data as the last
        # commit left it, and nothing else changes it meanwhile.
        self._store.lock.acquire()
        self.data = data = self._store.data.copy()
        self.sessions = MemorySessions(data)
        self.ledger = MemoryLedger(data)
        self.programmes = MemoryProgrammes(data)
        self.invoices = MemoryInvoices(data)
        self.events = MemoryOutbox(data)
        self.requests = MemoryRequests(data)
        self.reports = MemoryReports(data)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None and self.committed:
                self._store.data = self.data
                self._store.commits += 1
        finally:
            self._store.lock.release()


class MemoryStore:
    """The data, and a factory of units of work on it (a UnitOfWorkFactory)."""

    def __init__(self) -> None:
        self.data = Data()
        self.lock = threading.RLock()
        self.commits = 0

    def __call__(self, *, write: bool = True) -> MemoryUnitOfWork:
        return MemoryUnitOfWork(self)
