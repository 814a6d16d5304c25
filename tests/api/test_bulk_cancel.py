"""`kara-sessions bulk-cancel` and the client library's retries, against a real server."""

from __future__ import annotations

import csv
import io
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client import bulk
from kara_sessions_client.client import KaraError, RetryPolicy, SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start

from ..support.booking import book
from ..support.clock import FakeClock
from ..support.database import assert_ledger_balances, db_snapshot
from ..support.processes import free_port


def _cli(port: int, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kara_sessions_client.cli", "--target", f"127.0.0.1:{port}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _sessions(kara: SessionsClient, clock: FakeClock, n: int, starts_in: timedelta) -> list[str]:
    return [book(kara, clock, starts_in, client_id=f"client-{i}") for i in range(n)]


def _csv(rows: list[dict[str, str]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(
        out, fieldnames=["session_id", "cancelled_by", "charge_client", "notified_at", "reason"]
    )
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def test_malformed_rows_are_reported_by_line_and_not_sent() -> None:
    text = _csv(
        [
            {"session_id": "s-1", "cancelled_by": "client"},
            {"session_id": "", "cancelled_by": "client"},
            {"session_id": "s-3", "cancelled_by": "martian"},
            {"session_id": "s-4", "cancelled_by": "professional", "notified_at": "yesterday"},
            {"session_id": "s-5", "cancelled_by": "professional", "notified_at": "2026-06-01T10:00:00"},
            {"session_id": "s-6", "cancelled_by": "professional", "charge_client": "maybe"},
            {
                "session_id": "s-7",
                "cancelled_by": "PARTY_PROFESSIONAL",
                "charge_client": "yes",
                "notified_at": "2026-06-01T10:00:00Z",
            },
        ]
    )
    rows, bad = bulk.read_rows(io.StringIO(text), "auto")
    assert [(r.line, r.session_id, r.cancelled_by, r.charge_client) for r in rows] == [
        (2, "s-1", "client", False),
        (8, "s-7", "professional", True),
    ]
    assert [b.line for b in bad] == [3, 4, 5, 6, 7]
    assert "session_id" in bad[0].message and "martian" in bad[1].message
    assert "ISO-8601" in bad[2].message and "timezone" in bad[3].message and "maybe" in bad[4].message

    jsonl = (
        '{"session_id": "a", "cancelled_by": "client"}\nnot json\n\n[1]\n{"session_id": "b", "who": "x"}\n'
    )
    rows, bad = bulk.read_rows(io.StringIO(jsonl), "auto")
    assert [r.session_id for r in rows] == ["a"]
    assert [b.line for b in bad] == [2, 4, 5]


def test_request_ids_are_derived_from_the_row_or_taken_from_it() -> None:
    text = _csv([{"session_id": "s", "cancelled_by": "client", "reason": "ill"}] * 2)
    (first, second), _ = bulk.read_rows(io.StringIO(text), "csv")
    assert first.request_id == second.request_id and first.request_id.startswith("bulk-")
    other, _ = bulk.read_rows(io.StringIO(_csv([{"session_id": "s", "cancelled_by": "client"}])), "csv")
    assert other[0].request_id != first.request_id  # a different request gets a different id
    given, _ = bulk.read_rows(
        io.StringIO('{"session_id": "s", "cancelled_by": "client", "request_id": "mine"}'), "auto"
    )
    assert given[0].request_id == "mine"


def test_dry_run_previews_every_row_and_changes_nothing(
    kara: SessionsClient, server: RunningServer, clock: FakeClock, tmp_path: Path
) -> None:
    early, late = _sessions(kara, clock, 2, timedelta(days=3))
    clock.advance(timedelta(days=3) - timedelta(hours=2))
    kara.grant_credits("far", 1)
    far = kara.book("far", "pro-1", clock.now() + timedelta(days=5)).session_id
    text = _csv(
        [
            {"session_id": early, "cancelled_by": "client"},
            {"session_id": late, "cancelled_by": "professional", "charge_client": "true"},
            {"session_id": far, "cancelled_by": "professional", "charge_client": "true"},
            {"session_id": "", "cancelled_by": "client"},
        ]
    )
    before = db_snapshot(server)
    out = _cli(
        server.port, "bulk-cancel", "-", "--dry-run", "--results", str(tmp_path / "r.jsonl"), stdin=text
    )
    assert db_snapshot(server) == before
    assert out.returncode == 1, out.stderr
    assert "CHARGE_NOT_ALLOWED_WITH_NOTICE" in out.stdout
    assert "line 5: malformed" in out.stderr
    assert (
        "4 rows: 0 would be voided, 2 would be paid, 1 refused, 0 failed (transient), 1 malformed"
        in out.stdout
    )
    results = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["line"], r["status"], r["outcome"]) for r in results] == [
        (2, "OK", "PAID"),
        (3, "OK", "PAID"),
        (4, "FAILED_PRECONDITION", ""),
        (5, "MALFORMED", ""),
    ]


def test_strict_sends_nothing_when_a_row_is_malformed(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    (session_id,) = _sessions(kara, clock, 1, timedelta(days=3))
    text = _csv(
        [{"session_id": session_id, "cancelled_by": "client"}, {"session_id": "x", "cancelled_by": "?"}]
    )
    before = db_snapshot(server)
    out = _cli(server.port, "bulk-cancel", "-", "--strict", stdin=text)
    assert out.returncode == 1 and "nothing was sent" in out.stderr
    assert db_snapshot(server) == before


def test_real_run_writes_results_and_exits_non_zero_on_a_refusal(
    kara: SessionsClient, server: RunningServer, clock: FakeClock, tmp_path: Path
) -> None:
    ids = _sessions(kara, clock, 4, timedelta(days=3))
    clock.advance(timedelta(days=3) - timedelta(hours=5))
    rows = [
        {"session_id": ids[0], "cancelled_by": "client"},
        {
            "session_id": ids[1],
            "cancelled_by": "professional",
            "charge_client": "true",
            "reason": "emailed late",
        },
        {"session_id": ids[2], "cancelled_by": "professional"},
        {"session_id": ids[3], "cancelled_by": "client", "charge_client": "true"},
    ]
    path = tmp_path / "cancel.csv"
    path.write_text(_csv(rows))
    out = _cli(
        server.port, "bulk-cancel", str(path), "--concurrency", "3", "--results", str(tmp_path / "r.csv")
    )
    assert out.returncode == 1, out.stderr
    assert "4 rows: 1 voided, 2 paid, 1 refused" in out.stdout
    assert "credits returned 1, taken 2" in out.stdout
    with (tmp_path / "r.csv").open() as f:
        results = list(csv.DictReader(f))
    assert [(r["status"], r["reason"], r["outcome"]) for r in results] == [
        ("OK", "", "PAID"),
        ("OK", "", "PAID"),
        ("OK", "", "VOIDED"),
        ("INVALID_ARGUMENT", "CLIENT_CANNOT_CHARGE", ""),
    ]
    assert kara.get_session(ids[3]).state == pb.SESSION_STATE_BOOKED
    assert_ledger_balances(server)


def test_killed_half_way_then_run_again_completes_without_charging_twice(
    kara: SessionsClient, server: RunningServer, clock: FakeClock, tmp_path: Path
) -> None:
    ids = _sessions(kara, clock, 24, timedelta(hours=6))  # late: every cancellation takes the credit
    path = tmp_path / "ill.jsonl"
    path.write_text("".join(json.dumps({"session_id": s, "cancelled_by": "client"}) + "\n" for s in ids))
    cmd = [
        sys.executable,
        "-m",
        "kara_sessions_client.cli",
        "--target",
        f"127.0.0.1:{server.port}",
        "bulk-cancel",
        str(path),
        "--rate",
        "8",
        "--concurrency",
        "2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    done = 0
    while done < 6:
        line = proc.stdout.readline()
        assert line, f"client ended early: {proc.stderr.read() if proc.stderr else ''}"
        done += line.startswith("line ")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    first_run = sum(kara.get_session(s).state == pb.SESSION_STATE_CANCELLED_PAID for s in ids)
    assert 6 <= first_run < len(ids), "the kill should land half-way"

    again = _cli(server.port, "bulk-cancel", str(path), "--concurrency", "4")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{len(ids)} rows: 0 voided, {len(ids)} paid, 0 refused" in again.stdout
    for i, session_id in enumerate(ids):
        assert kara.get_session(session_id).state == pb.SESSION_STATE_CANCELLED_PAID
        account = kara.get_credit_account(f"client-{i}")
        assert (account.available, account.held, account.used) == (0, 0, 1)
        assert len(account.entries) == 3  # grant, hold, take: never taken twice
    assert_ledger_balances(server)


def test_client_retries_until_the_server_is_up(database_url: str, clock: FakeClock) -> None:
    port = free_port()
    result: dict[str, object] = {}

    def call() -> None:
        with SessionsClient(
            f"127.0.0.1:{port}", timeout=2, retry=RetryPolicy(attempts=8, max_backoff=0.5)
        ) as kara:
            result["account"] = kara.grant_credits("c", 2, request_id="once")

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.7)  # the first attempts find nobody listening
    running = start(Settings(listen=f"127.0.0.1:{port}", database_url=database_url), clock=clock)
    try:
        caller.join(timeout=30)
        assert getattr(result.get("account"), "available", None) == 2
    finally:
        running.stop(1)


def test_refusals_are_never_retried(kara: SessionsClient, clock: FakeClock) -> None:
    with pytest.raises(KaraError) as refused:
        kara.book("nobody", "p", clock.now() + timedelta(days=1))
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.attempts == 1
    nobody = SessionsClient(f"127.0.0.1:{free_port()}", timeout=0.5, retry=RetryPolicy(3, 0.01, 0.02))
    with nobody, pytest.raises(KaraError) as unreachable:
        nobody.get_session("s")
    assert unreachable.value.code == grpc.StatusCode.UNAVAILABLE
    assert unreachable.value.attempts == 3 and unreachable.value.transient


def _bulk_process(port: int, path: Path, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "kara_sessions_client.cli", "--target", f"127.0.0.1:{port}"]
    return subprocess.Popen(
        [*cmd, "bulk-cancel", str(path), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _read_lines(proc: subprocess.Popen[str], count: int) -> None:
    assert proc.stdout is not None
    done = 0
    while done < count:
        line = proc.stdout.readline()
        assert line, f"client ended early: {proc.stderr.read() if proc.stderr else ''}"
        done += line.startswith("line ")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_means_stop_and_the_results_say_what_happened(
    kara: SessionsClient, server: RunningServer, clock: FakeClock, tmp_path: Path, signum: int
) -> None:
    """Ctrl-C used to print "Aborted!" while the queued rows went on being cancelled (charged,
    here: every row is late) for seconds, and left no results file."""
    ids = _sessions(kara, clock, 40, timedelta(hours=6))
    path = tmp_path / "big.csv"
    path.write_text(_csv([{"session_id": s, "cancelled_by": "client"} for s in ids]))
    results = tmp_path / "big1.csv"
    proc = _bulk_process(server.port, path, "--rate", "5", "--results", str(results))
    _read_lines(proc, 4)
    proc.send_signal(signum)
    stopped_at = time.monotonic()
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - stopped_at < 3, "a stop lets only the calls in flight finish"
    assert proc.returncode == 128 + signum, out + err
    assert "stopping: no new rows" in err and "running the same file again" in err
    written = list(csv.DictReader(results.open()))
    assert [int(r["line"]) for r in written] == list(range(2, 42)), "every row has its outcome"
    statuses = [r["status"] for r in written]
    assert set(statuses) <= {"OK", "NOT_SENT", "UNKNOWN"}
    made = {s for s in ids if kara.get_session(s).state == pb.SESSION_STATE_CANCELLED_PAID}
    reported = {r["session_id"] for r in written if r["status"] == "OK"}
    assert made == reported, "nothing was cancelled that the results do not say"
    assert 4 <= len(made) < 12 and statuses.count("NOT_SENT") >= 28
    assert f"{statuses.count('NOT_SENT')} not sent" in out

    # A rerun settles the rest, and charges no row twice.
    again = _cli(server.port, "bulk-cancel", str(path), "--results", str(results))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "40 rows: 0 voided, 40 paid" in again.stdout
    rerun = list(csv.DictReader(results.open()))
    assert all(r["status"] == "OK" for r in rerun)
    assert {r["session_id"] for r in rerun if r["replayed"] == "True"} == made, "replays are named"
    assert f"({len(made)} done by an earlier run, replayed)" in again.stdout
    for i in range(40):
        account = kara.get_credit_account(f"client-{i}")
        assert (account.available, account.held, account.used) == (0, 0, 1)
    assert_ledger_balances(server)


# SQLite's whole-database lock holds every call in flight: one database is enough for this.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_second_ctrl_c_stops_at_once(
    kara: SessionsClient, server: RunningServer, clock: FakeClock, tmp_path: Path, database_url: str
) -> None:
    """With calls stuck in flight (another process holds the database's lock), the first
    Ctrl-C waits for them; a second one does not."""
    ids = _sessions(kara, clock, 8, timedelta(hours=6))
    path = tmp_path / "stuck.csv"
    path.write_text(_csv([{"session_id": s, "cancelled_by": "client"} for s in ids]))
    holder = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        proc = _bulk_process(server.port, path, "--concurrency", "2")
        time.sleep(1.5)  # both calls are in flight, waiting for the lock
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None, "the first Ctrl-C waits for the calls in flight"
        proc.send_signal(signal.SIGINT)
        stopped_at = time.monotonic()
        out, err = proc.communicate(timeout=10)
        assert time.monotonic() - stopped_at < 1.5
        assert proc.returncode == 130, out + err
        assert "stopped at once" in err
    finally:
        holder.rollback()
        holder.close()
