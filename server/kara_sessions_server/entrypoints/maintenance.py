"""Background work a server does on a timer: pruning what its retention settings let go (old
events, old request_id results, and audit rows if asked), and settling the sessions nobody
marked that their programme's terms say are due. Each failure is logged and tried again next
round; nothing here can stop the server."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kara_sessions_server.domain.errors import DomainError

log = logging.getLogger("kara_sessions_server")


class Pruner:
    def __init__(self, every: float, jobs: dict[str, Callable[[], int]]):
        self._every = every
        self._jobs = jobs
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pruner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def run_once(self) -> dict[str, int]:
        pruned = {}
        for name, job in self._jobs.items():
            try:
                pruned[name] = job()
            except Exception:
                log.exception("pruning %s failed; will try again", name)
                continue
            if pruned[name]:
                log.info("pruned %d %s", pruned[name], name)
        return pruned

    def _run(self) -> None:
        while not self._done.wait(self._every):
            self.run_once()


class Settler:
    """Settles the sessions nobody marked, a batch at a time, each in its own transaction
    (`settle`), until none is due. Every replica runs one: a session two of them settle at once
    is settled by one, and the other replays that (or meets a session marked meanwhile)."""

    BATCH = 100

    def __init__(self, every: float, due: Callable[[int], list[str]], settle: Callable[[str], object]):
        self._every = every
        self._due = due
        self._settle = settle
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="settler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def run_once(self) -> int:
        """Settles what is due now; how many this round settled or found settled."""
        settled = 0
        try:
            while not self._done.is_set():
                due = self._due(self.BATCH)
                for session_id in due:
                    settled += self._one(session_id)
                if len(due) < self.BATCH:
                    break
        except Exception:
            log.exception("settling unmarked sessions failed; will try again")
        if settled:
            log.info("settled %d unmarked sessions", settled)
        return settled

    def _one(self, session_id: str) -> int:
        try:
            self._settle(session_id)
        except DomainError as refused:
            # Marked, cancelled or moved by someone else first: theirs stands.
            log.debug("session %s was not settled: %s", session_id, refused)
            return 0
        return 1

    def _run(self) -> None:
        while not self._done.wait(self._every):
            self.run_once()
