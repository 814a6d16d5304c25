"""Says when, and by whom, the event feed is held back (issue 33). On PostgreSQL the feed stops
before the oldest unfinished transaction of this database that holds an xid (adapters/outbox.py):
a forgotten `psql` session, a batch job or a migration on our database delays every consumer
and the relay. Each health probe reports the longest-open such transaction; past the server's
transaction bound (none of ours lasts longer) it is someone else's, and the log says whose."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kara_sessions_server.adapters.storage import Writer
from kara_sessions_server.entrypoints.grpc.metrics import Metrics

log = logging.getLogger("kara_sessions_server.feed")


class FeedHoldback:
    WARN_EVERY_SECONDS = 60.0

    def __init__(self, metrics: Metrics, bound_seconds: float, clock: Callable[[], float] = time.monotonic):
        self._metrics = metrics
        self._bound = bound_seconds
        self._clock = clock
        # The backend last warned about, and when.
        self._warned: tuple[int, float] | None = None
        self._lock = threading.Lock()

    def __call__(self, writer: Writer | None) -> None:
        if writer is None or writer.open_seconds <= self._bound:
            self._metrics.feed_held_back.set(0)
            with self._lock:
                self._warned = None
            return
        self._metrics.feed_held_back.set(writer.open_seconds)
        now = self._clock()
        with self._lock:
            warned = self._warned
            if warned is not None and warned[0] == writer.pid and now - warned[1] < self.WARN_EVERY_SECONDS:
                return
            self._warned = (writer.pid, now)
        log.warning(
            "the event feed is held back by PostgreSQL backend %d (application_name %r), whose "
            "transaction has been open %.0f s (longer than --max-transaction-seconds %.0f s): no "
            "event committed after it began reaches ListEvents, StreamEvents or the relay until "
            "it ends; pg_terminate_backend(%d) ends it",
            writer.pid,
            writer.application_name,
            writer.open_seconds,
            self._bound,
            writer.pid,
            extra={"pid": writer.pid, "application_name": writer.application_name},
        )
