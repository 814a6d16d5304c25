"""Wakes whoever follows the event feed when a change commits in this process."""

from __future__ import annotations

import threading


class CommitSignal:
    """A counter of commits with a condition to wait on. A follower notes the count before it
    reads, and after reading everything waits for the count to move (or a timeout), so a commit
    between its read and its wait is never slept through. Commits made by another server process
    are not signalled here: followers also look again when the wait times out."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._commits = 0

    @property
    def commits(self) -> int:
        with self._condition:
            return self._commits

    def notify(self) -> None:
        with self._condition:
            self._commits += 1
            self._condition.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._commits != seen, timeout)
