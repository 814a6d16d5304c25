"""Interrupts database work that outlives its call: a transaction whose deadline has passed, and
at shutdown every transaction still open, so no database wait can hold a thread, or the
process, for longer than its caller or its operator allows."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("kara_sessions_server")

# How often expired deadlines are looked for: a transaction overruns its deadline by at most this.
TICK_SECONDS = 0.05


class Watchdog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[int, tuple[float | None, Callable[[], None]]] = {}
        self._tokens = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="db-watchdog", daemon=True)
        self._thread.start()

    def watch(self, deadline: float | None, interrupt: Callable[[], None]) -> int:
        """Until `release(token)`: `interrupt()` is called once `deadline` (time.monotonic())
        passes, or at `interrupt_all()`."""
        token = next(self._tokens)
        with self._lock:
            self._watched[token] = (deadline, interrupt)
        return token

    def release(self, token: int) -> None:
        """Once this returns, `token`'s interrupt will not be called: its connection may go back
        to the pool for another transaction."""
        with self._lock:
            self._watched.pop(token, None)

    def interrupt_all(self) -> int:
        # Interrupts run under the lock (they never block), so none outlives a release().
        with self._lock:
            for _, interrupt in self._watched.values():
                _call(interrupt)
            count = len(self._watched)
            self._watched.clear()
        return count

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            self.interrupt_expired(time.monotonic())

    def interrupt_expired(self, now: float) -> int:
        """Interrupts every transaction whose deadline is at or before `now` (the thread's
        tick). Under the lock, as interrupt_all: an interrupt called after it, once release()
        had returned, would land on whatever transaction the connection serves next."""
        with self._lock:
            expired = [
                t for t, (deadline, _) in self._watched.items() if deadline is not None and deadline <= now
            ]
            for token in expired:
                _call(self._watched.pop(token)[1])
        return len(expired)


def _call(interrupt: Callable[[], None]) -> None:
    try:
        interrupt()
    except Exception:  # the connection may already be gone: nothing left to interrupt
        log.debug("interrupting a transaction failed", exc_info=True)
