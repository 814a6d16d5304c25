"""Background work a server does on a timer: pruning what its retention settings let go (old
events, old request_id results, and audit rows if asked). Each failure is logged and tried
again next round; nothing here can stop the server."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

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
