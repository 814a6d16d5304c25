"""The container image, built and run as a platform would (issue 38): `make test-image`.

These machines reach no image registry, so the base is made from Debian's packages
(mmdebstrap, then `podman import`) and handed to `make image` as BASE. podman runs with runc
(tests/image/containers.conf, which the Makefile exports as CONTAINERS_CONF) and the host's
network."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import SessionsClient

from ..support.database import ON_CI
from ..support.processes import free_port

# Building the base and the image on a fresh machine takes a few minutes.
pytestmark = [pytest.mark.image, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
BASE = "localhost/kara-base:bookworm"
IMAGE = "localhost/kara-sessions:test"
ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "tests" / "image" / "containers.conf")}
DATABASE = "sqlite:////var/lib/kara-sessions/kara.db"
# The image's --grace-seconds default (10), and a second to exit after it.
GRACE_SECONDS = 11


def _podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["podman", *args], capture_output=True, text=True, env=ENV, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {done.stderr}")
    return done


@pytest.fixture(scope="module")
def image() -> str:
    missing = [tool for tool in ("podman", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        message = f"{', '.join(missing)} not installed (make test-image installs them as root)"
        if ON_CI:
            pytest.fail(f"CI=true requires the image test: {message}")
        pytest.skip(message)
    if _podman("image", "exists", BASE, check=False).returncode != 0:
        with tempfile.TemporaryDirectory() as scratch:
            tarball = Path(scratch) / "base.tar"
            packages = "python3,python3-venv,ca-certificates"
            subprocess.run(
                ["mmdebstrap", "--quiet", "--variant=apt", f"--include={packages}", "bookworm", str(tarball)],
                check=True,
                timeout=600,
            )
            _podman("import", str(tarball), BASE, timeout=300)
    # The build command is the Makefile's (`make image`), the one its users run.
    subprocess.run(
        ["make", "--no-print-directory", "image", f"BASE={BASE}", f"IMAGE={IMAGE}"],
        cwd=ROOT,
        env=ENV,
        check=True,
        timeout=900,
    )
    return IMAGE


@pytest.fixture
def volume() -> Iterator[str]:
    name = f"kara-test-{uuid.uuid4().hex[:8]}"
    _podman("volume", "create", name)
    try:
        yield name
    finally:
        _podman("volume", "rm", "--force", name, check=False)


def _serving(port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "the container's server never reported SERVING"
            time.sleep(0.5)


def test_the_image_refuses_to_serve_the_network_without_tls_and_tokens(image: str) -> None:
    """Its default command listens on 0.0.0.0 with the production checks on."""
    done = _podman("run", "--rm", "--network", "host", image, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "refusing to listen on 0.0.0.0:50051 without TLS" in done.stderr
    version = _podman("run", "--rm", "--network", "host", image, "--version")
    assert version.stdout.startswith("kara-sessions ")


def test_the_image_serves_stops_on_sigterm_as_non_root_and_keeps_its_database(
    image: str, volume: str
) -> None:
    port = free_port()
    name = f"kara-{uuid.uuid4().hex[:8]}"
    serve = ["serve", "--listen", f"127.0.0.1:{port}", "--database-url", DATABASE]
    _podman(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "-v",
        f"{volume}:/var/lib/kara-sessions",
        image,
        *serve,
    )
    try:
        _serving(port)
        assert _podman("exec", name, "id", "-u").stdout.strip() == "10001", "the server runs as non-root"
        with SessionsClient(f"127.0.0.1:{port}") as kara:
            kara.grant_credits("client-1", 1)
            session_id = kara.book("client-1", "pro-1", datetime.now(UTC) + timedelta(days=3)).session_id
            assert kara.cancel(session_id, "client").session.state == pb.SESSION_STATE_CANCELLED_VOIDED

        stopped = time.monotonic()
        _podman("kill", "--signal", "TERM", name)
        code = _podman("wait", name, timeout=GRACE_SECONDS + 30).stdout.strip()
        assert code == "0", f"exit code {code} on SIGTERM: {_podman('logs', name).stderr[-2000:]}"
        assert time.monotonic() - stopped < GRACE_SECONDS

        # The same container again, on the same volume: the database is still there.
        _podman("start", name)
        _serving(port)
        with SessionsClient(f"127.0.0.1:{port}") as kara:
            assert kara.get_session(session_id).state == pb.SESSION_STATE_CANCELLED_VOIDED
            assert kara.get_credit_account("client-1").available == 1
    finally:
        _podman("rm", "--force", "--time", "2", name, check=False)
