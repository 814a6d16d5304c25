"""Servers in their own processes, started the way an operator starts one: `kara-sessions serve`.
The tests and the benchmark (bench/) both start their servers through these."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def binary(candidates: Sequence[Path], name: str, missing: str) -> str:
    """The first of `candidates` that exists, else `name` on PATH; else the test fails on CI
    (`missing` says why and what installs it) and skips elsewhere."""
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    import pytest  # only here: the benchmark imports this module without pytest's fixtures

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true requires this test: {missing}")
    pytest.skip(missing)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(port: int, proc: subprocess.Popen[bytes], deadline: float = 30) -> None:
    end = time.monotonic() + deadline
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            if proc.poll() is not None:
                said = proc.stderr.read() if proc.stderr is not None else b"(see its log)"
                raise RuntimeError(f"server exited with {proc.returncode}: {said!r}")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise TimeoutError(f"server on {port} did not become SERVING")


def server_children(pid: int) -> list[int]:
    """The server processes `serve --processes N` (pid) started (not multiprocessing's helpers)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            stat = (cmdline.parent / "stat").read_text()
            if int(stat.rpartition(")")[2].split()[1]) == pid and b"spawn_main" in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kara_sessions_client.cli", "serve", *args]


def start_server_process(
    database_url: str,
    *extra: str,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    log_level: str = "WARNING",
) -> tuple[subprocess.Popen[bytes], int]:
    """A `kara-sessions serve` process, SERVING on 127.0.0.1:port when this returns."""
    port = port or free_port()
    args: Sequence[str] = (
        "--listen",
        f"127.0.0.1:{port}",
        "--database-url",
        database_url,
        "--log-level",
        log_level,
        "--grace-seconds",
        "5",
        *extra,
    )
    proc = subprocess.Popen(
        serve_command(*args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        wait_serving(port, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, port


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`kara-sessions ARGS...` to the end, as a person would run it; its output and exit code."""
    return subprocess.run(
        [sys.executable, "-m", "kara_sessions_client.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def json_log_lines(log: Path) -> list[dict[str, object]]:
    """The JSON lines of a server's log (its other lines are skipped)."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def start_two_processes(
    url: str, tmp_path: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], int, Path, list[int]]:
    """`serve --processes 2` on `url`, once both children listen: the parent, the port, the
    JSON log and the children's pids."""
    port, log = free_port(), tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            serve_command(
                "--listen", f"127.0.0.1:{port}", "--database-url", url, "--log-format", "json",
                "--processes", "2", "--grace-seconds", "2", *extra,
            ),
            stdout=subprocess.DEVNULL,
            stderr=out,
        )  # fmt: skip
    wait_serving(port, proc)
    deadline = time.monotonic() + 30
    while len(children := server_children(proc.pid)) < 2:
        assert time.monotonic() < deadline, f"two server processes did not start: {log.read_text()}"
        time.sleep(0.1)
    while sum("kara-sessions listening on" in str(line["message"]) for line in json_log_lines(log)) < 2:
        assert time.monotonic() < deadline, f"both server processes did not listen: {log.read_text()}"
        time.sleep(0.1)
    return proc, port, log, children
