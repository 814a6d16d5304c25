"""Credit accounts and their ledger. A client has one account per programme. Every movement of
a credit is one ledger entry written in the same transaction as the balance change; balances
change only by guarded UPDATEs, so available + held + used always equals the credits granted."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from kara_sessions_server.adapters.storage import Sql, from_micros, to_micros
from kara_sessions_server.domain.errors import NotFound
from kara_sessions_server.domain.model import (
    Account,
    CreditAccount,
    LedgerEntry,
    LedgerKind,
    Page,
    insufficient_credits,
)
from kara_sessions_server.service_layer.pagination import cut, decode


class LedgerInvariantBroken(RuntimeError):
    """A credit to settle or refund was not there: the database disagrees with the session."""


# A first grant opens the account; a later one adds to it.
_GRANT = (
    "INSERT INTO credit_accounts (client_id, programme_id, available, held, used, updated_at) "
    "VALUES (?, ?, ?, 0, 0, ?) ON CONFLICT (client_id, programme_id) DO UPDATE SET "
    "available = credit_accounts.available + excluded.available, updated_at = excluded.updated_at"
)
_BALANCE = "SELECT available, held, used FROM credit_accounts WHERE client_id = ? AND programme_id = ?"
# Newest first, through the (client_id, programme_id, entry_id) index.
_ENTRIES = (
    "SELECT entry_id, kind, credits, session_id, request_id, created_at FROM ledger_entries "
    "WHERE client_id = ? AND programme_id = ? {after} ORDER BY entry_id DESC LIMIT ?"
)
_ENTRIES_FIRST = _ENTRIES.format(after="")
_ENTRIES_AFTER = _ENTRIES.format(after="AND entry_id < ?")


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


class Ledger:
    """Credit accounts and their entries, on one database."""

    def __init__(self, sql: Sql):
        self._sql = sql

    def grant(self, account: Account, credits: int, request_id: str, now: datetime) -> None:
        self._sql(_GRANT, (account.client_id, account.programme_id, credits, to_micros(now)))
        self._entry(account, LedgerKind.GRANT, credits, None, request_id, now)

    def hold(
        self,
        account: Account,
        session_id: str,
        credits: int,
        request_id: str,
        now: datetime,
        purpose: str = "to book a session",
    ) -> None:
        if not self._move(account, LedgerKind.HOLD, credits, now):
            raise insufficient_credits(account, purpose)
        self._entry(account, LedgerKind.HOLD, credits, session_id, request_id, now)

    def settle(
        self,
        account: Account,
        session_id: str,
        kind: LedgerKind,
        credits: int,
        request_id: str,
        now: datetime,
    ) -> None:
        """Returns the held credit to the client (RETURN), takes it (TAKE), or gives a taken credit
        back (REFUND, when a charge is waived)."""
        if kind not in (LedgerKind.RETURN, LedgerKind.TAKE, LedgerKind.REFUND):
            raise ValueError(f"cannot settle a credit with {kind}")
        if not self._move(account, kind, credits, now):
            raise LedgerInvariantBroken(
                f"client {account.client_id} has no credit to {kind.value.lower()} for session {session_id}"
            )
        self._entry(account, kind, credits, session_id, request_id, now)

    def _move(self, account: Account, kind: LedgerKind, credits: int, now: datetime) -> bool:
        params = (credits, credits, to_micros(now), account.client_id, account.programme_id, credits)
        return bool(self._sql(_MOVE[kind], params).rowcount == 1)

    def _entry(
        self,
        account: Account,
        kind: LedgerKind,
        credits: int,
        session_id: str | None,
        request_id: str,
        now: datetime,
    ) -> None:
        self._sql(
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

    def account(self, key: Account, size: int, token: str) -> CreditAccount:
        """The balance with one page of its ledger."""
        current = self.balance(key)
        page = self.entries(key, size, token)
        return replace(
            current, entries=page.items, next_page_token=page.next_page_token, entries_after=page.token_after
        )

    def balance(self, key: Account) -> CreditAccount:
        row = self._sql(_BALANCE, (key.client_id, key.programme_id)).fetchone()
        if row is None:
            raise NotFound(
                f"client {key.client_id} has no credit account in programme {key.programme_id!r}; "
                "GrantCredits opens one",
                metadata={"client_id": key.client_id, "programme_id": key.programme_id},
            )
        available, held, used = row
        return CreditAccount(key.client_id, available, held, used, programme_id=key.programme_id)

    def entries(self, key: Account, size: int, token: str) -> Page[LedgerEntry]:
        """Newest first."""
        query_id = ("ledger", key.client_id, key.programme_id)
        after = decode(query_id, token, (int,))
        if after is None:
            cursor = self._sql(_ENTRIES_FIRST, (key.client_id, key.programme_id, size + 1))
        else:
            cursor = self._sql(_ENTRIES_AFTER, (key.client_id, key.programme_id, after[0], size + 1))
        rows, token_out, resume = cut(query_id, cursor.fetchall(), size, lambda r: [r[0]])
        items = tuple(
            LedgerEntry(
                entry_id=str(entry_id),
                client_id=key.client_id,
                kind=LedgerKind(kind),
                credits=credits,
                session_id=session_id,
                request_id=request_id,
                created_at=from_micros(created_at),
            )
            for entry_id, kind, credits, session_id, request_id, created_at in rows
        )
        return Page(items, token_out, resume)
