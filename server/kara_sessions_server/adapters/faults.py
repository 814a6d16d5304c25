"""What a database failure means for the caller: worth a retry (the database is down, busy or a
transaction lost a conflict), or not until an operator acts (the database is read-only, full,
or its schema is not this server's). The driver's own codes decide: PostgreSQL's SQLSTATE,
SQLite's result message."""

from __future__ import annotations

from dataclasses import dataclass

import peewee as pw


@dataclass(frozen=True, slots=True)
class Fault:
    # True: retrying (with the same request_id) may succeed. False: it will not.
    transient: bool
    # A stable ErrorInfo reason.
    reason: str
    # What happened, for a person.
    what: str
    # The driver's error class, for metrics.
    kind: str


UNAVAILABLE = "DATABASE_UNAVAILABLE"
CONFLICT = "DATABASE_CONFLICT"
FULL = "DATABASE_FULL"

# SQLSTATE -> (transient, reason, what); a class ("08") covers every code in it.
_POSTGRES: dict[str, tuple[bool, str, str]] = {
    "08": (True, UNAVAILABLE, "the connection to the database failed"),
    "40001": (True, CONFLICT, "a concurrent transaction conflicted (serialization failure)"),
    "40P01": (True, CONFLICT, "a concurrent transaction conflicted (deadlock)"),
    "55P03": (True, UNAVAILABLE, "a lock was not granted in time"),
    "57014": (True, UNAVAILABLE, "the statement was cancelled (timeout)"),
    "57P01": (True, UNAVAILABLE, "the database is shutting down"),
    "57P02": (True, UNAVAILABLE, "the database is restarting"),
    "57P03": (True, UNAVAILABLE, "the database is not accepting connections yet"),
    "53300": (True, UNAVAILABLE, "the database has too many connections"),
    "25006": (
        False,
        "DATABASE_READ_ONLY",
        "the database is read-only (a standby, or default_transaction_read_only)",
    ),
    "53100": (False, FULL, "the database's disk is full"),
    "42P01": (False, "SCHEMA_MISMATCH", "a table is missing: the schema is not this server's"),
    "42703": (False, "SCHEMA_MISMATCH", "a column is missing: the schema is not this server's"),
}

# Substrings of SQLite's messages, first match wins.
_SQLITE: tuple[tuple[str, bool, str, str], ...] = (
    ("database is locked", True, UNAVAILABLE, "the database is locked by another process"),
    ("busy", True, UNAVAILABLE, "the database is busy"),
    ("interrupted", True, UNAVAILABLE, "the statement was interrupted (timeout or shutdown)"),
    ("readonly", False, "DATABASE_READ_ONLY", "the database file is read-only (its permissions or its disk)"),
    (
        "read-only",
        False,
        "DATABASE_READ_ONLY",
        "the database file is read-only (its permissions or its disk)",
    ),
    ("disk is full", False, FULL, "the database's disk is full"),
    ("no such table", False, "SCHEMA_MISMATCH", "a table is missing: the schema is not this server's"),
    ("no such column", False, "SCHEMA_MISMATCH", "a column is missing: the schema is not this server's"),
    ("unable to open", False, "DATABASE_UNREADABLE", "the database file cannot be opened"),
    ("disk i/o error", False, "DATABASE_IO_ERROR", "the disk failed reading or writing the database"),
    ("malformed", False, "DATABASE_CORRUPT", "the database file is corrupt"),
)


def is_database_error(exc: BaseException | None) -> bool:
    return isinstance(exc, pw.DatabaseError | pw.InterfaceError)


def is_connection_error(exc: BaseException | None) -> bool:
    """The connection itself may be broken: it must not go back to the pool."""
    return isinstance(exc, pw.OperationalError | pw.InterfaceError)


def lock_timeout() -> Exception:
    """The error for a write that waited too long for this process's own writer queue."""
    return pw.OperationalError("database is locked: another write took too long")


def classify(exc: BaseException) -> Fault | None:
    """The fault behind a database exception; None if `exc` is not one. A failure while
    handling another (a ROLLBACK after a COMMIT failed: "cannot rollback - no transaction is
    active") is classified by the first one, which says what went wrong."""
    if not isinstance(exc, pw.DatabaseError | pw.InterfaceError):
        return None
    kind = type(exc).__name__
    for error in _chain(exc):
        known = _known(error)
        if known is not None:
            return Fault(*known, kind=kind)
    sqlstate = getattr(_driver_error(exc), "sqlstate", None)
    if isinstance(exc, pw.InterfaceError) or (isinstance(exc, pw.OperationalError) and not sqlstate):
        # No code at all: the connection itself failed (refused, reset, timed out).
        return Fault(True, UNAVAILABLE, "the database could not be reached", kind)
    return Fault(False, "DATABASE_ERROR", f"the database refused the request ({kind})", kind)


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the database errors it was raised while handling, the first one first."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, pw.DatabaseError | pw.InterfaceError):
            chain.append(current)
        current = current.__context__
    return chain[::-1]


def _known(exc: BaseException) -> tuple[bool, str, str] | None:
    original = _driver_error(exc)
    sqlstate = getattr(original, "sqlstate", None)
    if sqlstate:
        for key in (sqlstate, sqlstate[:2]):
            if key in _POSTGRES:
                return _POSTGRES[key]
    message = str(original).lower()
    for needle, transient, reason, what in _SQLITE:
        if needle in message:
            return transient, reason, what
    return None


def _driver_error(exc: BaseException) -> BaseException:
    """The driver's own exception that peewee wrapped: its first argument (sqlite3) or the
    exception being handled when peewee raised its own (psycopg)."""
    for candidate in (exc.args[0] if exc.args else None, exc.__cause__, exc.__context__):
        if isinstance(candidate, BaseException):
            return candidate
    return exc
