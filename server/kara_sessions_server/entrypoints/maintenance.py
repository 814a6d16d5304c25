"""Background work a server does on a timer: pruning what its retention settings let go (old
events, old request_id results, and audit rows if asked), settling the sessions nobody marked
that their programme's terms say are due, and expiring credits whose lot's time has come. Each
failure is logged and tried again next round; nothing here can stop the server."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from kara_sessions_server.domain.errors import DomainError

log = logging.getLogger("kara_sessions_server")


class _Every:
    """A thread that calls `run_once` every `every` seconds until stopped."""

    def __init__(self, every: float, name: str):
        self._every = every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def run_once(self) -> dict[str, int]:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._done.wait(self._every):
            self.run_once()


class Pruner(_Every):
    def __init__(self, every: float, jobs: dict[str, Callable[[], int]]):
        super().__init__(every, "pruner")
        self._jobs = jobs

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


# The settler's jobs, by the names its log lines and run_once() give them.
SETTLED_UNMARKED = "settled unmarked sessions"
EXPIRED_LOTS = "expired credit lots"


class Settler(_Every):
    """Does what the server owes by the clock, each thing in its own transaction, a batch at a
    time until nothing is due: settles the sessions nobody marked, and expires the credits whose
    lot's time has come. Every replica runs one: what two of them do at once is done by one,
    and the other replays that (or finds it done, or changed by someone else first)."""

    BATCH = 100

    def __init__(
        self, every: float, jobs: dict[str, tuple[Callable[[int], Sequence[Any]], Callable[[Any], object]]]
    ):
        super().__init__(every, "settler")
        # name -> (what is due, up to n; do one)
        self._jobs = jobs

    def run_once(self) -> dict[str, int]:
        """Does what is due now; by job, how many this round did (or found done by another)."""
        return {name: self._job(name, due, act) for name, (due, act) in self._jobs.items()}

    def _job(self, name: str, due: Callable[[int], Sequence[Any]], act: Callable[[Any], object]) -> int:
        done = 0
        try:
            while not self._done.is_set():
                items = due(self.BATCH)
                did = sum(self._one(name, act, item) for item in items)
                done += did
                # A batch that did nothing would come back the same (each refused): next round.
                if len(items) < self.BATCH or not did:
                    break
        except Exception:
            log.exception("%s failed; will try again", name)
        if done:
            log.info("%s: %d", name, done)
        return done

    @staticmethod
    def _one(name: str, act: Callable[[Any], object], item: Any) -> int:
        try:
            act(item)
        except DomainError as refused:
            # Changed by someone else first (a session marked meanwhile): theirs stands.
            log.debug("%s: %s not done: %s", name, item, refused)
            return 0
        return 1
