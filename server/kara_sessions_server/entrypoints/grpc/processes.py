"""`kara-sessions serve --processes N`: N server processes sharing one port.

One CPython process runs Python on one core at a time (BENCHMARKS.md, issue 15), so a server
that should use every core runs several. This is grpcio's documented multiprocessing pattern:
the parent reserves the port with SO_REUSEPORT, then starts N children (spawned, never forked
from a process that has touched gRPC), each with its own gRPC server, thread pool and database
connections, listening on that port with SO_REUSEPORT; the kernel spreads new connections
across them. A channel stays with the process it connected to.

PostgreSQL only: SQLite has a single writer per database file, and writers in different
processes cannot queue on one lock (they would poll SQLite's busy handler instead, which is
what once made its p99 hundreds of milliseconds).

The parent does no RPC work. It prepares the schema once, starts the children, forwards
SIGTERM/SIGINT to them and waits for each to drain (its own grace period). If a child dies on
its own, the parent stops the others and exits 1, so the supervisor (systemd, Kubernetes)
restarts the whole server rather than leaving it quietly short of a process."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from kara_sessions_server.adapters import migrations
from kara_sessions_server.adapters.storage import open_storage, sqlite_path
from kara_sessions_server.adapters.unit_of_work import SqlUnitOfWorkFactory
from kara_sessions_server.domain.clock import SystemClock
from kara_sessions_server.entrypoints import logs
from kara_sessions_server.entrypoints.application import build_application

log = logging.getLogger("kara_sessions_server")

_PR_SET_PDEATHSIG = 1  # linux/prctl.h

# A child that outlives its own bound (grace + 1.5 s, see server.serve) by this much is killed.
_KILL_AFTER_SECONDS = 5.0


def refuse_sqlite(database_url: str, processes: int) -> None:
    if processes > 1 and sqlite_path(database_url) is not None:
        raise ValueError(
            f"--processes {processes} needs PostgreSQL: SQLite has one writer per database file, and "
            "writers in different processes cannot queue for it (they would busy-wait, and p99 would "
            "climb to hundreds of milliseconds). Use --processes 1 with SQLite."
        )


def serve_processes(settings: Any, processes: int, log_level: str, log_format: str) -> int:
    """Runs `processes` servers on settings.listen until SIGTERM/SIGINT; returns the exit code.
    `settings` is a grpc.server.Settings (imported by the children, not here)."""
    refuse_sqlite(settings.database_url, processes)
    if 0 < len(settings.cpus) < processes:
        log.warning(
            "%d server processes on %d CPUs (--cpus %s): some share a CPU, and each gets less of it",
            processes,
            len(settings.cpus),
            ",".join(map(str, settings.cpus)),
        )
    _prepare_database(settings)
    host, port = _split(settings.listen)
    with _reserved_port(host, port) as bound:
        context = multiprocessing.get_context("spawn")
        parent = os.getpid()
        children = [
            context.Process(
                target=_child,
                args=(_child_settings(settings, f"{host}:{bound}", index), log_level, log_format, parent),
                name=f"kara-sessions-{index}",
                daemon=False,
            )
            for index in range(processes)
        ]
        stopping = _on_stop_signals()
        for child in children:
            child.start()
        log.info(
            "kara-sessions: %d server processes on %s:%d (pids %s)",
            processes,
            host,
            bound,
            ", ".join(str(c.pid) for c in children),
        )
        failed = _supervise(children, stopping)
        clean = _stop(children, settings.grace_seconds)
    if failed:
        return 1
    from kara_sessions_server.entrypoints.grpc.server import EXIT_FORCED_SHUTDOWN

    return 0 if clean else EXIT_FORCED_SHUTDOWN


def _child_settings(settings: Any, listen: str, index: int) -> Any:
    metrics_port = settings.metrics_port
    if metrics_port:  # one metrics endpoint per process: PORT, PORT+1, ...
        metrics_port += index
    # With --cpus, each process keeps to one of them, in turn.
    cpus = (settings.cpus[index % len(settings.cpus)],) if settings.cpus else ()
    return replace(
        settings, listen=listen, share_port=True, prunes=index == 0, metrics_port=metrics_port, cpus=cpus
    )


def _child(settings: Any, log_level: str, log_format: str, parent: int) -> None:
    from kara_sessions_server.entrypoints.grpc.server import serve

    _die_with_parent(parent)
    logs.configure(log_level, log_format, with_pid=True)  # type: ignore[arg-type]
    try:
        serve(settings)
    except (OSError, ValueError, migrations.SchemaError) as exc:
        log.error("server process could not start: %s", exc)
        sys.exit(1)


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this process if the parent dies, even by SIGKILL, so no server process
    is left serving on its own (a supervisor would start a new parent beside it). `parent` is
    the parent's pid: in a container it may well be 1."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the parent's SIGTERM handling still applies
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect: we were re-parented
        os.kill(os.getpid(), signal.SIGTERM)


def _prepare_database(settings: Any) -> None:
    """Creates (or checks) the schema and the default programme once, so that the children
    never race to create them."""
    storage = open_storage(settings.database_url, max_connections=1)
    try:
        migrations.prepare(storage)
        app = build_application(settings, SqlUnitOfWorkFactory(storage), SystemClock())
        app.programmes.ensure_default(settings.notice_window)
    finally:
        storage.close()


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    try:
        return host, int(port)
    except ValueError:
        raise ValueError(f"--listen must be HOST:PORT, not {listen!r}") from None


@contextmanager
def _reserved_port(host: str, port: int) -> Iterator[int]:
    """Holds HOST:PORT (bound with SO_REUSEPORT, not listening) while the children serve on it,
    so no unrelated server can take it between their starts; port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        yield int(sock.getsockname()[1])


def _on_stop_signals() -> list[int]:
    """Records SIGTERM/SIGINT instead of dying of them; the children get their own."""
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return received


def _supervise(children: Sequence[BaseProcess], stopping: list[int]) -> bool:
    """Waits for a stop signal (returns False) or a child's death (returns True)."""
    while not stopping:
        ended = wait([c.sentinel for c in children], timeout=0.5)
        if ended and not stopping:
            # A sentinel fires as the process exits, a moment before it can be reaped: join it.
            dead = [c for c in children if c.sentinel in ended]
            for child in dead:
                child.join(5)
                log.error(
                    "server process %s (pid %s) exited with %s; stopping the others",
                    child.name,
                    child.pid,
                    child.exitcode,
                )
            return True
    log.info("received %s, stopping %d server processes", signal.Signals(stopping[0]).name, len(children))
    return False


def _stop(children: Sequence[BaseProcess], grace: float) -> bool:
    """Stops every child; True if each drained and exited 0 (none forced, none killed)."""
    for child in children:
        if child.is_alive() and child.pid is not None:
            child.terminate()  # SIGTERM: the child drains its calls within its grace period
    for child in children:
        child.join(grace + 1.5 + _KILL_AFTER_SECONDS)
        if child.is_alive():
            log.error("server process %s (pid %s) did not stop; killing it", child.name, child.pid)
            child.kill()
            child.join()
    return all(child.exitcode == 0 for child in children)
