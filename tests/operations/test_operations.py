"""What operators and generic gRPC tools rely on: health, reflection, graceful shutdown, the
CLI's exit codes, and no traceback ever reaching a caller."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import KaraError, SessionsClient
from kara_sessions_server.entrypoints.grpc.server import EXIT_FORCED_SHUTDOWN, RunningServer, Settings, start

from ..support.booking import book
from ..support.clock import FakeClock
from ..support.processes import run_cli, start_server_process


def test_health_reports_every_service(server: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "kara.sessions.v1.SessionService", "kara.sessions.v1.CreditService"):
            assert (
                stub.Check(health_pb2.HealthCheckRequest(service=name)).status
                == health_pb2.HealthCheckResponse.SERVING
            )


def test_reflection_lists_the_services(server: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for s in next(responses).list_services_response.service}
    assert {
        "kara.sessions.v1.SessionService",
        "kara.sessions.v1.CreditService",
        "grpc.health.v1.Health",
    } <= names


def test_a_missing_table_is_a_schema_mismatch_without_traceback(
    server: RunningServer, kara: SessionsClient, clock: FakeClock, database_url: str
) -> None:
    session_id = book(kara, clock, timedelta(days=2))
    # Pull the tables out from under the running server.
    with server.storage.db.connection_context():
        server.storage.db.execute_sql("DROP TABLE events")
    with pytest.raises(KaraError) as failed:
        kara.cancel(session_id, "client")
    # A permanent fault (issue 14): the operator's reason, and the client does not retry it.
    assert (failed.value.code, failed.value.reason) == (grpc.StatusCode.INTERNAL, "SCHEMA_MISMATCH")
    assert failed.value.attempts == 1
    assert "incident" in failed.value.metadata
    assert "Traceback" not in failed.value.message and "peewee" not in failed.value.message
    assert kara.get_session(session_id).state == pb.SESSION_STATE_BOOKED  # the transaction rolled back
    errors = [
        sample.value
        for family in server.metrics.registry.collect()
        if family.name == "kara_database_errors"
        for sample in family.samples
        if sample.name == "kara_database_errors_total"
    ]
    assert sum(errors) == failed.value.attempts == 1


def test_sigterm_drains_and_exits_cleanly(tmp_path: Path) -> None:
    proc, port = start_server_process(f"sqlite:///{tmp_path / 'k.db'}")
    with SessionsClient(f"127.0.0.1:{port}") as kara:
        kara.grant_credits("c", 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert b"Traceback" not in proc.stderr.read()  # type: ignore[union-attr]


def test_sigterm_delivered_to_any_thread_of_the_server_stops_it(tmp_path: Path) -> None:
    """The kernel hands a process's signal to whichever of its threads it likes. Python runs the
    handler on the main thread, which must wake for it: it waited, untimed, on an event no other
    thread sets, so a SIGTERM that landed on a worker or the settler went unhandled and the
    server never stopped (test_config saw it under load). Here one of its other threads gets
    it, as the kernel may choose."""
    import ctypes
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    proc, _ = start_server_process(f"sqlite:///{tmp_path / 'k.db'}")
    try:
        threads = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid]
        assert threads, "the server runs threads besides its main one"
        # tgkill: a signal to one thread of the process, as process-wide delivery may pick it.
        assert libc.syscall(234, proc.pid, threads[-1], signal.SIGTERM) == 0, ctypes.get_errno()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_shutdown_forced_past_the_grace_period_exits_non_zero() -> None:
    """What serve does when a call's thread is still in the database after the grace period: the
    supervisor (Kubernetes, systemd, podman) is told that the stop was not clean."""
    forced = subprocess.run(
        [
            sys.executable,
            "-c",
            "from kara_sessions_server.entrypoints.grpc import server\n"
            'server._exit_now("a call\'s thread is still in the database after the grace period")',
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert forced.returncode == EXIT_FORCED_SHUTDOWN != 0
    assert "exiting regardless (exit code 3)" in forced.stderr


def test_cli_round_trip_and_exit_codes(tmp_path: Path) -> None:
    proc, port = start_server_process(f"sqlite:///{tmp_path / 'k.db'}")
    target = ["--target", f"127.0.0.1:{port}"]
    try:
        granted = run_cli(*target, "--json", "credits", "grant", "client-9", "1")
        assert granted.returncode == 0, granted.stderr
        assert json.loads(granted.stdout)["available"] == 1
        booked = run_cli(
            *target, "--json", "book", "--client", "client-9", "--professional", "p", "--starts-at", "+3d"
        )
        session_id = json.loads(booked.stdout)["session_id"]
        preview = run_cli(*target, "--json", "preview", session_id, "--by", "client")
        assert json.loads(preview.stdout)["payment_state"] == "PAYMENT_STATE_VOIDED"
        refused = run_cli(*target, "cancel", session_id, "--by", "professional", "--charge-client")
        assert refused.returncode == 1
        assert "CHARGE_NOT_ALLOWED_WITH_NOTICE" in refused.stderr and "Traceback" not in refused.stderr
        cancelled = run_cli(*target, "--json", "cancel", session_id, "--by", "client", "--reason", "ill")
        assert json.loads(cancelled.stdout)["payment"]["state"] == "PAYMENT_STATE_VOIDED"
        shown = run_cli(*target, "session", session_id)
        assert "SESSION_STATE_CANCELLED_VOIDED" in shown.stdout
        listed = run_cli(*target, "--json", "payments", "--professional", "p", "--section", "unpaid")
        assert [p["session_id"] for p in json.loads(listed.stdout)["payments"]] == [session_id]
        account = run_cli(*target, "--json", "credits", "show", "client-9")
        assert json.loads(account.stdout)["available"] == 1
        bad_time = run_cli(*target, "book", "--client", "c", "--professional", "p", "--starts-at", "tomorrow")
        assert bad_time.returncode == 2 and "ISO-8601" in bad_time.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    start = time.monotonic()
    unreachable = run_cli("--target", f"127.0.0.1:{port}", "--timeout", "1", "session", "x")
    assert unreachable.returncode == 3 and "UNAVAILABLE" in unreachable.stderr
    assert time.monotonic() - start < 30


def test_demo_plays_the_scenarios_and_invoices_the_paid_ones() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kara_sessions_client.cli", "demo"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    article = out.stdout.split("And refused", 1)[0]
    assert article.count("SESSION_STATE_CANCELLED_VOIDED") == 3
    assert article.count("SESSION_STATE_CANCELLED_PAID") == 2
    assert "CHARGE_NOT_ALLOWED_WITH_NOTICE" in out.stdout
    assert "under programme demo-48h-" in out.stdout
    # The throwaway server has no tokens: the demo calls as a service, and must not claim
    # a professional waived (issue 23).
    assert "The professional waives" not in out.stdout
    waiver = out.stdout.split("7. The charge is waived afterwards", 1)[1]
    assert "waived by service:unauthenticated" in waiver
    assert "PAYMENT_STATE_VOIDED in section PAYMENT_SECTION_UNPAID, waived by" in waiver
    assert "credits after: available 1, held 0, used 0" in waiver
    # A sponsor forgives the first late cancellation, and charges the second (issue 36).
    kind = out.stdout.split("8. Client cancels late twice", 1)[1].split("9. ", 1)[0]
    assert "first: 1 of 1 free late cancellation(s) left -> SESSION_STATE_CANCELLED_VOIDED" in kind
    assert "(forgiven: credit returned)" in kind
    assert "second: 0 of 1 free late cancellation(s) left -> SESSION_STATE_CANCELLED_PAID" in kind
    assert "credits after: available 1, held 0, used 1" in kind
    # A session nobody marked, settled by the server on the demo's clock (issue 36).
    unmarked = out.stdout.split("9. Nobody marks a session", 1)[1].split("Invoice ", 1)[0]
    assert (
        "50 h later: SESSION_STATE_COMPLETED (settled automatically), payment PAYMENT_STATE_PAID" in unmarked
    )
    assert "credits after: available 0, held 0, used 1" in unmarked
    invoice = out.stdout.split("Invoice ", 1)[1]
    assert invoice.count("client's late cancellation: 1 credit") == 2
    assert "charged late cancellation: 1 credit" in invoice
    assert "-unmarked  completed: 1 credit" in invoice
    assert "total: 4 credits" in invoice


def test_a_new_database_is_not_said_to_answer_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kara_sessions_server")
    running = start(Settings(listen="127.0.0.1:0", database_url=f"sqlite:///{tmp_path / 'new.db'}"))
    running.stop(grace=1)
    health = [r.getMessage() for r in caplog.records if "health SERVING" in r.getMessage()]
    assert health == ["the database answers: health SERVING"]
