"""`kara-sessions serve --processes N`: N processes share one port on PostgreSQL, each answers
calls, each has its own metrics port and its own pid in the log, SIGTERM stops them all, and a
child that dies takes the server down with it (for the supervisor to restart). SQLite refuses."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from kara_sessions_client.client import SessionsClient
from kara_sessions_server.entrypoints.grpc.server import EXIT_FORCED_SHUTDOWN

from ..support.database import reset_postgres
from ..support.processes import json_log_lines, serve_command, start_two_processes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead but not yet reaped by its parent.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rpartition(")")[2].split()[0] != "Z"


def _two_free_ports() -> int:
    """A port P with P + 1 free as well: the children's metrics ports. Chosen below the
    kernel's ephemeral range: from inside it, the first child's own connection to PostgreSQL
    could take P + 1 before the second child binds it (it did, once, in CI)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10_000, low - 1)
        try:
            with socket.socket() as first, socket.socket() as second:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("found no two consecutive free ports")


@pytest.mark.postgres
def test_two_processes_share_the_port_and_stop_together(postgres_database: str, tmp_path: Path) -> None:
    reset_postgres(postgres_database)
    metrics = _two_free_ports()
    proc, port, log, children = start_two_processes(
        postgres_database, tmp_path, "--metrics-port", str(metrics)
    )
    try:
        for n in range(20):  # a new connection per call, so the kernel spreads them
            with SessionsClient(f"127.0.0.1:{port}") as kara:
                kara.grant_credits(f"client-{n}", 1)
        for port_of_child in (metrics, metrics + 1):
            with urllib.request.urlopen(f"http://127.0.0.1:{port_of_child}/metrics", timeout=5) as page:
                assert 'kara_rpc_requests_total{code="OK",method="GrantCredits"}' in page.read().decode()
        with SessionsClient(f"127.0.0.1:{port}") as kara:
            assert sum(kara.get_credit_account(f"client-{n}").available for n in range(20)) == 20
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert not any(_alive(child) for child in children)
    lines = json_log_lines(log)
    served_by = {line["pid"] for line in lines if line.get("method") == "GrantCredits"}
    assert served_by == set(children), "both processes answered calls, and each line says which"
    assert all("pid" in line for line in lines), "every line names its process, the parent's too"


@pytest.mark.postgres
def test_a_dead_child_stops_the_server_for_its_supervisor(postgres_database: str, tmp_path: Path) -> None:
    reset_postgres(postgres_database)
    proc, _, log, children = start_two_processes(postgres_database, tmp_path)
    os.kill(children[0], signal.SIGKILL)
    assert proc.wait(timeout=30) == 1
    assert not _alive(children[1])
    assert any("exited with -9; stopping the others" in str(line["message"]) for line in json_log_lines(log))


@pytest.mark.postgres
def test_a_child_that_will_not_stop_is_killed_and_the_stop_reported_as_forced(
    postgres_database: str, tmp_path: Path
) -> None:
    reset_postgres(postgres_database)
    proc, _, log, children = start_two_processes(postgres_database, tmp_path, "--grace-seconds", "1")
    os.kill(children[0], signal.SIGSTOP)  # deaf to SIGTERM, as a child stuck for good would be
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == EXIT_FORCED_SHUTDOWN
    assert not any(_alive(child) for child in children)
    assert any("did not stop; killing it" in str(line["message"]) for line in json_log_lines(log))


@pytest.mark.postgres
def test_children_stop_when_the_parent_is_killed(postgres_database: str, tmp_path: Path) -> None:
    reset_postgres(postgres_database)
    proc, _, _, children = start_two_processes(postgres_database, tmp_path)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while any(_alive(child) for child in children):
        assert time.monotonic() < deadline, "a server process outlived its parent"
        time.sleep(0.1)


def test_sqlite_refuses_more_than_one_process(tmp_path: Path) -> None:
    done = subprocess.run(
        serve_command("--database-url", f"sqlite:///{tmp_path / 'kara.db'}", "--processes", "2"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--processes 2 needs PostgreSQL" in done.stderr
    assert not (tmp_path / "kara.db").exists(), "a refused start changes nothing"
