"""What operators see: Prometheus metrics scraped over HTTP, and one JSON log line per RPC."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kara_sessions_client.client import KaraError, SessionsClient
from kara_sessions_server.entrypoints import logs
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start

from ..support.clock import FakeClock
from ..support.database import db_snapshot
from ..support.processes import start_server_process
from ..support.tokens import write_tokens


@pytest.fixture
def server(database_url: str, clock: FakeClock) -> Iterator[RunningServer]:
    running = start(
        Settings(listen="127.0.0.1:0", database_url=database_url, max_workers=4, metrics_port=0), clock=clock
    )
    yield running
    running.stop(grace=1)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_rpcs_outcomes_and_credits(
    server: RunningServer, kara: SessionsClient, clock: FakeClock
) -> None:
    kara.grant_credits("cl-1", 2)
    late = kara.book("cl-1", "pro-1", clock.now() + timedelta(hours=5)).session_id
    early = kara.book("cl-1", "pro-1", clock.now() + timedelta(days=5)).session_id
    kara.cancel(late, "client", request_id="late-1")
    kara.cancel(late, "client", request_id="late-1")  # a replay moves nothing and counts as no cancellation
    kara.cancel(early, "professional")
    with pytest.raises(KaraError):
        kara.cancel(early, "professional")
    assert server.metrics_port
    m = scrape(server.metrics_port)

    def rpcs(method: str, code: str) -> float:
        return m.get(("kara_rpc_requests_total", (("code", code), ("method", method))), 0)

    assert rpcs("CancelSession", "OK") == 3
    assert rpcs("CancelSession", "FAILED_PRECONDITION") == 1
    assert rpcs("BookSession", "OK") == 2
    assert m[("kara_rpc_duration_seconds_count", (("method", "CancelSession"),))] == 4
    cancellations = {k[1]: v for k, v in m.items() if k[0] == "kara_cancellations_total"}
    assert cancellations == {
        (("cancelled_by", "client"), ("outcome", "paid"), ("timing", "late")): 1,
        (("cancelled_by", "professional"), ("outcome", "voided"), ("timing", "on_time")): 1,
    }
    credits = {dict(k[1])["kind"]: v for k, v in m.items() if k[0] == "kara_credits_moved_total"}
    assert credits == {"GRANT": 2, "HOLD": 2, "TAKE": 1, "RETURN": 1}


def test_metrics_count_committed_invoice_changes(
    server: RunningServer, kara: SessionsClient, clock: FakeClock
) -> None:
    kara.grant_credits("cl-1", 2)
    paid = []
    for hours in (5, 6):
        session_id = kara.book("cl-1", "pro-1", clock.now() + timedelta(hours=hours)).session_id
        kara.cancel(session_id, "client")
        paid.append(session_id)
    invoice = kara.create_invoice("pro-1", paid, request_id="inv-1")
    kara.create_invoice("pro-1", paid, request_id="inv-1")  # a replay changes nothing
    kara.remove_from_invoice(invoice.invoice_id, paid[:1])
    with pytest.raises(KaraError):
        kara.create_invoice("pro-1", paid[1:])  # already invoiced
    kara.submit_invoice(invoice.invoice_id)
    assert server.metrics_port
    m = scrape(server.metrics_port)
    actions = {dict(k[1])["action"]: v for k, v in m.items() if k[0] == "kara_invoice_actions_total"}
    assert actions == {"CREATE": 1, "REMOVE": 1, "SUBMIT": 1}
    sessions = {dict(k[1])["action"]: v for k, v in m.items() if k[0] == "kara_invoice_sessions_total"}
    assert sessions == {"CREATE": 2, "REMOVE": 1}


def test_one_json_log_line_per_rpc_and_never_a_token(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.toml", ("service:backend",))
    token = tokens["service:backend"]
    proc, port = start_server_process(
        f"sqlite:///{tmp_path / 'k.db'}",
        "--tokens-file",
        str(tmp_path / "tokens.toml"),
        "--log-format",
        "json",
        log_level="INFO",
    )
    try:
        with SessionsClient(f"127.0.0.1:{port}", token=token) as kara:
            kara.grant_credits("cl-1", 1, request_id="grant-1")
            from datetime import UTC, datetime

            session_id = kara.book("cl-1", "pro-1", datetime.now(UTC) + timedelta(days=3)).session_id
            kara.cancel(session_id, "client", request_id="cancel-1")
        with SessionsClient(f"127.0.0.1:{port}", token="wrong") as intruder, pytest.raises(KaraError):
            intruder.get_session(session_id)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    stderr = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert token not in stderr and "wrong" not in stderr.replace("wrong owner", "")
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    rpc_lines = [line for line in lines if "method" in line]
    assert not [line for line in lines if line["logger"].startswith("transitions")], "library chatter"
    cancel = next(line for line in rpc_lines if line["method"] == "CancelSession")
    assert cancel["code"] == "OK"
    assert cancel["principal"] == "service:backend"
    assert cancel["session_id"] == session_id
    assert cancel["request_id"] == "cancel-1"
    assert cancel["duration_ms"] > 0 and cancel["level"] == "INFO" and "time" in cancel
    refused = next(line for line in rpc_lines if line["method"] == "GetSession")
    assert (refused["code"], refused["principal"]) == ("UNAUTHENTICATED", "")
    assert [line["method"] for line in rpc_lines] == [
        "GrantCredits",
        "BookSession",
        "CancelSession",
        "GetSession",
    ]


def test_a_call_whose_deadline_passed_while_queued_is_not_run(tmp_path: Path, clock: FakeClock) -> None:
    """One worker, busy waiting for a database lock; a call queued behind it with a short
    deadline must not be run once the worker is free."""
    import sqlite3
    import threading

    import grpc

    url = f"sqlite:///{tmp_path / 'k.db'}"
    running = start(
        Settings(listen="127.0.0.1:0", database_url=url, max_workers=1, metrics_port=0), clock=clock
    )
    try:
        with SessionsClient(f"127.0.0.1:{running.port}", timeout=30) as kara:
            kara.grant_credits("cl-1", 1)
            session_id = kara.book("cl-1", "pro-1", clock.now() + timedelta(days=2)).session_id
            lock = sqlite3.connect(tmp_path / "k.db", isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")  # the worker's cancellation will wait for this
            slow = threading.Thread(target=lambda: kara.cancel(session_id, "client"))
            slow.start()
            # Let the cancellation take the only worker first (it then waits up to 10 s for the
            # lock); sent at once, the read could win the worker and pass.
            time.sleep(0.5)
            with (
                SessionsClient(f"127.0.0.1:{running.port}", timeout=0.3) as hasty,
                pytest.raises(KaraError) as late,
            ):
                hasty.get_session(session_id)
            assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            lock.execute("ROLLBACK")
            slow.join(timeout=30)
        assert running.metrics_port
        m = scrape(running.metrics_port)
        get_calls = {
            dict(k[1])["code"]: v
            for k, v in m.items()
            if k[0] == "kara_rpc_requests_total" and dict(k[1])["method"] == "GetSession"
        }
        # Each of the client's attempts (4, its retry policy) waited for the only worker until its
        # deadline, in gRPC's queue or at the interceptor's gate, and was refused: never run.
        assert set(get_calls) <= {"DEADLINE_EXCEEDED"}, get_calls
        assert get_calls.get("DEADLINE_EXCEEDED", 0) <= 4, get_calls
        assert m[("kara_rpc_requests_total", (("code", "OK"), ("method", "CancelSession")))] == 1
    finally:
        running.stop(grace=1)


def test_a_json_log_line_has_the_time_level_logger_message_and_every_extra_field() -> None:
    import logging

    from kara_sessions_server.entrypoints.logs import JsonLineFormatter

    formatter = JsonLineFormatter()
    record = logging.LogRecord("kara_sessions_server.rpc", logging.INFO, "", 1, "%s %s", ("A", "OK"), None)
    record.method, record.duration_ms, record.peer = "CancelSession", 1.25, "ipv4:127.0.0.1:5000"
    line = json.loads(formatter.format(record))
    expected_time = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(record.created)))
    assert line == {
        "time": f"{expected_time},{int(record.msecs):03d}",
        "level": "INFO",
        "logger": "kara_sessions_server.rpc",
        "message": "A OK",
        "method": "CancelSession",
        "duration_ms": 1.25,
        "peer": "ipv4:127.0.0.1:5000",
    }
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        failed = logging.LogRecord("k", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "RuntimeError: boom" in json.loads(formatter.format(failed))["exc_info"]


def test_metrics_and_the_audit_log_record_each_committed_reschedule(
    server: RunningServer, kara: SessionsClient, clock: FakeClock
) -> None:
    kara.grant_credits("cl-1", 3)
    early = kara.book("cl-1", "pro-1", clock.now() + timedelta(days=5)).session_id
    late = kara.book("cl-1", "pro-1", clock.now() + timedelta(hours=5)).session_id
    kara.reschedule(early, clock.now() + timedelta(days=6), "client", request_id="move-1")
    kara.reschedule(early, clock.now() + timedelta(days=6), "client", request_id="move-1")  # a replay
    charged = kara.reschedule(late, clock.now() + timedelta(days=2), "client")
    with pytest.raises(KaraError):
        kara.reschedule(late, clock.now() + timedelta(days=3), "client")  # no longer booked
    assert server.metrics_port
    m = scrape(server.metrics_port)
    reschedules = {k[1]: v for k, v in m.items() if k[0] == "kara_reschedules_total"}
    assert reschedules == {
        (("outcome", "moved"), ("rescheduled_by", "client"), ("timing", "on_time")): 1,
        (("outcome", "charged"), ("rescheduled_by", "client"), ("timing", "late")): 1,
    }
    audit = [
        (r["session_id"], r["action"], r["from_state"], r["to_state"], r["principal"])
        for r in db_snapshot(server)["audit_log"]
        if r["action"] != "BOOK" or r["session_id"] == charged.session.session_id
    ]
    principal = "service:unauthenticated"
    assert audit == [
        (early, "RESCHEDULE", "BOOKED", "BOOKED", principal),
        (late, "RESCHEDULE", "BOOKED", "CANCELLED_PAID", principal),
        (charged.session.session_id, "BOOK", None, "BOOKED", principal),
    ]


@pytest.fixture
def configured_logging() -> Iterator[None]:
    """logs.configure() replaces the root logger's handlers; put pytest's back afterwards."""
    import logging

    root = logging.getLogger()
    handlers, level, srcfile = root.handlers[:], root.level, logging._srcfile
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging._srcfile = srcfile
        logs._Installed.access_line = None


ACCESS_FIELDS = {
    "method": "CancelSession",
    "code": "OK",
    "duration_ms": 1.25,
    "principal": "service:backend",
    "session_id": 'a "quoted" é id',
    "invoice_id": "",
    "request_id": "r-1",
    "peer": "ipv4:127.0.0.1:5000",
    "incident": "",
}


def test_the_access_line_written_straight_to_the_stream_is_the_one_logging_writes(
    configured_logging: None,
) -> None:
    """Issue 35: the access line skips logging's machinery when nothing else listens; it must
    be the same line, key for key and in the same order (pid last), as the formatter's."""
    import io
    import logging

    stream = io.StringIO()
    logs.configure("INFO", "json", stream=stream, with_pid=True)
    access = logging.getLogger("kara_sessions_server.rpc")
    assert logs._Installed.access_line is not None and logs._Installed.access_line.applies(access)
    logs.access(access, "CancelSession OK", ACCESS_FIELDS)
    direct = stream.getvalue()
    logs._Installed.access_line = None  # the same call through logging
    logs.access(access, "CancelSession OK", ACCESS_FIELDS)
    through_logging = stream.getvalue()[len(direct) :]
    assert direct.endswith("\n") and direct.count("\n") == 1
    first, second = json.loads(direct), json.loads(through_logging)
    assert list(first) == list(second) and list(first)[-1] == "pid"
    del first["time"], second["time"]
    assert (
        first
        == second
        == {
            "level": "INFO",
            "logger": "kara_sessions_server.rpc",
            "message": "CancelSession OK",
            **ACCESS_FIELDS,
            "pid": os.getpid(),
        }
    )


def test_the_access_line_goes_through_logging_when_another_handler_listens(
    configured_logging: None,
) -> None:
    import io
    import logging

    stream = io.StringIO()
    logs.configure("INFO", "json", stream=stream)
    heard: list[logging.LogRecord] = []
    listener = logging.Handler()
    listener.emit = heard.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(listener)
    access = logging.getLogger("kara_sessions_server.rpc")
    logs.access(access, "CancelSession OK", ACCESS_FIELDS)
    assert [(r.getMessage(), r.session_id) for r in heard] == [("CancelSession OK", 'a "quoted" é id')]  # type: ignore[attr-defined]
    assert json.loads(stream.getvalue())["request_id"] == "r-1"
    logging.getLogger().setLevel(logging.WARNING)
    logs.access(access, "CancelSession OK", ACCESS_FIELDS)
    assert len(heard) == 1 and stream.getvalue().count("\n") == 1


def test_a_filter_added_to_the_handler_still_sees_every_access_line(configured_logging: None) -> None:
    import io
    import logging

    stream = io.StringIO()
    logs.configure("INFO", "json", stream=stream)
    dropped = logging.Filter("somewhere.else")  # passes only records of another logger
    logging.getLogger().handlers[0].addFilter(dropped)
    logs.access(logging.getLogger("kara_sessions_server.rpc"), "CancelSession OK", ACCESS_FIELDS)
    assert stream.getvalue() == ""
