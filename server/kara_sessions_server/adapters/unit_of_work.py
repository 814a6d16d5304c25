"""The unit of work on SQLite or PostgreSQL: one peewee transaction on its Storage's database,
the repositories that run in it, and the bounds every transaction keeps.

Every transaction is bounded: by its call's deadline (the caller stops waiting then) and by the
storage's ceiling. A transaction whose caller has gone by the time it would commit is rolled
back instead, so a caller told "failed" never finds the change made after all."""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

from kara_sessions_server.adapters import faults, tracing
from kara_sessions_server.adapters.idempotency import RequestLog
from kara_sessions_server.adapters.invoice_repository import InvoiceRepository
from kara_sessions_server.adapters.ledger import Ledger
from kara_sessions_server.adapters.outbox import Outbox
from kara_sessions_server.adapters.programme_repository import ProgrammeRepository, TermsVersions
from kara_sessions_server.adapters.report_repository import ReportRepository
from kara_sessions_server.adapters.session_repository import SessionRepository
from kara_sessions_server.adapters.storage import Storage
from kara_sessions_server.service_layer.call_context import CURRENT, Call, CallGone, DeadlineExceeded
from kara_sessions_server.service_layer.unit_of_work import UnitOfWork


class _NotCommitted(Exception):
    pass


class SqlUnitOfWorkFactory:
    """Makes the units of work of one Storage (the composition root's `unit_of_work`). Its
    repositories hold no state of their own, only the database, so every unit of work shares
    them; what makes them one transaction is the thread's connection, which begin() opens."""

    def __init__(self, storage: Storage):
        self.storage = storage
        sql = storage.sql
        # Each version of terms, read once for every unit of work of this database.
        terms = TermsVersions(sql)
        self._repositories = (
            SessionRepository(sql, terms),
            Ledger(sql),
            ProgrammeRepository(sql, terms),
            InvoiceRepository(sql, terms),
            Outbox(sql),
            RequestLog(sql),
            ReportRepository(sql),
        )

    def __call__(self, *, write: bool = True) -> SqlUnitOfWork:
        return SqlUnitOfWork(self.storage, self._repositories, write=write)


class SqlUnitOfWork(UnitOfWork):
    def __init__(
        self,
        storage: Storage,
        repositories: tuple[
            SessionRepository,
            Ledger,
            ProgrammeRepository,
            InvoiceRepository,
            Outbox,
            RequestLog,
            ReportRepository,
        ],
        *,
        write: bool = True,
    ):
        super().__init__()
        (
            self.sessions,
            self.ledger,
            self.programmes,
            self.invoices,
            self.events,
            self.requests,
            self.reports,
        ) = repositories
        self._storage = storage
        self._write = write
        self._tx: Any = None
        self._lock: threading.Lock | None = None
        self._watch: int | None = None
        self._call: Call | None = None
        self._span: Any = None

    def __enter__(self) -> SqlUnitOfWork:
        self._call = CURRENT.get()
        timeout = self._storage.max_transaction_seconds
        remaining = self._call.remaining() if self._call is not None else None
        if remaining is not None:
            if remaining <= 0:
                raise DeadlineExceeded("the deadline passed before the call's transaction began")
            timeout = min(timeout, remaining)
        storage = self._storage
        # From here: waiting for SQLite's writer lock is part of the transaction's time.
        self._span = tracing.transaction_started(storage.system, storage.db.database, self._write)
        lock = self._storage.write_lock if self._write else None
        if lock is not None and not lock.acquire(timeout=timeout):
            waited_too_long = faults.lock_timeout()
            tracing.ended(self._span, waited_too_long)
            self._span = None
            self._raise_timeout(waited_too_long)
        self._lock = lock
        try:
            call = self._call
            self._tx = self._storage.begin(self._write, timeout, call.is_active if call else lambda: True)
            # Where the database does not stop its statements at the deadline itself (SQLite),
            # the watchdog interrupts them then.
            deadline = None if self._storage.bounds_statements else time.monotonic() + timeout
            self._watch = self._storage.watchdog.watch(deadline, self._storage.interrupter())
        except BaseException as exc:
            self._release(exc)
            if faults.is_database_error(exc):
                self._raise_timeout(exc)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        gone = exc_type is None and self.committed and self._call is not None and not self._call.is_active()
        if gone:
            exc_type = CallGone
        elif exc_type is None and not self.committed:
            # peewee commits a clean exit; make an uncommitted one roll back instead.
            exc_type = _NotCommitted
        error: BaseException | None = exc
        try:
            self._tx.__exit__(exc_type, exc, tb)
        except BaseException as failed:  # the commit itself failed
            error = failed
            raise
        finally:
            if faults.is_connection_error(exc):
                # The connection may be dead (server restart, network): discard it rather than
                # hand it back to the pool for the next request to trip over.
                self._storage.db.manual_close()
            self._release(error, committed=error is None and exc_type is None)
        if gone:
            raise CallGone("the caller stopped waiting before the transaction committed; rolled back")
        if exc is not None and faults.is_database_error(exc):
            self._raise_timeout(exc)

    def _raise_timeout(self, exc: BaseException) -> None:
        """A database error after the call's deadline is the deadline's doing; else it stands."""
        remaining = self._call.remaining() if self._call is not None else None
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the call's deadline passed during its transaction; rolled back") from exc
        raise exc

    def _release(self, error: BaseException | None = None, committed: bool = False) -> None:
        tracing.ended(self._span, error, committed)
        self._span = None
        if self._watch is not None:
            self._storage.watchdog.release(self._watch)
            self._watch = None
        # A refusal's or a hang-up's rollback leaves the connection as good as a commit does.
        healthy = error is None or (isinstance(error, Exception) and not faults.is_database_error(error))
        self._storage.release(healthy)
        if self._lock is not None:
            self._lock.release()
            self._lock = None
