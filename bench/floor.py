"""The stack's floor (issue 24): what a durable cancellation costs on this stack with none of our
code. A bare grpcio server, as many worker threads as ours on SQLite, whose CancelSession runs
the least SQL a durable cancellation needs through the stdlib sqlite3 driver (WAL,
synchronous=FULL, one writer at a time, as ours):

    BEGIN IMMEDIATE
    UPDATE sessions ... WHERE session_id = ? AND state = 'BOOKED' RETURNING ...   (guarded)
    UPDATE accounts ... WHERE client_id = ? AND held >= 1                          (guarded)
    INSERT a ledger entry
    INSERT one change record (the request_id, unique: audit, replay and feed in one)
    COMMIT

It answers the same CancelSessionRequest the load generator sends our server, and the health
service's Check, so `make bench` drives both with the same load in the same run and reports
CancelSession / floor. Bench-only: nothing in the product imports it.

`python -m bench.floor --port P --database PATH --sessions N --workers W` serves until SIGTERM;
the sessions it can cancel are floor-0 .. floor-(N-1)."""

from __future__ import annotations

import signal
import sqlite3
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import click
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kara.sessions.v1 import sessions_pb2 as pb
from kara.sessions.v1 import sessions_pb2_grpc

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
  session_id TEXT PRIMARY KEY, client_id TEXT NOT NULL, starts_at INTEGER NOT NULL,
  state TEXT NOT NULL, version INTEGER NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
  client_id TEXT PRIMARY KEY, available INTEGER NOT NULL CHECK (available >= 0),
  held INTEGER NOT NULL CHECK (held >= 0), used INTEGER NOT NULL CHECK (used >= 0),
  updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ledger (
  entry_id INTEGER PRIMARY KEY, client_id TEXT NOT NULL, kind TEXT NOT NULL, credits INTEGER NOT NULL,
  session_id TEXT NOT NULL, request_id TEXT NOT NULL, created_at INTEGER NOT NULL,
  UNIQUE (session_id, kind));
CREATE TABLE IF NOT EXISTS changes (
  position INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, subject TEXT NOT NULL,
  type TEXT NOT NULL, data TEXT NOT NULL, at INTEGER NOT NULL);
"""
_SETTLE = (
    "UPDATE sessions SET state = 'CANCELLED_PAID', version = version + 1, updated_at = ? "
    "WHERE session_id = ? AND state = 'BOOKED' RETURNING client_id, starts_at, version"
)
_TAKE = (
    "UPDATE accounts SET held = held - 1, used = used + 1, updated_at = ? WHERE client_id = ? AND held >= 1"
)
_ENTRY = (
    "INSERT INTO ledger (client_id, kind, credits, session_id, request_id, created_at) "
    "VALUES (?, 'TAKE', 1, ?, ?, ?)"
)
_CHANGE = "INSERT INTO changes (request_id, subject, type, data, at) VALUES (?, ?, ?, ?, ?)"
CLIENTS = 32


def connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("PRAGMA synchronous=full")
    return conn


def populate(path: str, sessions: int) -> None:
    conn = connect(path)
    conn.executescript(SCHEMA)
    now = time.time_ns() // 1000
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO accounts VALUES (?, 0, ?, 0, ?)",
        [(f"floor-client-{c}", sessions // CLIENTS + 1, now) for c in range(CLIENTS)],
    )
    conn.executemany(
        "INSERT INTO sessions VALUES (?, ?, ?, 'BOOKED', 1, ?)",
        [(f"floor-{i}", f"floor-client-{i % CLIENTS}", now + 3_600_000_000, now) for i in range(sessions)],
    )
    conn.execute("COMMIT")
    conn.close()


class FloorServicer(sessions_pb2_grpc.SessionServiceServicer):
    def __init__(self, path: str):
        self.path = path
        self.local = threading.local()
        # One writer at a time, queued in the process, as our SQLite storage does.
        self.write_lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = connect(self.path)
        return conn

    def CancelSession(self, request: pb.CancelSessionRequest, context: Any) -> pb.CancelSessionResponse:
        conn = self._conn()
        now = time.time_ns() // 1000
        with self.write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(_SETTLE, (now, request.session_id)).fetchone()
                if row is None:
                    conn.execute("ROLLBACK")
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not booked")
                client_id, starts_at, version = row
                if conn.execute(_TAKE, (now, client_id)).rowcount != 1:
                    raise RuntimeError("no credit held")
                conn.execute(_ENTRY, (client_id, request.session_id, request.request_id, now))
                data = f'{{"session_id":"{request.session_id}","state":"CANCELLED_PAID","version":{version}}}'
                conn.execute(
                    _CHANGE, (request.request_id, request.session_id, "session.cancelled", data, now)
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        session = pb.Session(
            session_id=request.session_id, client_id=client_id, state=pb.SESSION_STATE_CANCELLED_PAID
        )
        session.starts_at.FromMicroseconds(starts_at)
        payment = pb.Payment(
            session_id=request.session_id,
            client_id=client_id,
            state=pb.PAYMENT_STATE_PAID,
            section=pb.PAYMENT_SECTION_PAID,
            credits=1,
        )
        return pb.CancelSessionResponse(session=session, payment=payment)


@click.command()
@click.option("--port", type=int, required=True)
@click.option("--database", "path", required=True)
@click.option("--sessions", type=int, required=True)
@click.option("--workers", type=int, default=4, show_default=True)
def main(port: int, path: str, sessions: int, workers: int) -> None:
    populate(path, sessions)
    server = grpc.server(ThreadPoolExecutor(max_workers=workers))
    sessions_pb2_grpc.add_SessionServiceServicer_to_server(FloorServicer(path), server)  # type: ignore[no-untyped-call]
    checks = health.HealthServicer()
    checks.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1).wait()
    sys.exit(0)


if __name__ == "__main__":
    main()
