"""start() is the composition root: each step registers what undoes it, so a failure at any step
of start-up closes everything the steps before it opened (issue 27). Measured by what the
process holds afterwards (its threads, its open files and sockets, the ports it listened on,
process-wide tracing), not by which close methods were called."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from kara_sessions_server.adapters import migrations
from kara_sessions_server.adapters import tracing as storage_tracing
from kara_sessions_server.entrypoints.grpc import server as server_module
from kara_sessions_server.entrypoints.grpc.server import Settings, start
from kara_sessions_server.service_layer.programme_services import ProgrammeServices

from ..support.processes import run_cli


class Refused(Exception):
    """The failure injected into one step."""


def _refuse(*args: object, **kwargs: object) -> None:
    raise Refused


def _held() -> tuple[set[str], int]:
    """This process's live threads (by name) and open file descriptors."""
    return {t.name for t in threading.enumerate()}, len(os.listdir("/proc/self/fd"))


def _settle(baseline: tuple[set[str], int]) -> tuple[set[str], int]:
    """What is held once threads that were told to stop have stopped (up to 5 s)."""
    deadline = time.monotonic() + 5
    while _held() != baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return _held()


@contextmanager
def _taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def _free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


# Each step of start-up, and how to make it fail: by a real refusal where one exists (a port
# already taken), else by the step's own function raising.
STEPS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "the schema": lambda mp: mp.setattr(migrations, "prepare", _refuse),
    "the default programme": lambda mp: mp.setattr(ProgrammeServices, "ensure_default", _refuse),
    "the thread pool": lambda mp: mp.setattr(server_module, "Workers", _refuse),
    "the servicers": lambda mp: mp.setattr(server_module, "_serve_reflection", _refuse),
    "the port": lambda mp: None,  # the test listens where another socket already does
    "the metrics endpoint": lambda mp: None,  # likewise for the metrics port
    "the gRPC server's start": lambda mp: mp.setattr(server_module.grpc, "server", _ServerThatWillNotStart),
    "the pruner": lambda mp: mp.setattr(server_module, "_pruner", _refuse),
    "the health monitor": lambda mp: mp.setattr(server_module.HealthMonitor, "start", _refuse),
}


class _ServerThatWillNotStart:
    """A real grpc server whose first start() fails (its port already bound, its handlers
    added); start-up's clean-up may start it again to release it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._real = _GRPC_SERVER(*args, **kwargs)
        self._refused = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def start(self) -> None:
        if not self._refused:
            self._refused = True
            raise Refused
        self._real.start()


_GRPC_SERVER = server_module.grpc.server


@pytest.mark.parametrize("step", list(STEPS))
def test_a_failure_at_each_step_of_start_up_closes_everything_opened_before_it(
    step: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _taken_port() as taken:
        listen_port = taken if step == "the port" else _free_port()
        metrics_port = taken if step == "the metrics endpoint" else _free_port()
        settings = Settings(
            listen=f"127.0.0.1:{listen_port}",
            database_url=f"sqlite:///{tmp_path / 'k.db'}",
            metrics_port=metrics_port,
        )
        # One start and stop first: grpc's and SQLite's process-wide pieces (created once,
        # kept for the process) are then part of the baseline.
        warm_up = replace(settings, listen="127.0.0.1:0", metrics_port=0)
        start(warm_up, tracer_provider=TracerProvider()).stop(grace=0)
        baseline = _settle(_held())
        STEPS[step](monkeypatch)
        with pytest.raises((Refused, OSError)):
            start(settings, tracer_provider=TracerProvider())
        monkeypatch.undo()
        assert _settle(baseline) == baseline, f"a failure at {step} left threads or files open"
        assert storage_tracing._tracer is None, f"a failure at {step} left transactions traced"
        for port in {listen_port, metrics_port} - {taken}:
            assert _free(port), f"a failure at {step} left port {port} listening"
    # And nothing was broken for the next start.
    start(settings, tracer_provider=TracerProvider()).stop(grace=0)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_serve_on_a_port_already_in_use_says_so_and_exits_1(tmp_path: Path) -> None:
    """grpcio (newer releases) raises RuntimeError where it used to return port 0: either way
    an operator reads one line saying what is wrong, not a traceback."""
    with _taken_port() as taken:
        done = run_cli(
            "serve", "--listen", f"127.0.0.1:{taken}", "--database-url", f"sqlite:///{tmp_path / 'k.db'}"
        )
    assert done.returncode == 1, done
    assert f"cannot listen on 127.0.0.1:{taken}: address in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_two_servers_in_one_process_keep_to_their_own_databases(database_url: str, tmp_path: Path) -> None:
    """Each composition root holds its own database (no process-wide one): a server on SQLite
    and another on `database_url` in the same process each see only their own sessions."""
    from datetime import timedelta

    from kara_sessions_client.client import SessionsClient

    from ..support.clock import FakeClock

    clock = FakeClock()
    other_url = f"sqlite:///{tmp_path / 'other.db'}"
    first = start(Settings(listen="127.0.0.1:0", database_url=database_url), clock=clock)
    try:
        second = start(Settings(listen="127.0.0.1:0", database_url=other_url), clock=clock)
        try:
            with (
                SessionsClient(f"127.0.0.1:{first.port}") as a,
                SessionsClient(f"127.0.0.1:{second.port}") as b,
            ):
                a.grant_credits("client-a", 1)
                b.grant_credits("client-b", 2)
                booked = a.book("client-a", "pro-1", clock.now() + timedelta(days=2)).session_id
                assert [s.session_id for s in a.list_sessions("pro-1").sessions] == [booked]
                assert list(b.list_sessions("pro-1").sessions) == []
                assert b.get_credit_account("client-b").available == 2
                assert a.get_credit_account("client-a").held == 1
        finally:
            second.stop(grace=1)
    finally:
        first.stop(grace=1)
