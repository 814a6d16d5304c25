"""The event feed across real processes: a server killed mid-burst, a consumer killed and
restarted from its stored cursor, a stream fed by another server process, a stream open while
the server drains, and the feed's metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import psycopg
import pytest
from kara.sessions.v1 import events_pb2 as epb
from kara.sessions.v1 import events_pb2_grpc

from kara_sessions_client.client import KaraError, RetryPolicy, SessionsClient

from ..api.test_events import T, assert_feed_matches_tables
from ..support.database import reset_postgres
from ..support.processes import start_server_process


def _tables(database_url: str) -> dict[str, list[dict[str, object]]]:
    """audit_log and ledger_entries, read straight from the database."""
    query = {
        "audit_log": "SELECT action, session_id FROM audit_log",
        "ledger_entries": "SELECT kind, client_id FROM ledger_entries",
    }
    if database_url.startswith("sqlite:///"):
        import sqlite3

        db = sqlite3.connect(database_url.removeprefix("sqlite:///"))
        db.row_factory = sqlite3.Row
        try:
            return {t: [dict(r) for r in db.execute(q)] for t, q in query.items()}
        finally:
            db.close()
    with psycopg.connect(database_url) as conn:
        out = {}
        for table, q in query.items():
            cur = conn.execute(q)
            names = [c.name for c in cur.description or ()]
            out[table] = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        return out


def _burst(target: str, stop: threading.Event, worker: int) -> None:
    """Grants, books and cancels until the server dies under it."""
    with SessionsClient(target, timeout=2, retry=RetryPolicy(attempts=1)) as kara:
        n = 0
        while not stop.is_set():
            client = f"burst-{worker}-{n}"
            try:
                kara.grant_credits(client, 1)
                session = kara.book(client, "pro-1", datetime.now(UTC) + timedelta(hours=3 + n % 40))
                kara.cancel(session.session_id, "client")
            except KaraError:
                return
            n += 1


def test_a_server_killed_mid_burst_loses_no_event_and_invents_none(database_url: str, tmp_path: Path) -> None:
    proc, port = start_server_process(database_url)
    stop = threading.Event()
    workers = [threading.Thread(target=_burst, args=(f"127.0.0.1:{port}", stop, w)) for w in range(6)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    proc.kill()  # SIGKILL: no drain, transactions cut wherever they were
    proc.wait(timeout=10)
    stop.set()
    for w in workers:
        w.join(timeout=10)

    proc, port = start_server_process(database_url)
    try:
        with SessionsClient(f"127.0.0.1:{port}") as kara:
            tables = _tables(database_url)
            assert len(tables["audit_log"]) > 20, "the burst did not get going"
            assert_feed_matches_tables(kara, tables)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def _consumer(target: str, out: Path, after: str = "") -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "kara_sessions_client.cli", "--target", target, "events", "--follow"]
    if after:
        args += ["--after", after]
    return subprocess.Popen(args, stdout=out.open("wb"), stderr=subprocess.PIPE)


def _lines(path: Path) -> list[dict[str, object]]:
    """The complete lines a consumer wrote (a line cut by a kill is not handled, so not stored)."""
    text = path.read_text()
    complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines()]


def _wait_lines(path: Path, at_least: int, seconds: float = 15) -> list[dict[str, object]]:
    deadline = time.monotonic() + seconds
    while len(lines := _lines(path)) < at_least:
        assert time.monotonic() < deadline, f"only {len(lines)} events arrived"
        time.sleep(0.05)
    return lines


def test_a_consumer_killed_and_restarted_from_its_cursor_gets_each_event_once_in_order(
    tmp_path: Path,
) -> None:
    proc, port = start_server_process(f"sqlite:///{tmp_path / 'k.db'}")
    target = f"127.0.0.1:{port}"
    first_out, second_out = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    try:
        with SessionsClient(target) as kara:
            for n in range(5):
                kara.grant_credits(f"before-{n}", 1)
            consumer = _consumer(target, first_out)
            _wait_lines(first_out, 5)
            for n in range(5):
                kara.grant_credits(f"during-{n}", 1)
            handled = _wait_lines(first_out, 10)
            consumer.kill()
            consumer.wait(timeout=10)
            for n in range(5):
                kara.grant_credits(f"while-down-{n}", 1)
            stored_cursor = str(handled[-1]["karacursor"])
            consumer = _consumer(target, second_out, after=stored_cursor)
            for n in range(5):
                kara.grant_credits(f"after-{n}", 1)
            resumed = _wait_lines(second_out, 10)
            consumer.terminate()
            consumer.wait(timeout=10)
            everything = kara.list_events()
        got = [line["id"] for line in handled + resumed]
        assert got == [e.event_id for e in everything]
        assert [line["subject"] for line in resumed][:5] == [f"while-down-{n}" for n in range(5)]
        assert all(line["specversion"] == "1.0" and line["type"] == T + "credits.granted" for line in resumed)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.postgres
def test_a_stream_sees_commits_made_through_another_server(postgres_database: str) -> None:
    reset_postgres(postgres_database)
    first, port_a = start_server_process(postgres_database)
    second, port_b = start_server_process(postgres_database)
    try:
        with SessionsClient(f"127.0.0.1:{port_a}") as a, SessionsClient(f"127.0.0.1:{port_b}") as b:
            received: list[tuple[float, epb.Event]] = []

            def follow() -> None:
                try:
                    for event in a.events(follow=True):
                        received.append((time.monotonic(), event))
                except Exception:
                    pass

            threading.Thread(target=follow, daemon=True).start()
            time.sleep(0.3)
            delays = []
            for n in range(5):
                sent = time.monotonic()
                b.grant_credits(f"via-b-{n}", 1)
                deadline = sent + 5
                while len(received) <= n:
                    assert time.monotonic() < deadline, "the commit through server B never arrived"
                    time.sleep(0.01)
                delays.append(received[n][0] - sent)
            assert [e.subject for _, e in received] == [f"via-b-{n}" for n in range(5)]
            assert max(delays) < 1.5, delays
    finally:
        for proc in (first, second):
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def test_an_open_stream_ends_cleanly_when_the_server_drains_on_sigterm(tmp_path: Path) -> None:
    proc, port = start_server_process(f"sqlite:///{tmp_path / 'k.db'}")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = events_pb2_grpc.EventServiceStub(channel).StreamEvents(epb.StreamEventsRequest())
        with SessionsClient(f"127.0.0.1:{port}") as kara:
            kara.grant_credits("client-1", 1)
        assert next(stream).subject == "client-1"
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert list(stream) == []
        assert stream.code() == grpc.StatusCode.OK
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - stopped < 4, "the open stream held the drain (grace is 5 s)"
    assert b"Traceback" not in proc.stderr.read()  # type: ignore[union-attr]


def test_the_feed_has_metrics(tmp_path: Path) -> None:
    from ..support.processes import free_port

    metrics_port = free_port()
    proc, port = start_server_process(f"sqlite:///{tmp_path / 'k.db'}", "--metrics-port", str(metrics_port))
    try:
        with SessionsClient(f"127.0.0.1:{port}") as kara, SessionsClient(f"127.0.0.1:{port}") as listener:
            events = listener.events(follow=True)
            kara.grant_credits("client-1", 2)
            assert next(events).subject == "client-1"
            kara.book("client-1", "pro-1", datetime.now(UTC) + timedelta(days=2))
            assert next(events).type == T + "session.booked"
            scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
            text = scrape.read().decode()
            assert f'kara_events_appended_total{{type="{T}credits.granted"}} 1.0' in text
            assert f'kara_events_appended_total{{type="{T}session.booked"}} 1.0' in text
            assert "kara_event_streams_open 1.0" in text
            assert "kara_event_stream_lag_seconds_count 2.0" in text
            events.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
