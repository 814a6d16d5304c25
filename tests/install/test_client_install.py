"""The light client install, as another service or an operator gets it: the project's wheel
installed into a fresh virtualenv without the `[server]` extra. Its CLI drives a real server
(book, cancel, bulk-cancel), nothing of the server's dependencies is there, and `serve` says in
one line how to install the server.

It builds a wheel and a virtualenv (about a minute), so `make test` leaves it out (the
`client_install` marker); `make test-client-install` runs it, and CI runs both."""

from __future__ import annotations

import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support.processes import start_server_process

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = ("peewee", "psycopg", "transitions", "prometheus_client", "grpc_health", "opentelemetry")

pytestmark = [pytest.mark.client_install, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding `pip install kara-sessions` (the wheel built from this checkout)."""
    where = tmp_path_factory.mktemp("client-install")
    wheel_dir = where / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--wheel-dir",
            str(wheel_dir),
            str(ROOT),
        ],
        check=True,
        timeout=600,
    )
    (wheel,) = wheel_dir.glob("kara_sessions-*.whl")
    venv.create(where / "venv", with_pip=True)
    python = where / "venv" / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", str(wheel)], check=True, timeout=600)
    return where / "venv" / "bin"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server from the full install (this test run's environment)."""
    db = tmp_path_factory.mktemp("server") / "kara.db"
    proc, port = start_server_process(f"sqlite:///{db}")
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def _kara(bin_dir: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [bin_dir / "kara-sessions", *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120, check=False)


def test_the_client_install_has_nothing_of_the_server(client_venv: Path) -> None:
    for module in SERVER_ONLY:
        found = subprocess.run(
            [client_venv / "python", "-c", f"import {module}"], capture_output=True, text=True, check=False
        )
        assert found.returncode != 0, f"{module} came with the client install"
        assert "ModuleNotFoundError" in found.stderr
    library = subprocess.run(
        [client_venv / "python", "-c", "from kara_sessions_client.client import SessionsClient; print('ok')"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert library.stdout.strip() == "ok", library.stderr


def test_the_client_cli_books_cancels_and_bulk_cancels(client_venv: Path, target: str) -> None:
    granted = _kara(client_venv, "--target", target, "credits", "grant", "client-1", "3")
    assert granted.returncode == 0, granted.stderr
    ids = []
    for _ in range(3):
        booked = _kara(
            client_venv, "--target", target, "--json", "book",
            "--client", "client-1", "--professional", "pro-1", "--starts-at", "+3d",
        )  # fmt: skip
        assert booked.returncode == 0, booked.stderr
        ids.append(next(line for line in booked.stdout.splitlines() if '"session_id"' in line).split('"')[3])
    cancelled = _kara(client_venv, "--target", target, "cancel", ids[0], "--by", "client")
    assert cancelled.returncode == 0, cancelled.stderr
    assert "PAYMENT_STATE_VOIDED" in cancelled.stdout
    rows = "session_id,cancelled_by\n" + "".join(f"{i},client\n" for i in ids[1:])
    bulk = _kara(client_venv, "--target", target, "bulk-cancel", "-", stdin=rows)
    assert bulk.returncode == 0, bulk.stdout + bulk.stderr
    account = _kara(client_venv, "--target", target, "--json", "credits", "show", "client-1")
    assert '"available": 3' in account.stdout, account.stdout


def test_serve_says_how_to_install_the_server(client_venv: Path) -> None:
    done = _kara(client_venv, "serve")
    assert done.returncode == 1
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert 'pip install "kara-sessions[server]"' in message
