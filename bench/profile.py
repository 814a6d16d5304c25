"""In-process timings that say where a cancellation's time goes: the `transitions` state machine
alone, the whole service call without gRPC (domain + ORM + database + commit), and a cProfile of
that call split by component. The RPC's latency minus the service call is transport and the
interceptor (auth, metrics, log line).

Also the CPU time of a whole call through the interceptor and servicer (what a worker thread
runs, access line included), with no transport and no other thread: it varies by about a tenth
from run to run where the server's CPU per call varies by a quarter or more on a shared 2-core
VM, so alternating runs of two versions show a change of a few percent (BENCHMARKS.md)."""

from __future__ import annotations

import cProfile
import logging
import pstats
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_server.adapters import migrations
from kara_sessions_server.adapters.storage import open_storage
from kara_sessions_server.adapters.unit_of_work import SqlUnitOfWorkFactory
from kara_sessions_server.domain.clock import SystemClock
from kara_sessions_server.domain.model import BookSession, CancelSession, GrantCredits, Party, Session
from kara_sessions_server.domain.principal import UNAUTHENTICATED_SERVICE
from kara_sessions_server.entrypoints.application import build_application
from kara_sessions_server.entrypoints.grpc import sizes
from kara_sessions_server.entrypoints.grpc.interceptor import Authenticator, CallInterceptor
from kara_sessions_server.entrypoints.grpc.metrics import Metrics
from kara_sessions_server.entrypoints.grpc.servicers import SessionServicer
from kara_sessions_server.entrypoints.logs import JsonLineFormatter
from kara_sessions_server.entrypoints.settings import Settings
from kara_sessions_server.service_layer.services import Services

WHO = UNAUTHENTICATED_SERVICE


@dataclass(frozen=True)
class CancellationProfile:
    transition_us: float
    service_cancel_us: float
    shares: dict[str, float]  # component -> share of the profiled service call's time
    # RPC -> CPU us per call through interceptor + servicer + service, best of several rounds
    handler_cpu_us: dict[str, float]


def _component(filename: str, name: str) -> str:
    if "transitions" in filename or filename.endswith("lifecycle.py") or filename.endswith("policy.py"):
        return "state machine + policy"
    if "peewee" in filename or "playhouse" in filename:
        return "ORM (peewee)"
    if "sqlite3" in name or "psycopg" in filename:
        return "database (driver, execute, commit)"
    if "kara_sessions_server" in filename:
        return "service code"
    return "other (stdlib: uuid, json, datetime, ...)"


# Whose sessions _book books.
PROFESSIONAL = "pro-profile"


def _book(services: Services, n: int, client: str) -> list[Session]:
    services.grant_credits(WHO, GrantCredits(client, n, str(uuid.uuid4())))
    starts = datetime.now(UTC) + timedelta(days=2)
    return [
        services.book_session(WHO, BookSession(client, PROFESSIONAL, starts, str(uuid.uuid4())))
        for _ in range(n)
    ]


def _cancel(session_id: str) -> CancelSession:
    return CancelSession(session_id, Party.CLIENT, False, None, "", str(uuid.uuid4()))


def profile_cancellation(workdir: Path, n: int = 2000) -> CancellationProfile:
    storage = open_storage(f"sqlite:///{workdir / 'profile.db'}", max_connections=2)
    try:
        migrations.prepare(storage)
        clock = SystemClock()
        settings = Settings()
        app = build_application(settings, SqlUnitOfWorkFactory(storage), clock)
        app.programmes.ensure_default(settings.notice_window)
        services = app.sessions
        sessions = _book(services, n, "client-a")
        now = datetime.now(UTC)
        started = time.perf_counter()
        for session in sessions:
            services.lifecycle.cancel(session, _cancel(session.session_id), now)
        transition_us = (time.perf_counter() - started) / n * 1e6

        started = time.perf_counter()
        for session in sessions:
            services.cancel_session(WHO, _cancel(session.session_id))
        service_us = (time.perf_counter() - started) / n * 1e6

        more = _book(services, n, "client-b")
        profiler = cProfile.Profile()
        profiler.enable()
        for session in more:
            services.cancel_session(WHO, _cancel(session.session_id))
        profiler.disable()
    finally:
        storage.close()
    stats = pstats.Stats(profiler)
    totals: dict[str, float] = {}
    for (filename, _line, name), row in stats.stats.items():  # type: ignore[attr-defined]
        own_time = row[2]
        key = _component(filename, name)
        totals[key] = totals.get(key, 0.0) + own_time
    whole = sum(totals.values()) or 1.0
    shares = {k: v / whole for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    return CancellationProfile(transition_us, service_us, shares, handler_cpu(workdir))


class _Context:
    """The parts of grpc.ServicerContext the interceptor and servicers use, for an OK call."""

    def time_remaining(self) -> float:
        return 30.0

    def is_active(self) -> bool:
        return True

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    def code(self) -> None:
        return None


def handler_cpu(workdir: Path, calls: int = 300, rounds: int = 5) -> dict[str, float]:
    """CPU us per GetPayment and CancelSession run as a server's worker runs them (interceptor,
    servicer, service, metrics, the JSON access line to a file), without gRPC's transport or
    threads: the best of `rounds` rounds of `calls`."""
    storage = open_storage(f"sqlite:///{workdir / 'handler.db'}", max_connections=2)
    access = logging.getLogger("kara_sessions_server.rpc")
    line = logging.FileHandler(workdir / "handler-access.log")
    line.setFormatter(JsonLineFormatter())
    saved = (access.level, access.propagate)
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
            Authenticator(None), metrics, frozenset({"kara.sessions.v1.SessionService"})
        )

        def handler(name: str) -> Any:
            """The behaviour gRPC would run for `name`: the servicer's, wrapped by the interceptor."""
            wrapped = interceptor.intercept_service(
                lambda _: grpc.unary_unary_rpc_method_handler(getattr(servicer, name)),
                SimpleNamespace(method=f"/kara.sessions.v1.SessionService/{name}"),  # type: ignore[arg-type]
            )
            assert wrapped is not None
            return wrapped.unary_unary

        get, cancel = handler("GetPayment"), handler("CancelSession")
        context = _Context()
        best = {"GetPayment": float("inf"), "CancelSession": float("inf")}
        for _ in range(rounds):
            ids = [s.session_id for s in _book(services, calls, "client-handler")]
            for name, call, requests in (
                ("GetPayment", get, [pb.GetPaymentRequest(session_id=i) for i in ids]),
                (
                    "CancelSession",
                    cancel,
                    [
                        pb.CancelSessionRequest(
                            session_id=i, cancelled_by=pb.PARTY_CLIENT, request_id=str(uuid.uuid4())
                        )
                        for i in ids
                    ],
                ),
            ):
                started = time.thread_time()
                for request in requests:
                    call(request, context)
                best[name] = min(best[name], (time.thread_time() - started) / calls * 1e6)
        return best
    finally:
        access.removeHandler(line)
        line.close()
        access.setLevel(saved[0])
        access.propagate = saved[1]
        storage.close()
