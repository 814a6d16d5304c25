"""Builds and runs the gRPC server: SessionService, CreditService, health and reflection."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field
from datetime import timedelta
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kara.sessions.v1 import credits_pb2, credits_pb2_grpc, sessions_pb2, sessions_pb2_grpc

from .clock import Clock, SystemClock
from .grpc_api import CreditServicer, SessionServicer
from .policy import DEFAULT_NOTICE_WINDOW, CancellationPolicy
from .services import Services
from .storage import DEFAULT_DATABASE_URL, Storage, open_storage

log = logging.getLogger("kara_sessions_server")

SERVICE_NAMES = (
    sessions_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
    credits_pb2.DESCRIPTOR.services_by_name["CreditService"].full_name,
)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    database_url: str = DEFAULT_DATABASE_URL
    notice_window: timedelta = DEFAULT_NOTICE_WINDOW
    max_workers: int = 16
    grace_seconds: float = 10.0
    # TLS: PEM server certificate chain and key; with client_ca, clients must present a
    # certificate it signed (mutual TLS).
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    client_ca: bytes | None = None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None and self.tls_key is None:
            if self.client_ca is not None:
                raise ValueError("a client CA (mutual TLS) needs a server certificate and key")
            return None
        if self.tls_cert is None or self.tls_key is None:
            raise ValueError("TLS needs both a server certificate and its key")
        return grpc.ssl_server_credentials(
            [(self.tls_key, self.tls_cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    storage: Storage
    health: health.HealthServicer
    services: Services
    executor: futures.ThreadPoolExecutor
    _stopped: threading.Event = field(default_factory=threading.Event)

    def stop(self, grace: float | None = None) -> None:
        """Stops taking new calls, lets calls in flight finish (up to `grace` s), then closes."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.executor.shutdown(wait=True)
        self.storage.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def start(settings: Settings, clock: Clock | None = None) -> RunningServer:
    credentials = settings.server_credentials()
    storage = open_storage(settings.database_url, max_connections=settings.max_workers + 2)
    services = Services(storage, clock or SystemClock(), CancellationPolicy(settings.notice_window))
    executor = futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="rpc")
    server = grpc.server(
        executor,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Refuse a second server on the same port instead of sharing it silently.
            ("grpc.so_reuseport", 0),
        ],
    )
    sessions_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(services), server)
    credits_pb2_grpc.add_CreditServiceServicer_to_server(CreditServicer(services), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    if credentials is None:
        port = server.add_insecure_port(settings.listen)
    else:
        port = server.add_secure_port(settings.listen, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {settings.listen}: address in use or not available")
    server.start()
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, storage, health_servicer, services, executor)


def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then drains calls in flight for up to grace_seconds."""
    running = start(settings)
    host = settings.listen.rsplit(":", 1)[0]
    log.info(
        "kara-sessions listening on %s:%d (database %s)", host, running.port, _redact(settings.database_url)
    )
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info(
            "received %s, shutting down (grace %.0fs)", signal.Signals(signum).name, settings.grace_seconds
        )
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    running.stop(settings.grace_seconds)
    log.info("stopped")


def _redact(url: str) -> str:
    """Hides a password in a database URL before it is logged."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url
