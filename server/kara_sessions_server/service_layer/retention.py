"""Forgetting what is no longer needed, in small batches that each commit on their own, so a
pruning run never holds the database from requests for long: stored request_id results past
the retention period (a retry that late starts a new request) and, only if an operator asks,
audit rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from kara_sessions_server.domain.clock import Clock
from kara_sessions_server.service_layer.unit_of_work import UnitOfWork, UnitOfWorkFactory

BATCH = 500


@dataclass
class Retention:
    unit_of_work: UnitOfWorkFactory
    clock: Clock
    # Settings.request_id_retention and audit_retention.
    request_ids: timedelta
    # None: audit rows are kept for good (they are the record).
    audit: timedelta | None

    def prune_request_ids(self) -> int:
        return self._in_batches(lambda uow: uow.requests.prune, self.request_ids)

    def prune_audit(self) -> int:
        return 0 if self.audit is None else self._in_batches(lambda uow: uow.sessions.prune_audit, self.audit)

    def _in_batches(
        self, prune: Callable[[UnitOfWork], Callable[[datetime, int], int]], keep: timedelta
    ) -> int:
        total = 0
        while True:
            with self.unit_of_work() as uow:
                deleted = prune(uow)(self.clock.now() - keep, BATCH)
                uow.commit()
            total += deleted
            if deleted < BATCH:
                return total
