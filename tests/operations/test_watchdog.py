"""The watchdog's promise to the pool: once release(token) returns, that token's interrupt is
never called, so a connection handed to the next request cannot be interrupted by the last one's
deadline."""

from __future__ import annotations

import threading
import time

from kara_sessions_server.adapters.watchdog import Watchdog


def test_no_interrupt_lands_after_release_returns() -> None:
    """Issue 23: expired interrupts were called after the watchdog let go of its lock, so a
    release() in between returned while its interrupt was still to come. A slow first interrupt
    holds that window open for the second."""
    dog = Watchdog()
    try:
        slow_running = threading.Event()
        released = threading.Event()
        late: list[str] = []

        def slow() -> None:
            slow_running.set()
            time.sleep(0.3)

        def second() -> None:
            if released.is_set():
                late.append("interrupted after release() returned")

        expired = time.monotonic() - 1
        dog.watch(expired, slow)
        token = dog.watch(expired, second)
        assert slow_running.wait(5), "the watchdog never fired"
        dog.release(token)
        released.set()
        time.sleep(0.5)
        assert late == []
    finally:
        dog.stop()


def test_an_interrupt_that_fails_does_not_stop_the_others() -> None:
    dog = Watchdog()
    try:
        called: list[str] = []

        def broken() -> None:
            raise RuntimeError("connection already closed")

        dog.watch(0.0, broken)
        dog.watch(0.0, lambda: called.append("second"))
        dog.watch(None, lambda: called.append("no deadline"))
        assert dog.interrupt_expired(time.monotonic()) in (0, 2)  # the thread may have been first
        deadline = time.monotonic() + 5
        while not called and time.monotonic() < deadline:
            time.sleep(0.01)
        assert called == ["second"]
    finally:
        dog.stop()
