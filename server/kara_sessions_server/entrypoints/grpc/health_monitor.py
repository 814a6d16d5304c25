"""Health follows the database: the health service says NOT_SERVING while the database does not
answer, so a load balancer or a Kubernetes readiness probe sends traffic elsewhere, and SERVING
again once it answers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from grpc_health.v1 import health, health_pb2

from kara_sessions_server.adapters.storage import Probe, Storage, Writer

log = logging.getLogger("kara_sessions_server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthMonitor:
    def __init__(
        self,
        storage: Storage,
        servicer: health.HealthServicer,
        names: Sequence[str],
        every: float = 2.0,
        timeout: float = 1.5,
        on_writer: Callable[[Writer | None], None] = lambda writer: None,
    ):
        self._storage = storage
        self._servicer = servicer
        self._names = tuple(names)
        self._every = every
        self._timeout = timeout
        # Told each probe's longest-open writing transaction (feed_holdback.FeedHoldback).
        self._on_writer = on_writer
        self._up: bool | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-monitor", daemon=True)

    def start(self) -> None:
        self.check_once()
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._timeout + 1)

    def check_once(self) -> bool:
        """Probes the database (on a thread of its own, so a probe that hangs counts as down)
        and sets every service's health to what it found."""
        found: list[Probe] = []
        probe = threading.Thread(
            target=lambda: found.append(self._storage.probe(self._timeout)), name="health-probe", daemon=True
        )
        probe.start()
        probe.join(self._timeout + 0.5)
        problem = found[0].problem if found else f"no answer within {self._timeout:.1f} s"
        up = problem is None
        if up:
            self._on_writer(found[0].oldest_writer)
        if up != self._up:
            if up:
                again = "" if self._up is None else " again"
                log.info("the database answers%s: health SERVING", again)
            else:
                log.warning("the database does not answer (%s): health NOT_SERVING", problem)
            for name in self._names:
                self._servicer.set(name, SERVING if up else NOT_SERVING)
            self._up = up
        return up

    def _run(self) -> None:
        while not self._done.wait(self._every):
            self.check_once()
