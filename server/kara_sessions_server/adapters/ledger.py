"""Credit accounts and their ledger. A client has one account per programme. Every movement of
a credit is one ledger entry written in the same transaction as the balance change; balances
change only by guarded UPDATEs, so available + held + used always equals the credits granted."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import NamedTuple

from kara_sessions_server.adapters.pagination import cut, decode
from kara_sessions_server.adapters.storage import CreditAccountRow, LedgerEntryRow, sql, to_micros
from kara_sessions_server.domain.errors import InsufficientCredits, NotFound
from kara_sessions_server.domain.model import CreditAccount, LedgerEntry, LedgerKind, Page

A = CreditAccountRow


class Account(NamedTuple):
    client_id: str
    programme_id: str


class LedgerInvariantBroken(RuntimeError):
    """A credit to settle or refund was not there: the database disagrees with the session."""


def grant(account: Account, credits: int, request_id: str, now: datetime) -> None:
    (
        A.insert(
            client_id=account.client_id,
            programme_id=account.programme_id,
            available=credits,
            held=0,
            used=0,
            updated_at=now,
        )
        .on_conflict(
            conflict_target=[A.client_id, A.programme_id],
            update={A.available: A.available + credits, A.updated_at: now},
        )
        .execute()
    )
    _entry(account, LedgerKind.GRANT, credits, None, request_id, now)


_WHERE = "WHERE client_id = ? AND programme_id = ?"
_HOLD = (
    "UPDATE credit_accounts SET available = available - ?, held = held + ?, updated_at = ? "
    f"{_WHERE} AND available >= ?"
)
_RETURN = (
    "UPDATE credit_accounts SET held = held - ?, available = available + ?, updated_at = ? "
    f"{_WHERE} AND held >= ?"
)
_TAKE = f"UPDATE credit_accounts SET held = held - ?, used = used + ?, updated_at = ? {_WHERE} AND held >= ?"
_REFUND = (
    "UPDATE credit_accounts SET used = used - ?, available = available + ?, updated_at = ? "
    f"{_WHERE} AND used >= ?"
)
_MOVE = {
    LedgerKind.HOLD: _HOLD,
    LedgerKind.RETURN: _RETURN,
    LedgerKind.TAKE: _TAKE,
    LedgerKind.REFUND: _REFUND,
}
_INSERT_ENTRY = (
    "INSERT INTO ledger_entries (client_id, programme_id, kind, credits, session_id, request_id, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def insufficient(account: Account, purpose: str = "to book a session") -> InsufficientCredits:
    return InsufficientCredits(
        f"client {account.client_id} has no sponsored credit of programme {account.programme_id!r} "
        f"available {purpose}",
        metadata={"client_id": account.client_id, "programme_id": account.programme_id},
    )


def hold(
    account: Account,
    session_id: str,
    credits: int,
    request_id: str,
    now: datetime,
    purpose: str = "to book a session",
) -> None:
    if not _move(account, LedgerKind.HOLD, credits, now):
        raise insufficient(account, purpose)
    _entry(account, LedgerKind.HOLD, credits, session_id, request_id, now)


def settle(
    account: Account, session_id: str, kind: LedgerKind, credits: int, request_id: str, now: datetime
) -> None:
    """Returns the held credit to the client (RETURN), takes it (TAKE), or gives a taken credit
    back (REFUND, when a charge is waived)."""
    if kind not in (LedgerKind.RETURN, LedgerKind.TAKE, LedgerKind.REFUND):
        raise ValueError(f"cannot settle a credit with {kind}")
    if not _move(account, kind, credits, now):
        raise LedgerInvariantBroken(
            f"client {account.client_id} has no credit to {kind.value.lower()} for session {session_id}"
        )
    _entry(account, kind, credits, session_id, request_id, now)


def _move(account: Account, kind: LedgerKind, credits: int, now: datetime) -> bool:
    params = (credits, credits, to_micros(now), account.client_id, account.programme_id, credits)
    return bool(sql(_MOVE[kind], params).rowcount == 1)


def _entry(
    account: Account, kind: LedgerKind, credits: int, session_id: str | None, request_id: str, now: datetime
) -> None:
    sql(
        _INSERT_ENTRY,
        (
            account.client_id,
            account.programme_id,
            kind.value,
            credits,
            session_id,
            request_id,
            to_micros(now),
        ),
    )


def account(key: Account, size: int, token: str) -> CreditAccount:
    """The balance with one page of its ledger."""
    current = balance(key)
    page = entries(key, size, token)
    return replace(current, entries=page.items, next_page_token=page.next_page_token)


def balance(key: Account) -> CreditAccount:
    row = A.get_or_none((A.client_id == key.client_id) & (A.programme_id == key.programme_id))
    if row is None:
        raise NotFound(
            f"client {key.client_id} has no credit account in programme {key.programme_id!r}; "
            "GrantCredits opens one",
            metadata={"client_id": key.client_id, "programme_id": key.programme_id},
        )
    return CreditAccount(
        client_id=row.client_id,
        available=row.available,
        held=row.held,
        used=row.used,
        programme_id=row.programme_id,
    )


def entries(key: Account, size: int, token: str) -> Page[LedgerEntry]:
    """Newest first."""
    query_id = ("ledger", key.client_id, key.programme_id)
    after = decode(query_id, token, (int,))
    entry = LedgerEntryRow
    query = entry.select().where(
        (entry.client_id == key.client_id) & (entry.programme_id == key.programme_id)
    )
    if after is not None:
        query = query.where(entry.entry_id < after[0])
    rows, token_out = cut(
        query_id, list(query.order_by(entry.entry_id.desc()).limit(size + 1)), size, lambda r: [r.entry_id]
    )
    items = tuple(
        LedgerEntry(
            entry_id=str(r.entry_id),
            client_id=r.client_id,
            kind=LedgerKind(r.kind),
            credits=r.credits,
            session_id=r.session_id,
            request_id=r.request_id,
            created_at=r.created_at,
        )
        for r in rows
    )
    return Page(items, token_out)
