"""The floors (issues 24 and 35): what a durable cancellation, and a read of its payment, cost
on this stack with none of our code. A grpcio server with as many worker threads as ours on
SQLite (WAL, synchronous=FULL, one writer at a time, as ours).

The bare floor (issue 24) runs the least SQL a durable cancellation needs through the stdlib
sqlite3 driver:

    BEGIN IMMEDIATE
    UPDATE sessions ... WHERE session_id = ? AND state = 'BOOKED' RETURNING ...   (guarded)
    UPDATE accounts ... WHERE client_id = ? AND held >= 1                          (guarded)
    INSERT a ledger entry
    INSERT one change record (the request_id, unique: audit, replay and feed in one)
    COMMIT

The stack's floor (`--stack`, issue 35) adds what the design card requires of ours and nothing
else: the statements go through peewee; the session is read first and its new state decided by
one `transitions` event whose guards are the notice and the charge box (so the UPDATE is
guarded on the state and version read); and each call writes one JSON access line through
`logging`. A GetPayment is one SELECT (through peewee on the stack's floor) and the Payment; a
ListPayments one SELECT of a page of the professional's Payments tab (one section, oldest
start first, on an index as ours) and its Payments.

Both answer the same requests the load generator sends our server, and the health service's
Check, so `make bench` drives all three with the same load in the same run. Bench-only:
nothing in the product imports it.

`python -m bench.floor --port P --database PATH --sessions N --workers W [--stack]` serves
until SIGTERM; the sessions it can cancel are floor-0 .. floor-(N-1)."""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any, TextIO

import click
import grpc
import peewee as pw
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kara.sessions.v1 import sessions_pb2 as pb
from kara.sessions.v1 import sessions_pb2_grpc
from transitions import Machine

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
  session_id TEXT PRIMARY KEY, client_id TEXT NOT NULL, starts_at INTEGER NOT NULL,
  state TEXT NOT NULL, version INTEGER NOT NULL, updated_at INTEGER NOT NULL,
  professional_id TEXT NOT NULL, section TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_tab ON sessions (professional_id, section, starts_at, session_id);
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
    "UPDATE sessions SET state = 'CANCELLED_PAID', section = 'PAID', version = version + 1, updated_at = ? "
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
_PAYMENT = "SELECT client_id, state FROM sessions WHERE session_id = ?"
# A page of the Payments tab: one section, oldest start first (the keyset's first page).
_PAYMENTS_PAGE = (
    "SELECT session_id, client_id, state FROM sessions WHERE professional_id = ? AND section = ? "
    "ORDER BY starts_at, session_id LIMIT ?"
)
_SECTIONS = {pb.PAYMENT_SECTION_UNPAID: "UNPAID", pb.PAYMENT_SECTION_PAID: "PAID"}
_PAYMENTS = {
    "BOOKED": (pb.PAYMENT_STATE_PENDING, pb.PAYMENT_SECTION_UNPAID),
    "CANCELLED_VOIDED": (pb.PAYMENT_STATE_VOIDED, pb.PAYMENT_SECTION_UNPAID),
    "CANCELLED_PAID": (pb.PAYMENT_STATE_PAID, pb.PAYMENT_SECTION_PAID),
}
CLIENTS = 32
# Every floor session is this professional's: ListPayments reads their Payments tab.
PROFESSIONAL = "floor-pro"


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
        f"INSERT INTO sessions VALUES (?, ?, ?, 'BOOKED', 1, ?, '{PROFESSIONAL}', 'UNPAID')",
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

    def GetPayment(self, request: pb.GetPaymentRequest, context: Any) -> pb.Payment:
        row = self._conn().execute(_PAYMENT, (request.session_id,)).fetchone()
        if row is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such session")
        return payment_pb(request.session_id, row[0], row[1])

    def ListPayments(self, request: pb.ListPaymentsRequest, context: Any) -> pb.ListPaymentsResponse:
        section = _SECTIONS[request.section]
        rows = self._conn().execute(_PAYMENTS_PAGE, (request.professional_id, section, request.page_size))
        return pb.ListPaymentsResponse(payments=[payment_pb(*row) for row in rows.fetchall()])


def payment_pb(session_id: str, client_id: str, state: str) -> pb.Payment:
    payment_state, section = _PAYMENTS[state]
    return pb.Payment(
        session_id=session_id, client_id=client_id, state=payment_state, section=section, credits=1
    )


# The stack's floor: the session's states and the article's decision as one `transitions` event.
_STATES = ["BOOKED", "CANCELLED_VOIDED", "CANCELLED_PAID"]
_NOTICE_WINDOW_US = 24 * 3600 * 1_000_000
_SELECT = "SELECT client_id, starts_at, state, version FROM sessions WHERE session_id = ?"
_MOVE = (
    "UPDATE sessions SET state = ?, section = ?, version = version + 1, updated_at = ? "
    "WHERE session_id = ? AND state = ? AND version = ?"
)
_RETURN = (
    "UPDATE accounts SET held = held - 1, available = available + 1, updated_at = ? "
    "WHERE client_id = ? AND held >= 1"
)
_STACK_ENTRY = (
    "INSERT INTO ledger (client_id, kind, credits, session_id, request_id, created_at) "
    "VALUES (?, ?, 1, ?, ?, ?)"
)


def _late(event: Any) -> bool:
    return bool(event.kwargs["notice_us"] < _NOTICE_WINDOW_US)


def _charged(event: Any) -> bool:
    return bool(event.kwargs["by_client"] or event.kwargs["charge"])


class _AccessLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = {"time": self.formatTime(record), "level": record.levelname, "message": record.getMessage()}
        return json.dumps({**fields, **record.__dict__.get("fields", {})})


def log_access_lines(stream: TextIO) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_AccessLine())
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("transitions").setLevel(logging.WARNING)  # as ours (logs.QUIET_LIBRARIES)


class StackFloorServicer(sessions_pb2_grpc.SessionServiceServicer):
    def __init__(self, path: str, synchronous: str = "full"):
        self.db = pw.SqliteDatabase(
            path,
            check_same_thread=False,
            timeout=10,
            pragmas={"journal_mode": "wal", "synchronous": synchronous},
        )
        self.write_lock = threading.Lock()
        self.machine = Machine(
            model=None,
            states=_STATES,
            initial=None,
            transitions=[
                {
                    "trigger": "cancel",
                    "source": "BOOKED",
                    "dest": "CANCELLED_PAID",
                    "conditions": [_late, _charged],
                },
                {"trigger": "cancel", "source": "BOOKED", "dest": "CANCELLED_VOIDED"},
            ],
            auto_transitions=False,
            send_event=True,
        )
        self.log = logging.getLogger("floor.rpc")

    def _sql(self, text: str, params: tuple[Any, ...]) -> Any:
        return self.db.execute_sql(text, params)  # type: ignore[no-untyped-call]

    def _access(self, method: str, request: Any, started: float, context: Any) -> None:
        fields = {
            "method": method,
            "code": "OK",
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "session_id": getattr(request, "session_id", ""),
            "request_id": getattr(request, "request_id", ""),
            "peer": context.peer(),
        }
        self.log.info("%s OK", method, extra={"fields": fields})

    def CancelSession(self, request: pb.CancelSessionRequest, context: Any) -> pb.CancelSessionResponse:
        started = time.perf_counter()
        now = time.time_ns() // 1000
        self.db.connect(reuse_if_open=True)
        with self.write_lock, self.db.atomic(lock_type="IMMEDIATE"):
            found = self._sql(_SELECT, (request.session_id,)).fetchone()
            if found is None:
                context.abort(grpc.StatusCode.NOT_FOUND, "no such session")
            client_id, starts_at, state, version = found
            session = SimpleNamespace(state=state)
            self.machine.events["cancel"].trigger(
                session,
                notice_us=starts_at - now,
                by_client=request.cancelled_by == pb.PARTY_CLIENT,
                charge=request.charge_client,
            )
            section = "PAID" if session.state == "CANCELLED_PAID" else "UNPAID"
            moved = self._sql(_MOVE, (session.state, section, now, request.session_id, state, version))
            if moved.rowcount != 1:
                context.abort(grpc.StatusCode.ABORTED, "changed meanwhile")
            paid = session.state == "CANCELLED_PAID"
            if self._sql(_TAKE if paid else _RETURN, (now, client_id)).rowcount != 1:
                raise RuntimeError("no credit held")
            kind = "TAKE" if paid else "RETURN"
            self._sql(_STACK_ENTRY, (client_id, kind, request.session_id, request.request_id, now))
            data = (
                f'{{"session_id":"{request.session_id}","state":"{session.state}","version":{version + 1}}}'
            )
            self._sql(_CHANGE, (request.request_id, request.session_id, "session.cancelled", data, now))
        response = pb.CancelSessionResponse(
            session=pb.Session(
                session_id=request.session_id,
                client_id=client_id,
                state=pb.SESSION_STATE_CANCELLED_PAID if paid else pb.SESSION_STATE_CANCELLED_VOIDED,
            ),
            payment=payment_pb(request.session_id, client_id, session.state),
        )
        response.session.starts_at.FromMicroseconds(starts_at)
        self._access("CancelSession", request, started, context)
        return response

    def GetPayment(self, request: pb.GetPaymentRequest, context: Any) -> pb.Payment:
        started = time.perf_counter()
        self.db.connect(reuse_if_open=True)
        with self.db.atomic():
            row = self._sql(_PAYMENT, (request.session_id,)).fetchone()
        if row is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such session")
        response = payment_pb(request.session_id, row[0], row[1])
        self._access("GetPayment", request, started, context)
        return response

    def ListPayments(self, request: pb.ListPaymentsRequest, context: Any) -> pb.ListPaymentsResponse:
        started = time.perf_counter()
        self.db.connect(reuse_if_open=True)
        with self.db.atomic():
            rows = self._sql(
                _PAYMENTS_PAGE, (request.professional_id, _SECTIONS[request.section], request.page_size)
            ).fetchall()
        response = pb.ListPaymentsResponse(payments=[payment_pb(*row) for row in rows])
        self._access("ListPayments", request, started, context)
        return response


@click.command()
@click.option("--port", type=int, required=True)
@click.option("--database", "path", required=True)
@click.option("--sessions", type=int, required=True)
@click.option("--workers", type=int, default=4, show_default=True)
@click.option("--stack", is_flag=True, help="The stack's floor: peewee, transitions, an access line.")
def main(port: int, path: str, sessions: int, workers: int, stack: bool) -> None:
    populate(path, sessions)
    log_access_lines(sys.stderr)
    servicer = StackFloorServicer(path) if stack else FloorServicer(path)
    server = grpc.server(ThreadPoolExecutor(max_workers=workers))
    sessions_pb2_grpc.add_SessionServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
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
