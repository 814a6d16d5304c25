"""Credit accounts, their lots and their ledger. A client has one account per programme, and in it
a lot per expire time (issue 36; credits from before it are one lot that never expires). Every
movement of a credit is one ledger entry written in the same transaction as the balance change
of its account and of its lot; balances change only by guarded UPDATEs, so available + held +
used + expired always equals the credits granted, for the account and for each lot."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from kara_sessions_server.adapters.storage import (
    Sql,
    from_micros,
    micros_or_none,
    time_or_none,
    to_micros,
)
from kara_sessions_server.domain.errors import Conflict, CreditsExpireBeforeSession, NotFound
from kara_sessions_server.domain.model import (
    Account,
    CreditAccount,
    CreditLot,
    LedgerEntry,
    LedgerKind,
    Page,
    insufficient_credits,
)
from kara_sessions_server.service_layer.pagination import cut, decode


class LedgerInvariantBroken(RuntimeError):
    """A credit to settle or refund was not there: the database disagrees with the session."""


# A first grant opens the account; a later one adds to it. Credits that expire are also counted
# in `expiring_available` and in the lot of their expire time (credit_lots); those that never
# expire are the account's own, the rest of its balance (no row of theirs to write).
_GRANT = (
    "INSERT INTO credit_accounts (client_id, programme_id, available, held, used, expired, "
    "expiring_available, updated_at) VALUES (?, ?, ?, 0, 0, 0, ?, ?) "
    "ON CONFLICT (client_id, programme_id) DO UPDATE SET "
    "available = credit_accounts.available + excluded.available, "
    "expiring_available = credit_accounts.expiring_available + excluded.expiring_available, "
    "updated_at = excluded.updated_at"
)
_GRANT_LOT = (
    "INSERT INTO credit_lots (client_id, programme_id, expires_at, granted, available, held, used, expired, "
    "updated_at) VALUES (?, ?, ?, ?, ?, 0, 0, 0, ?) ON CONFLICT (client_id, programme_id, expires_at) DO "
    "UPDATE SET granted = credit_lots.granted + excluded.granted, "
    "available = credit_lots.available + excluded.available, updated_at = excluded.updated_at"
)
_BALANCE = (
    "SELECT available, held, used, expired FROM credit_accounts WHERE client_id = ? AND programme_id = ?"
)
_LOTS = (
    "SELECT expires_at, granted, available, held, used, expired FROM credit_lots "
    "WHERE client_id = ? AND programme_id = ? ORDER BY expires_at"
)
# The lot a booking holds from: the soonest to expire of those still valid at the session's start.
_PICK_LOT = (
    "SELECT expires_at FROM credit_lots WHERE client_id = ? AND programme_id = ? AND available >= ? "
    "AND expires_at > ? ORDER BY expires_at LIMIT 1"
)
# Lots with the credits that expire between now and a session's start (the latest of them): why a
# booking found no lot valid at its start, when it is that and not that there is no credit.
_EXPIRING_FIRST = (
    "SELECT expires_at FROM credit_lots WHERE client_id = ? AND programme_id = ? AND available >= ? "
    "AND expires_at > ? AND expires_at <= ? ORDER BY expires_at DESC LIMIT 1"
)
# Lots whose time has come with credits still available, soonest first (the expiry sweep).
_DUE_LOTS = (
    "SELECT client_id, programme_id, expires_at FROM credit_lots WHERE expires_at <= ? AND available > 0 "
    "ORDER BY expires_at LIMIT ?"
)
_BALANCE_EXPIRING = (
    "SELECT available, expiring_available FROM credit_accounts WHERE client_id = ? AND programme_id = ?"
)
_HOLD_ACCOUNT = "SELECT 1 FROM credit_accounts WHERE client_id = ? AND programme_id = ? FOR UPDATE"
_HOLD_LOT = "SELECT 1 FROM credit_lots WHERE client_id = ? AND programme_id = ? AND expires_at = ? FOR UPDATE"
_LOT_AVAILABLE = (
    "SELECT available FROM credit_lots WHERE client_id = ? AND programme_id = ? AND expires_at = ?"
)
# Newest first, through the (client_id, programme_id, entry_id) index.
_ENTRIES = (
    "SELECT entry_id, kind, credits, session_id, request_id, created_at, expires_at FROM ledger_entries "
    "WHERE client_id = ? AND programme_id = ? {after} ORDER BY entry_id DESC LIMIT ?"
)
_ENTRIES_FIRST = _ENTRIES.format(after="")
_ENTRIES_AFTER = _ENTRIES.format(after="AND entry_id < ?")

# What each move does to a balance: (column taken from, column given to); each UPDATE is guarded
# on what it takes from.
_COLUMNS: dict[LedgerKind, tuple[str, str]] = {
    LedgerKind.HOLD: ("available", "held"),
    LedgerKind.RETURN: ("held", "available"),
    LedgerKind.TAKE: ("held", "used"),
    LedgerKind.REFUND: ("used", "available"),
    LedgerKind.EXPIRE: ("available", "expired"),
}
# How a move of credits that expire changes the account's count of them available.
_EXPIRING_AVAILABLE: dict[LedgerKind, str | None] = {
    LedgerKind.HOLD: "- ?",
    LedgerKind.RETURN: "+ ?",
    LedgerKind.TAKE: None,
    LedgerKind.REFUND: "+ ?",
    LedgerKind.EXPIRE: "- ?",
}
_ACCOUNT_KEY = "client_id = ? AND programme_id = ?"


def _update(table: str, key: str, kind: LedgerKind, expiring: bool = False) -> str:
    taken, given = _COLUMNS[kind]
    change = _EXPIRING_AVAILABLE[kind] if expiring else None
    also = "" if change is None else f"expiring_available = expiring_available {change}, "
    return (
        f"UPDATE {table} SET {taken} = {taken} - ?, {given} = {given} + ?, {also}updated_at = ? "
        f"WHERE {key} AND {taken} >= ?"
    )


# Credits that never expire: the account's balance alone, as before lots (one statement a move).
_MOVE: dict[LedgerKind, str] = {
    kind: _update("credit_accounts", _ACCOUNT_KEY, kind) for kind in _COLUMNS if kind is not LedgerKind.EXPIRE
}
# Credits of a lot: the lot's balance, and the account's with its count of expiring credits.
_MOVE_LOT = {kind: _update("credit_lots", f"{_ACCOUNT_KEY} AND expires_at = ?", kind) for kind in _COLUMNS}
_MOVE_EXPIRING = {kind: _update("credit_accounts", _ACCOUNT_KEY, kind, expiring=True) for kind in _COLUMNS}
# A booking's first try, and nearly every one's only statement: an account with no credit that
# expires holds from those that never do.
_HOLD_WITHOUT_LOTS = (
    "UPDATE credit_accounts SET available = available - ?, held = held + ?, updated_at = ? "
    f"WHERE {_ACCOUNT_KEY} AND available >= ? AND expiring_available = 0"
)
# Else, when no lot is valid at the start: the credits that never expire, if enough are left.
_HOLD_NEVER_EXPIRING = (
    "UPDATE credit_accounts SET available = available - ?, held = held + ?, updated_at = ? "
    f"WHERE {_ACCOUNT_KEY} AND available - expiring_available >= ?"
)
_INSERT_ENTRY = (
    "INSERT INTO ledger_entries (client_id, programme_id, kind, credits, session_id, request_id, created_at, "
    "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_BALANCES = ("available", "held", "used", "expired")
# A booking that lost its lot's last credit to another picks again; this many times in a row
# means the account is being drained as fast as it is read: the caller retries.
_HOLD_ATTEMPTS = 20


class Ledger:
    """Credit accounts, their lots and their entries, on one database."""

    def __init__(self, sql: Sql):
        self._sql = sql

    def grant(
        self,
        account: Account,
        credits: int,
        request_id: str,
        now: datetime,
        expires_at: datetime | None = None,
    ) -> None:
        at = to_micros(now)
        expiring = 0 if expires_at is None else credits
        # The lot before the account, the order every move locks them in.
        if expires_at is not None:
            lot = (account.client_id, account.programme_id, to_micros(expires_at), credits, credits, at)
            self._sql(_GRANT_LOT, lot)
        self._sql(_GRANT, (account.client_id, account.programme_id, credits, expiring, at))
        self._entry(account, LedgerKind.GRANT, credits, None, request_id, now, expires_at)

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
        """Holds `credits` from the lot that expires soonest among those valid at `valid_at` (a
        session's start), those that never expire last; returns that lot's expire time (None:
        never). An account without credits that expire takes one statement, as before lots."""
        if self._hold_never_expiring(_HOLD_WITHOUT_LOTS, account, credits, now):
            expires_at = None
        else:
            expires_at = self._hold_from_lot(account, credits, now, valid_at)
            if expires_at is None and not self._hold_never_expiring(
                _HOLD_NEVER_EXPIRING, account, credits, now
            ):
                raise self._no_lot(account, credits, now, valid_at, purpose)
        self._entry(account, LedgerKind.HOLD, credits, session_id, request_id, now, expires_at)
        return expires_at

    def _hold_never_expiring(self, statement: str, account: Account, credits: int, now: datetime) -> bool:
        params = (credits, credits, to_micros(now), account.client_id, account.programme_id, credits)
        return bool(self._sql(statement, params).rowcount == 1)

    def _hold_from_lot(
        self, account: Account, credits: int, now: datetime, valid_at: datetime
    ) -> datetime | None:
        """Holds from the soonest-expiring lot valid at `valid_at`; None if there is none."""
        for _ in range(_HOLD_ATTEMPTS):
            row = self._sql(
                _PICK_LOT, (account.client_id, account.programme_id, credits, to_micros(valid_at))
            ).fetchone()
            if row is None:
                return None
            # Of two bookings racing for a lot's last credit, one finds it gone: it picks again.
            if self._move_lot(account, row[0], LedgerKind.HOLD, credits, now):
                expires_at = from_micros(row[0])
                if not self._move_account(account, expires_at, LedgerKind.HOLD, credits, now):
                    raise LedgerInvariantBroken(
                        f"client {account.client_id}'s account disagrees with its lots"
                    )
                return expires_at
        raise Conflict(
            f"client {account.client_id}'s credits were being taken by other requests at the same "
            "time; retry",
            metadata={"client_id": account.client_id, "programme_id": account.programme_id},
        )

    def hold_lot(self, account: Account, expires_at: datetime) -> None:
        """Holds the lot of `expires_at` from change by others until this unit of work ends."""
        if not self._sql.on_sqlite:  # SQLite's one writer holds everything already
            self._sql(_HOLD_LOT, (account.client_id, account.programme_id, to_micros(expires_at)))

    def hold_account(self, account: Account) -> None:
        """Holds the account from change by others until this unit of work ends."""
        if not self._sql.on_sqlite:
            self._sql(_HOLD_ACCOUNT, (account.client_id, account.programme_id))

    def check_hold(
        self, account: Account, credits: int, now: datetime, valid_at: datetime, purpose: str
    ) -> None:
        """Refuses as `hold` would, holding nothing."""
        row = self._sql(_BALANCE_EXPIRING, (account.client_id, account.programme_id)).fetchone()
        if row is not None and row[0] - row[1] >= credits:
            return
        lot = self._sql(
            _PICK_LOT, (account.client_id, account.programme_id, credits, to_micros(valid_at))
        ).fetchone()
        if lot is None:
            raise self._no_lot(account, credits, now, valid_at, purpose)

    def _no_lot(
        self, account: Account, credits: int, now: datetime, valid_at: datetime, purpose: str
    ) -> Exception:
        """Nothing valid at `valid_at` has the credits: some expire first, or there are none. (A
        grant that commits meanwhile to a lot valid then is not one that expires first.)"""
        params = (account.client_id, account.programme_id, credits, to_micros(now), to_micros(valid_at))
        early = self._sql(_EXPIRING_FIRST, params).fetchone()
        if early is None:
            return insufficient_credits(account, purpose)
        expires = from_micros(early[0])
        return CreditsExpireBeforeSession(
            f"client {account.client_id}'s credits of programme {account.programme_id!r} expire at "
            f"{expires.isoformat()}, before {valid_at.isoformat()}: none is valid {purpose}",
            metadata={
                "client_id": account.client_id,
                "programme_id": account.programme_id,
                "credit_expire_time": expires.isoformat(),
            },
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
        """Returns the held credit to the client (RETURN), takes it (TAKE), or gives a taken credit
        back (REFUND, when a charge is waived), in the lot it was held from (`expires_at`)."""
        if kind not in (LedgerKind.RETURN, LedgerKind.TAKE, LedgerKind.REFUND):
            raise ValueError(f"cannot settle a credit with {kind}")
        self._move_both(account, session_id, kind, credits, request_id, now, expires_at)

    def expire(
        self,
        account: Account,
        session_id: str | None,
        credits: int,
        request_id: str,
        now: datetime,
        expires_at: datetime,
    ) -> None:
        """Expires available credits of the lot of `expires_at`: the lot's at its time (no
        session), or one a session just gave back to a lot already past it."""
        self._move_both(account, session_id, LedgerKind.EXPIRE, credits, request_id, now, expires_at)

    def _move_both(
        self,
        account: Account,
        session_id: str | None,
        kind: LedgerKind,
        credits: int,
        request_id: str,
        now: datetime,
        expires_at: datetime | None,
    ) -> None:
        in_lot = expires_at is None or self._move_lot(account, to_micros(expires_at), kind, credits, now)
        if not in_lot or not self._move_account(account, expires_at, kind, credits, now):
            raise LedgerInvariantBroken(
                f"client {account.client_id} has no credit to {kind.value.lower()}"
                f"{f' for session {session_id}' if session_id else ''}"
            )
        self._entry(account, kind, credits, session_id, request_id, now, expires_at)

    def due_lots(self, now: datetime, limit: int) -> list[tuple[Account, datetime]]:
        """Up to `limit` lots whose expire time has come with credits still available."""
        rows = self._sql(_DUE_LOTS, (to_micros(now), limit)).fetchall()
        return [(Account(client_id, programme_id), from_micros(at)) for client_id, programme_id, at in rows]

    def lot_available(self, account: Account, expires_at: datetime | None) -> int:
        if expires_at is None:
            row = self._sql(_BALANCE_EXPIRING, (account.client_id, account.programme_id)).fetchone()
            return 0 if row is None else int(row[0] - row[1])
        key = (account.client_id, account.programme_id, to_micros(expires_at))
        row = self._sql(_LOT_AVAILABLE, key).fetchone()
        return 0 if row is None else int(row[0])

    def _move_account(
        self, account: Account, expires_at: datetime | None, kind: LedgerKind, credits: int, now: datetime
    ) -> bool:
        statement = _MOVE[kind] if expires_at is None else _MOVE_EXPIRING[kind]
        change = _EXPIRING_AVAILABLE[kind] if expires_at is not None else None
        at = to_micros(now)
        params = (
            (credits, credits, at, account.client_id, account.programme_id, credits)
            if change is None
            else (credits, credits, credits, at, account.client_id, account.programme_id, credits)
        )
        return bool(self._sql(statement, params).rowcount == 1)

    def _move_lot(self, account: Account, lot: int, kind: LedgerKind, credits: int, now: datetime) -> bool:
        params = (credits, credits, to_micros(now), account.client_id, account.programme_id, lot, credits)
        return bool(self._sql(_MOVE_LOT[kind], params).rowcount == 1)

    def _entry(
        self,
        account: Account,
        kind: LedgerKind,
        credits: int,
        session_id: str | None,
        request_id: str,
        now: datetime,
        expires_at: datetime | None,
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
                micros_or_none(expires_at),
            ),
        )

    def account(self, key: Account, size: int, token: str) -> CreditAccount:
        """The balance and its lots, with one page of its ledger."""
        current = self.balance(key)
        page = self.entries(key, size, token)
        return replace(
            current, entries=page.items, next_page_token=page.next_page_token, entries_after=page.token_after
        )

    def balance(self, key: Account) -> CreditAccount:
        """The account and its lots: those that expire, soonest first, then (if it was ever
        granted any) the credits that never expire, which are what the lots leave of it."""
        row = self._sql(_BALANCE, (key.client_id, key.programme_id)).fetchone()
        if row is None:
            raise NotFound(
                f"client {key.client_id} has no credit account in programme {key.programme_id!r}; "
                "GrantCredits opens one",
                metadata={"client_id": key.client_id, "programme_id": key.programme_id},
            )
        available, held, used, expired = row
        lots = [
            CreditLot(from_micros(at), granted, *balance)
            for at, granted, *balance in self._sql(_LOTS, (key.client_id, key.programme_id)).fetchall()
        ]
        never = [b - sum(getattr(lot, name) for lot in lots) for b, name in zip(row, _BALANCES, strict=True)]
        if any(never):
            lots.append(CreditLot(None, sum(never), *never))
        return CreditAccount(
            key.client_id,
            available,
            held,
            used,
            programme_id=key.programme_id,
            expired=expired,
            lots=tuple(lots),
        )

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
                expires_at=time_or_none(expires_at),
            )
            for entry_id, kind, credits, session_id, request_id, created_at, expires_at in rows
        )
        return Page(items, token_out, resume)
