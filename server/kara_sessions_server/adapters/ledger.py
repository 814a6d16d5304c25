"""Credit accounts and their ledger. Every movement of a credit is one ledger entry written in
the same transaction as the balance change; balances change only by guarded UPDATEs, so
available + held + used always equals the credits granted."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from kara_sessions_server.adapters.pagination import cut, decode
from kara_sessions_server.adapters.storage import CreditAccountRow, LedgerEntryRow, sql, to_micros
from kara_sessions_server.domain.errors import InsufficientCredits, NotFound
from kara_sessions_server.domain.model import CreditAccount, LedgerEntry, LedgerKind, Page

A = CreditAccountRow


class LedgerInvariantBroken(RuntimeError):
    """A settled credit was not held: the database disagrees with the session's state."""


def grant(client_id: str, credits: int, request_id: str, now: datetime) -> None:
    (
        A.insert(client_id=client_id, available=credits, held=0, used=0, updated_at=now)
        .on_conflict(
            conflict_target=[A.client_id],
            update={A.available: A.available + credits, A.updated_at: now},
        )
        .execute()
    )
    _entry(client_id, LedgerKind.GRANT, credits, None, request_id, now)


_HOLD = (
    "UPDATE credit_accounts SET available = available - ?, held = held + ?, updated_at = ? "
    "WHERE client_id = ? AND available >= ?"
)
_RETURN = (
    "UPDATE credit_accounts SET held = held - ?, available = available + ?, updated_at = ? "
    "WHERE client_id = ? AND held >= ?"
)
_TAKE = (
    "UPDATE credit_accounts SET held = held - ?, used = used + ?, updated_at = ? "
    "WHERE client_id = ? AND held >= ?"
)
_SETTLE = {LedgerKind.RETURN: _RETURN, LedgerKind.TAKE: _TAKE}
_INSERT_ENTRY = (
    "INSERT INTO ledger_entries (client_id, kind, credits, session_id, request_id, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)


def hold(client_id: str, session_id: str, credits: int, request_id: str, now: datetime) -> None:
    moved = sql(_HOLD, (credits, credits, to_micros(now), client_id, credits)).rowcount
    if moved != 1:
        raise InsufficientCredits(
            f"client {client_id} has no sponsored credit available to book a session",
            metadata={"client_id": client_id},
        )
    _entry(client_id, LedgerKind.HOLD, credits, session_id, request_id, now)


def settle(
    client_id: str, session_id: str, kind: LedgerKind, credits: int, request_id: str, now: datetime
) -> None:
    """Returns the held credit to the client (RETURN) or takes it (TAKE)."""
    statement = _SETTLE.get(kind)
    if statement is None:
        raise ValueError(f"cannot settle a credit with {kind}")
    moved = sql(statement, (credits, credits, to_micros(now), client_id, credits)).rowcount
    if moved != 1:
        raise LedgerInvariantBroken(f"client {client_id} holds no credit for session {session_id}")
    _entry(client_id, kind, credits, session_id, request_id, now)


def _entry(
    client_id: str, kind: LedgerKind, credits: int, session_id: str | None, request_id: str, now: datetime
) -> None:
    sql(_INSERT_ENTRY, (client_id, kind.value, credits, session_id, request_id, to_micros(now)))


def account(client_id: str, size: int, token: str) -> CreditAccount:
    """The balance with one page of its ledger."""
    current = balance(client_id)
    page = entries(client_id, size, token)
    return replace(current, entries=page.items, next_page_token=page.next_page_token)


def balance(client_id: str) -> CreditAccount:
    row = A.get_or_none(A.client_id == client_id)
    if row is None:
        raise NotFound(
            f"client {client_id} has no credit account; GrantCredits opens one",
            metadata={"client_id": client_id},
        )
    return CreditAccount(client_id=row.client_id, available=row.available, held=row.held, used=row.used)


def entries(client_id: str, size: int, token: str) -> Page[LedgerEntry]:
    """Newest first."""
    query_id = ("ledger", client_id)
    after = decode(query_id, token)
    entry = LedgerEntryRow
    query = entry.select().where(entry.client_id == client_id)
    if after is not None:
        query = query.where(entry.entry_id < int(after[0]))
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
