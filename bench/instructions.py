"""N CancelSession calls run as a server's worker runs them (interceptor, servicer, service,
metrics, the access line), in one process, for `valgrind --tool=callgrind`: it counts
instructions, so the figure is the same from run to run on a busy shared machine, where
timings vary by a quarter. SQLite with `synchronous=normal`, so no fsync is counted.

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.20 .venv/bin/python -m bench.instructions 20
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.220 .venv/bin/python -m bench.instructions 220

The difference of the two totals (`callgrind_annotate` prints them), divided by 200, is one
cancellation's instructions without the start-up both runs share."""

from __future__ import annotations

import logging
import sys
import tempfile
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_server.adapters import migrations
from kara_sessions_server.adapters.storage import open_storage
from kara_sessions_server.adapters.unit_of_work import SqlUnitOfWorkFactory
from kara_sessions_server.domain.clock import SystemClock
from kara_sessions_server.entrypoints.application import build_application
from kara_sessions_server.entrypoints.grpc import sizes
from kara_sessions_server.entrypoints.grpc.interceptor import Authenticator, CallInterceptor
from kara_sessions_server.entrypoints.grpc.metrics import Metrics
from kara_sessions_server.entrypoints.grpc.servicers import SessionServicer
from kara_sessions_server.entrypoints.logs import JsonLineFormatter
from kara_sessions_server.entrypoints.settings import Settings

from .profile import _book, _Context


def cancellations(workdir: Path, n: int) -> None:
    storage = open_storage(f"sqlite:///{workdir / 'cg.db'}", max_connections=2, sqlite_synchronous="normal")
    access = logging.getLogger("kara_sessions_server.rpc")
    line = logging.FileHandler(workdir / "access.log")
    line.setFormatter(JsonLineFormatter())
    access.addHandler(line)
    access.setLevel(logging.INFO)
    access.propagate = False
    try:
        migrations.prepare(storage)
        metrics = Metrics()
        clock = SystemClock()
        settings = Settings()
        budget = sizes.record_bytes(settings.max_message_bytes)
        app = build_application(settings, SqlUnitOfWorkFactory(storage), clock, tell=metrics.count)
        app.programmes.ensure_default(settings.notice_window)
        services = app.sessions
        servicer = SessionServicer(services, budget)
        interceptor = CallInterceptor(
            Authenticator(None), metrics, frozenset({"kara.sessions.v1.SessionService"}), workers=1
        )
        wrapped = interceptor.intercept_service(
            lambda _: grpc.unary_unary_rpc_method_handler(servicer.CancelSession),
            SimpleNamespace(method="/kara.sessions.v1.SessionService/CancelSession"),  # type: ignore[arg-type]
        )
        assert wrapped is not None
        cancel: Any = wrapped.unary_unary
        # Booked outside the measured part's count: both runs book the same 220.
        ids = [s.session_id for s in _book(services, 220, "client-cg")]
        context = _Context()
        for session_id in ids[:n]:
            request = pb.CancelSessionRequest(
                session_id=session_id, cancelled_by=pb.PARTY_CLIENT, request_id=str(uuid.uuid4())
            )
            cancel(request, context)
    finally:
        access.removeHandler(line)
        line.close()
        storage.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        cancellations(Path(tmp), int(sys.argv[1]))
