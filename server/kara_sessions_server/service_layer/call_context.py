"""The call a request serves, as far as the service layer needs it: when its caller stops waiting
(the deadline) and whether it still waits. The gRPC entrypoint sets it for each RPC; in-process
use (tests, the benchmark's profile) sets none and has no deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Call:
    # time.monotonic() when the caller stops waiting; None: no deadline.
    deadline: float | None
    # False once the caller has gone (cancelled, timed out, or told the server is stopping).
    is_active: Callable[[], bool]
    # Set when the answer is a request_id's stored first result (a replay), which the caller is
    # told beside the response (the gRPC entrypoint's `kara-replayed` trailer).
    replayed: list[bool] = field(default_factory=list)

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


CURRENT: ContextVar[Call | None] = ContextVar("kara_call", default=None)


class DeadlineExceeded(Exception):
    """The call's deadline passed before or during its transaction, which was rolled back."""


class CallGone(Exception):
    """The caller stopped waiting before the transaction committed; it was rolled back, so what
    the caller was told (that it failed) stays true."""
