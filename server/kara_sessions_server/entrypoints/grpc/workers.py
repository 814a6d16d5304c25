"""The executor gRPC runs handlers on, split by kind of call, so that each call waits in one
queue only. grpcio takes one executor for every handler. A stream (StreamEvents, health's
Watch, reflection) holds its thread for as long as it is open, so a single pool had to be
`workers + max_event_streams` threads with a gate in front of the unary calls: half the calls
in flight then woke twice, once for a thread and once at the gate (issue 35 counted 36 context
switches per cancellation against the floor's 16). Here unary calls run on exactly `workers`
threads, waiting in that pool's queue, and streams on threads of their own."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

from grpc import _server as grpc_server  # the function grpcio hands a stream's handler to

T = TypeVar("T")

# What grpcio submits to run a server-streaming or bidirectional handler (grpcio 1.5x to 1.85:
# `thread_pool.submit(state.context.run, _stream_response_in_pool, ...)`). If a later grpcio
# renames it, every call runs on the unary pool, which tests/operations/test_workers.py shows.
_STREAM_RUNNER: object = getattr(grpc_server, "_stream_response_in_pool", None)


class Workers(futures.ThreadPoolExecutor):
    """`unary` threads for unary calls (this pool), `streams` threads for streaming calls (its
    `streams` pool); one queue each."""

    def __init__(self, unary: int, streams: int, on_unary_thread: Callable[[], None] | None = None):
        # `on_unary_thread` runs first on each unary thread (the storage's keep_connections).
        super().__init__(max_workers=unary, thread_name_prefix="rpc", initializer=on_unary_thread)
        self.streams = futures.ThreadPoolExecutor(max_workers=streams, thread_name_prefix="rpc-stream")

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> futures.Future[T]:
        if self.is_stream(fn, args):
            return self.streams.submit(fn, *args, **kwargs)
        return super().submit(fn, *args, **kwargs)

    @staticmethod
    def is_stream(fn: Callable[..., Any], args: tuple[Any, ...]) -> bool:
        # grpcio runs the handler inside the call's context: fn is Context.run, args[0] the runner.
        runner = args[0] if args and isinstance(getattr(fn, "__self__", None), contextvars.Context) else fn
        return _STREAM_RUNNER is not None and runner is _STREAM_RUNNER

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
        self.streams.shutdown(wait=wait, cancel_futures=cancel_futures)

    def threads(self) -> list[threading.Thread]:
        """Every thread either pool has started (ThreadPoolExecutor keeps them in a private
        attribute; an empty list if a later Python hides it)."""
        return [t for pool in (self, self.streams) for t in getattr(pool, "_threads", ())]
