"""One request, one unit of work: a single transaction that the service layer opens and
commits explicitly; leaving the block without commit() rolls everything back."""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any

import peewee as pw

from kara_sessions_server.adapters.storage import SQLITE_BUSY_TIMEOUT_MS, Storage
from kara_sessions_server.domain.events import Event


class _NotCommitted(Exception):
    pass


class UnitOfWork:
    def __init__(self, storage: Storage, *, write: bool = True):
        self._storage = storage
        self._write = write
        self._tx: Any = None
        self._committed = False
        self._lock: threading.Lock | None = None
        # Told by the service layer once the transaction has committed.
        self.events: list[Event] = []

    def __enter__(self) -> UnitOfWork:
        lock = self._storage.write_lock if self._write else None
        if lock is not None and not lock.acquire(timeout=SQLITE_BUSY_TIMEOUT_MS / 1000):
            raise pw.OperationalError("database is locked: another write took too long")
        self._lock = lock
        try:
            self._storage.db.connect(reuse_if_open=True)
            self._tx = self._storage.transaction(self._write)
            self._tx.__enter__()
        except BaseException:
            self._release()
            raise
        return self

    def _release(self) -> None:
        self._storage.release()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def commit(self) -> None:
        """Marks the work done; the transaction commits when the block ends."""
        self._committed = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and not self._committed:
            # peewee commits a clean exit; make an uncommitted one roll back instead.
            exc_type = _NotCommitted
        try:
            self._tx.__exit__(exc_type, exc, tb)
        finally:
            if isinstance(exc, pw.OperationalError | pw.InterfaceError):
                # The connection may be dead (server restart, network): discard it rather than
                # hand it back to the pool for the next request to trip over.
                self._storage.db.manual_close()
            self._release()
