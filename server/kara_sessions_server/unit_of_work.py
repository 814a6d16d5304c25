"""One request, one unit of work: a single transaction that the service layer opens and
commits explicitly; leaving the block without commit() rolls everything back."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import peewee as pw

from .events import Event
from .storage import Storage


class _NotCommitted(Exception):
    pass


class UnitOfWork:
    def __init__(self, storage: Storage, *, write: bool = True):
        self._storage = storage
        self._write = write
        self._tx: Any = None
        self._committed = False
        # Told by the service layer once the transaction has committed.
        self.events: list[Event] = []

    def __enter__(self) -> UnitOfWork:
        self._storage.db.connect(reuse_if_open=True)
        self._tx = self._storage.transaction(self._write)
        self._tx.__enter__()
        return self

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
            self._storage.release()
