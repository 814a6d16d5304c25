"""`serve --cpus`: every thread of a server process stays on the CPUs it was given, those the
server starts while serving included; with --processes N, each process has one of them."""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kara_sessions_client.client import SessionsClient

from ..support.database import reset_postgres
from ..support.processes import start_server_process, start_two_processes

ALLOWED = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
pytestmark = pytest.mark.skipif(not ALLOWED, reason="--cpus needs Linux's sched_setaffinity")


def _threads_cpus(pid: int) -> dict[int, str]:
    """Each thread of `pid` -> the CPUs it may run on, as /proc lists them."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                found[int(task.name)] = line.split(":", 1)[1].strip()
    return found


def _work(target: str) -> None:
    """Calls that make the server start its worker threads and its database connections."""
    with SessionsClient(target, timeout=10) as kara:
        kara.grant_credits("client-cpus", 4)
        for _ in range(4):
            session = kara.book("client-cpus", "pro-cpus", datetime.now(UTC) + timedelta(days=2))
            kara.cancel(session.session_id, "client")


def test_every_thread_of_the_server_stays_on_its_cpu(tmp_path: Path) -> None:
    cpu = ALLOWED[-1]
    proc, port = start_server_process(f"sqlite:///{tmp_path / 'k.db'}", "--cpus", str(cpu))
    try:
        _work(f"127.0.0.1:{port}")
        threads = _threads_cpus(proc.pid)
        assert len(threads) > 5, "the worker threads have started"
        assert set(threads.values()) == {str(cpu)}, threads
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.postgres
@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs two CPUs this process may run on")
def test_each_process_keeps_to_its_own_cpu(postgres_database: str, tmp_path: Path) -> None:
    reset_postgres(postgres_database)
    first, second = ALLOWED[:2]
    proc, port, _, children = start_two_processes(postgres_database, tmp_path, "--cpus", f"{first},{second}")
    try:
        deadline = time.monotonic() + 10
        for _ in range(4):  # new connections spread over the two processes
            _work(f"127.0.0.1:{port}")
        while time.monotonic() < deadline and any(len(_threads_cpus(c)) < 5 for c in children):
            _work(f"127.0.0.1:{port}")
        pinned = [set(_threads_cpus(child).values()) for child in children]
        assert sorted(pinned, key=sorted) == [{str(first)}, {str(second)}], pinned
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
