"""One request, one unit of work: a single transaction that the service layer opens and
commits explicitly; leaving the block without commit() rolls everything back. Its repositories
are its attributes, so whatever a use case reads and writes is in that one transaction.

This is what the use cases see. adapters/unit_of_work.py is the one on SQLite and PostgreSQL
(its transactions bounded by the call's deadline); tests/support/memory.py has one in memory."""

from __future__ import annotations

import abc
from types import TracebackType
from typing import Protocol, Self

from kara_sessions_server.domain.tallies import Tally
from kara_sessions_server.service_layer.repositories import (
    InvoiceRepository,
    Ledger,
    Outbox,
    ProgrammeRepository,
    Reports,
    RequestLog,
    SessionRepository,
)


class UnitOfWork(abc.ABC):
    sessions: SessionRepository
    ledger: Ledger
    programmes: ProgrammeRepository
    invoices: InvoiceRepository
    # The event feed; each event's row is also its change's request_id record (requests).
    events: Outbox
    requests: RequestLog
    reports: Reports

    def __init__(self) -> None:
        self.committed = False
        # Told by the service layer once the transaction has committed (metrics).
        self.tallies: list[Tally] = []

    @abc.abstractmethod
    def __enter__(self) -> Self:
        """Begins the transaction."""

    @abc.abstractmethod
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Commits if commit() was called and nothing was raised; else rolls back."""

    def commit(self) -> None:
        """Marks the work done; the transaction commits when the block ends."""
        self.committed = True

    def rollback(self) -> None:
        """Takes commit() back: the block rolls back when it ends."""
        self.committed = False


class UnitOfWorkFactory(Protocol):
    """A new unit of work per request; `write=False` for one that only reads."""

    def __call__(self, *, write: bool = True) -> UnitOfWork: ...
