"""In-process timings that say where a cancellation's time goes: the `transitions` state machine
alone, the whole service call without gRPC (domain + ORM + database + commit), and a cProfile of
that call split by component. The RPC's latency minus the service call is transport and the
interceptor (auth, metrics, log line)."""

from __future__ import annotations

import cProfile
import pstats
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from kara_sessions_server.adapters import migrations
from kara_sessions_server.adapters.storage import open_storage
from kara_sessions_server.domain.clock import SystemClock
from kara_sessions_server.domain.model import BookSession, CancelSession, GrantCredits, Party, Session
from kara_sessions_server.domain.principal import UNAUTHENTICATED_SERVICE
from kara_sessions_server.domain.programme import DEFAULT_TERMS
from kara_sessions_server.service_layer.programme_services import ProgrammeServices
from kara_sessions_server.service_layer.services import Services

WHO = UNAUTHENTICATED_SERVICE


@dataclass(frozen=True)
class CancellationProfile:
    transition_us: float
    service_cancel_us: float
    shares: dict[str, float]  # component -> share of the profiled service call's time


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


def _book(services: Services, n: int, client: str) -> list[Session]:
    services.grant_credits(WHO, GrantCredits(client, n, str(uuid.uuid4())))
    starts = datetime.now(UTC) + timedelta(days=2)
    return [
        services.book_session(WHO, BookSession(client, "pro-profile", starts, str(uuid.uuid4())))
        for _ in range(n)
    ]


def _cancel(session_id: str) -> CancelSession:
    return CancelSession(session_id, Party.CLIENT, False, None, "", str(uuid.uuid4()))


def profile_cancellation(workdir: Path, n: int = 2000) -> CancellationProfile:
    storage = open_storage(f"sqlite:///{workdir / 'profile.db'}", max_connections=2)
    try:
        migrations.prepare(storage)
        services = Services(storage, SystemClock())
        ProgrammeServices(services).ensure_default(DEFAULT_TERMS.notice_window)
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
    return CancellationProfile(transition_us, service_us, shares)
