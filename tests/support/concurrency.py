"""Racing requests: n calls released together."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kara_sessions_client.client import KaraError


def race(n: int, call: Callable[[int], Any]) -> list[Any]:
    """Runs call(0..n-1) on n threads released together; returns results or KaraErrors."""
    barrier = threading.Barrier(n)

    def run(i: int) -> Any:
        barrier.wait()
        try:
            return call(i)
        except KaraError as exc:
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))
