"""While changes fail because the database's disk is full (issue 33): RESOURCE_EXHAUSTED
DATABASE_FULL to each caller (grpc/status.py), and for the operator one WARNING a minute (not an
ERROR per call, which would fill the disk faster) and the kara_database_full gauge at 1; both
end with the next committed change."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kara_sessions_server.entrypoints.grpc.metrics import Metrics

log = logging.getLogger("kara_sessions_server.rpc")


class DiskFull:
    WARN_EVERY_SECONDS = 60.0

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic):
        self.metrics = metrics
        self.clock = clock
        self.since: float | None = None
        self._warned_at: float | None = None
        self._refused = 0
        self._lock = threading.Lock()

    def full(self, name: str, what: str, incident: str) -> None:
        now = self.clock()
        with self._lock:
            self._refused += 1
            if self.since is None:
                self.since = now
                self.metrics.database_full.set(1)
            if self._warned_at is not None and now - self._warned_at < self.WARN_EVERY_SECONDS:
                return
            self._warned_at, refused, self._refused = now, self._refused, 0
        log.warning(
            "%s: %s: changes are refused (RESOURCE_EXHAUSTED DATABASE_FULL, %d since the last "
            "warning, for %.0f s) until space is freed; nothing acknowledged is lost (incident %s)",
            name,
            what,
            refused,
            now - self.since,
            incident,
            extra={"incident": incident},
        )

    def cleared(self, name: str) -> None:
        with self._lock:
            if self.since is None:
                return
            lasted, self.since, self._warned_at, self._refused = self.clock() - self.since, None, None, 0
            self.metrics.database_full.set(0)
        log.warning("%s committed: the database accepts changes again (it was full for %.0f s)", name, lasted)
