"""The composition root (`start`): builds the storage, clock, services, servicers, interceptor,
health, metrics, tracing and background work from Settings, and serves SessionService,
CreditService, InvoiceService, EventService, ProgrammeService, health and reflection. What it
opens it closes in reverse order, on a failed start or at stop."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from kara.sessions.v1 import (
    credits_pb2,
    credits_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    invoices_pb2,
    invoices_pb2_grpc,
    programmes_pb2,
    programmes_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
)
from opentelemetry.sdk.trace import TracerProvider

from kara_sessions_server.adapters import durability, migrations
from kara_sessions_server.adapters.storage import Storage, open_storage
from kara_sessions_server.adapters.unit_of_work import SqlUnitOfWorkFactory
from kara_sessions_server.domain.clock import Clock, SystemClock
from kara_sessions_server.entrypoints import cpus, records, tracing
from kara_sessions_server.entrypoints.application import Application, build_application
from kara_sessions_server.entrypoints.grpc import sizes
from kara_sessions_server.entrypoints.grpc.feed_holdback import FeedHoldback
from kara_sessions_server.entrypoints.grpc.health_monitor import HealthMonitor
from kara_sessions_server.entrypoints.grpc.interceptor import Authenticator, CallInterceptor
from kara_sessions_server.entrypoints.grpc.metrics import Metrics
from kara_sessions_server.entrypoints.grpc.servicers import (
    CreditServicer,
    EventServicer,
    InvoiceServicer,
    ProgrammeServicer,
    SessionServicer,
    StreamGate,
)
from kara_sessions_server.entrypoints.grpc.workers import Workers
from kara_sessions_server.entrypoints.maintenance import EXPIRED_LOTS, SETTLED_UNMARKED, Pruner, Settler
from kara_sessions_server.entrypoints.settings import Settings
from kara_sessions_server.service_layer.feed import EventServices
from kara_sessions_server.service_layer.retention import Retention
from kara_sessions_server.service_layer.services import Services
from kara_sessions_server.service_layer.unit_of_work import UnitOfWorkFactory

# Settings is declared in entrypoints/settings.py and re-exported: what start() takes.
__all__ = ["EXIT_FORCED_SHUTDOWN", "SERVICE_NAMES", "RunningServer", "Settings", "serve", "start"]

log = logging.getLogger("kara_sessions_server")

# serve's exit code when the grace period ended with work still running and it left regardless.
EXIT_FORCED_SHUTDOWN = 3
SERVICE_NAMES = (
    sessions_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
    credits_pb2.DESCRIPTOR.services_by_name["CreditService"].full_name,
    invoices_pb2.DESCRIPTOR.services_by_name["InvoiceService"].full_name,
    events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
    programmes_pb2.DESCRIPTOR.services_by_name["ProgrammeService"].full_name,
)


class _Lifetime:
    """What start() opened, each with what closes it, closed in reverse order: by a start that
    failed, at the step that failed, or by RunningServer.stop."""

    def __init__(self) -> None:
        self.stack = ExitStack()
        # How long calls in flight may finish when the server stops (RunningServer.stop's).
        self.grace: float | None = None
        self.serving = False
        # False if a call's thread was still running after the grace period and the interrupt:
        # then the database is left open for it (the process is about to exit).
        self.drained = True


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    storage: Storage
    # What the services open a transaction with (tests read the database through it too).
    unit_of_work: UnitOfWorkFactory
    health: health.HealthServicer
    services: Services
    events: EventServices
    streams: StreamGate
    executor: Workers
    metrics: Metrics
    pruner: Pruner
    settler: Settler
    monitor: HealthMonitor
    stopping: threading.Event
    _lifetime: _Lifetime
    metrics_port: int | None = None
    # The tracer provider start() made (and so flushes and shuts down at stop); None otherwise.
    tracer_provider: TracerProvider | None = None
    traced: bool = False
    _stopped: threading.Event = field(default_factory=threading.Event)

    def stop(self, grace: float | None = None) -> bool:
        """Stops taking new calls, ends event streams, lets calls in flight finish for up to
        `grace` seconds, then interrupts (and so rolls back) the transactions still open and
        closes everything start() opened, in reverse order. Returns False if a call's thread
        was still running a second later."""
        if self._stopped.is_set():
            return True
        self._stopped.set()
        self._lifetime.grace = grace
        self._lifetime.stack.close()
        return self._lifetime.drained

    def wait(self) -> None:
        self.server.wait_for_termination()


def start(
    settings: Settings, clock: Clock | None = None, tracer_provider: TracerProvider | None = None
) -> RunningServer:
    """The composition root: builds every part of the server from `settings`, each step
    registering what undoes it, then serves. A failure at any step closes what the steps before
    it opened and raises (ValueError, OSError or migrations.SchemaError). The database is
    opened first (creating the schema if it is empty; refusing a schema of another version).
    `tracer_provider` traces with that provider (tests); else settings say whether to trace."""
    records.check_once()  # a field forgotten in a row, snapshot or message stops the start
    settings.check_exposure()
    credentials = settings.server_credentials()
    streams = StreamGate(settings.max_event_streams)
    lifetime = _Lifetime()
    with lifetime.stack as undo:
        storage = open_storage(
            settings.database_url,
            max_connections=settings.workers + settings.max_event_streams + 2,
            sqlite_synchronous=settings.sqlite_synchronous,
            max_transaction_seconds=settings.max_transaction_seconds,
        )
        undo.callback(_close_unless_in_use, storage, lifetime)
        migrations.prepare(storage)
        _log_durability(durability.inspect(storage))
        metrics = Metrics()
        undo.callback(metrics.close)
        now = clock or SystemClock()
        unit_of_work = SqlUnitOfWorkFactory(storage)
        app = build_application(settings, unit_of_work, now, tell=metrics.count)
        app.programmes.ensure_default(settings.notice_window)
        services, events = app.sessions, app.events
        owned_provider = _exporting_provider(settings) if tracer_provider is None else None
        if owned_provider is not None:
            undo.callback(tracing.shut_down, owned_provider)
        provider = tracer_provider or owned_provider
        if provider is not None:
            tracing.trace_transactions(provider)
            undo.callback(tracing.trace_transactions, None)
        # Unary calls on `workers` threads, each keeping its database connection; a stream
        # holds its thread while open, so streams have threads of their own: the event streams,
        # and as many again as the unary calls for health's Watch, reflection and the refusal of
        # a stream over the limit (those take no connection).
        executor = Workers(
            settings.workers, settings.max_event_streams + settings.workers, storage.keep_connections
        )
        undo.callback(_shut_down_workers, executor, lifetime)
        stopping = threading.Event()
        server = grpc.server(
            executor,
            interceptors=[
                *tracing.server_interceptors(provider),
                CallInterceptor(
                    Authenticator(settings.tokens),
                    metrics,
                    frozenset(SERVICE_NAMES),
                    stopping,
                ),
            ],
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                # Refuse a second server on the same port instead of sharing it silently, unless
                # this is one of `serve --processes N`'s (entrypoints/grpc/processes.py).
                ("grpc.so_reuseport", 1 if settings.share_port else 0),
            ],
        )
        undo.callback(_release_unstarted, server, lifetime)
        health_servicer = _add_servicers(server, app, streams, metrics, settings.max_message_bytes)
        port = _listen(server, settings.listen, credentials)
        metrics_port = _serve_metrics(metrics, settings)
        server.start()
        lifetime.serving = True
        undo.callback(_drain, server, storage, streams, events, lifetime)
        pruner = _pruner(settings, unit_of_work, now, events)
        if settings.prunes:
            pruner.start()
        undo.callback(pruner.stop)
        settler = Settler(
            settings.settle_interval_seconds,
            {
                SETTLED_UNMARKED: (services.unmarked_due, services.settle_unmarked),
                EXPIRED_LOTS: (services.due_credit_lots, lambda lot: services.expire_credits(*lot)),
            },
        )
        settler.start()
        undo.callback(settler.stop)
        monitor = HealthMonitor(
            storage,
            health_servicer,
            ("", *SERVICE_NAMES),
            every=settings.health_check_seconds,
            on_writer=FeedHoldback(metrics, storage.max_transaction_seconds),
        )
        monitor.start()
        undo.callback(monitor.stop)
        # The first things a stop does: refuse new calls, and tell load balancers.
        undo.callback(health_servicer.enter_graceful_shutdown)
        undo.callback(stopping.set)
        running = RunningServer(
            server=server,
            port=port,
            storage=storage,
            unit_of_work=unit_of_work,
            health=health_servicer,
            services=services,
            events=events,
            streams=streams,
            executor=executor,
            metrics=metrics,
            pruner=pruner,
            settler=settler,
            monitor=monitor,
            stopping=stopping,
            _lifetime=lifetime,
            metrics_port=metrics_port,
            tracer_provider=owned_provider,
            traced=provider is not None,
        )
        lifetime.stack = undo.pop_all()  # started: RunningServer.stop closes it all from here
    return running


def _add_servicers(
    server: grpc.Server, app: Application, streams: StreamGate, metrics: Metrics, max_message_bytes: int
) -> health.HealthServicer:
    budget = sizes.record_bytes(max_message_bytes)
    sessions_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(app.sessions, budget), server)
    credits_pb2_grpc.add_CreditServiceServicer_to_server(CreditServicer(app.sessions, budget), server)
    invoices_pb2_grpc.add_InvoiceServiceServicer_to_server(InvoiceServicer(app.invoices, budget), server)
    events_pb2_grpc.add_EventServiceServicer_to_server(
        EventServicer(app.events, streams, metrics, budget), server
    )
    programmes_pb2_grpc.add_ProgrammeServiceServicer_to_server(
        ProgrammeServicer(app.programmes, app.reports, budget), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _serve_reflection(server)
    return health_servicer


def _listen(server: grpc.Server, listen: str, credentials: grpc.ServerCredentials | None) -> int:
    # grpcio says a bind failed by returning 0 (older releases) or raising RuntimeError (1.5x on).
    try:
        port = (
            server.add_insecure_port(listen)
            if credentials is None
            else server.add_secure_port(listen, credentials)
        )
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {listen}: address in use or not available")
    return port


def _serve_metrics(metrics: Metrics, settings: Settings) -> int | None:
    if settings.metrics_port is None:
        return None
    try:
        return metrics.serve(settings.metrics_host, settings.metrics_port)
    except OSError as exc:
        raise OSError(
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {exc.strerror}"
        ) from exc


def _drain(
    server: grpc.Server, storage: Storage, streams: StreamGate, events: EventServices, lifetime: _Lifetime
) -> None:
    """Ends open streams now (their callers resume from their last cursor elsewhere) instead of
    holding the drain for the whole grace period, lets calls in flight finish, then interrupts
    the transactions still open: their calls are over for their callers, and an interrupted
    transaction rolls back instead of holding the process for a database."""
    streams.closing.set()
    events.wake_followers()
    server.stop(lifetime.grace).wait()
    if interrupted := storage.watchdog.interrupt_all():
        log.warning("interrupted %d transactions still open after the grace period", interrupted)


def _release_unstarted(server: grpc.Server, lifetime: _Lifetime) -> None:
    """grpcio's stop() does nothing to a server that never started, which keeps its port and
    completion queue open (grpc/grpc#14917): started and stopped at once, it lets them go, as
    grpc's C# server does on shutdown (grpc/grpc#31232). The port was never announced, and a
    call that reaches it in between is cancelled."""
    if not lifetime.serving:
        server.start()
        server.stop(None).wait()


def _close_unless_in_use(storage: Storage, lifetime: _Lifetime) -> None:
    if lifetime.drained:
        storage.close()


def _shut_down_workers(executor: Workers, lifetime: _Lifetime) -> None:
    executor.shutdown(wait=False, cancel_futures=True)
    lifetime.drained = _join_workers(executor, timeout=1.0)


def _exporting_provider(settings: Settings) -> TracerProvider | None:
    """The tracer provider the settings (or OTEL_* variables) ask for; None: no tracing."""
    if not tracing.wanted(settings.otlp_endpoint):
        return None
    return tracing.exporting_provider(settings.otlp_endpoint)


# grpcio-reflection ships only v1alpha; grpc.reflection.v1 is the same protocol under a new name,
# field for field, so one servicer answers both (grpcurl and Postman ask for v1 first).
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _serve_reflection(server: grpc.Server) -> None:
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    servicer = reflection.ReflectionServicer(
        (*SERVICE_NAMES, health_name, reflection.SERVICE_NAME, REFLECTION_V1)
    )
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1}),)
    )


def _log_durability(found: durability.Durability) -> None:
    """Says what an acknowledged change survives, and warns where it may not survive."""
    log.info(
        "database durability: %s",
        found.describe(),
        extra={"durability": found.settings, "durable": not found.risks},
    )
    for risk in found.risks:
        log.warning("an acknowledged change can be lost: %s", risk)


def _pruner(
    settings: Settings, unit_of_work: UnitOfWorkFactory, clock: Clock, events: EventServices
) -> Pruner:
    retention = Retention(unit_of_work, clock, settings.request_id_retention, settings.audit_retention)
    return Pruner(
        settings.event_prune_seconds,
        {
            "events": events.prune,
            "request_id results": retention.prune_request_ids,
            "audit rows": retention.prune_audit,
        },
    )


def _join_workers(executor: Workers, timeout: float) -> bool:
    end = time.monotonic() + timeout
    for thread in executor.threads():
        thread.join(max(0.0, end - time.monotonic()))
    return not any(t.is_alive() for t in executor.threads())


def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then drains calls in flight for up to grace_seconds."""
    if settings.cpus:  # before the server starts its threads: each inherits its starter's CPUs
        cpus.pin(settings.cpus)
    running = start(settings)
    host = settings.listen.rsplit(":", 1)[0]
    log.info(
        "kara-sessions listening on %s:%d (database %s, %s, %s)%s",
        host,
        running.port,
        _redact(settings.database_url),
        "TLS" if settings.tls_cert else "no TLS",
        "bearer-token auth" if settings.tokens else "NO AUTHENTICATION",
        f", metrics on {settings.metrics_host}:{running.metrics_port}" if running.metrics_port else "",
    )
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info(
            "received %s, shutting down (grace %.0fs)", signal.Signals(signum).name, settings.grace_seconds
        )
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The kernel may hand the signal to any of the server's threads; Python runs the handler on
    # this one, which an untimed wait would never wake to do (a stop that never came).
    while not done.wait(0.25):
        pass
    # The bound holds whatever blocks the way out (a driver ignoring the interrupt, a thread the
    # interpreter would wait for at exit): the database rolls back what a dropped connection
    # leaves open.
    bound = threading.Timer(
        settings.grace_seconds + 1.5, _exit_now, ("shutdown took longer than the grace period",)
    )
    bound.daemon = True
    bound.start()
    if running.stop(settings.grace_seconds):
        log.info("stopped")
        return
    _exit_now("a call's thread is still in the database after the grace period")


def _exit_now(why: str) -> None:
    """A shutdown that could not finish: a supervisor must see a failure, not a clean stop."""
    log.error("%s; exiting regardless (exit code %d)", why, EXIT_FORCED_SHUTDOWN)
    logging.shutdown()
    os._exit(EXIT_FORCED_SHUTDOWN)


def _redact(url: str) -> str:
    """Hides a password in a database URL before it is logged."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url
