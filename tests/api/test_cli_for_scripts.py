"""The command line as a script uses it (issue 39): exit codes it can rely on, output it can
parse, and commands that change nothing when they say so. Each runs `kara-sessions` in its own
process against a real server."""

from __future__ import annotations

import json
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from kara.sessions.v1 import credits_pb2 as cpb
from kara.sessions.v1 import invoices_pb2 as ipb
from kara.sessions.v1 import programmes_pb2 as ppb
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start

from ..support.clock import FakeClock
from ..support.processes import free_port

CLI = [sys.executable, "-m", "kara_sessions_client.cli"]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """The command line is the same whichever database the server uses: SQLite is enough."""
    return f"sqlite:///{tmp_path / 'kara.db'}"


def _target(server: RunningServer) -> list[str]:
    return ["--target", f"127.0.0.1:{server.port}"]


def test_a_reader_that_goes_away_after_the_work_is_done_is_not_a_refusal(
    server: RunningServer, kara: SessionsClient, clock: FakeClock
) -> None:
    """`book ... | head -1` exited 1, "the server refused": under pipefail a script booked again."""
    kara.grant_credits("client-1", 2)
    book = [
        *CLI,
        *_target(server),
        "book",
        "--client",
        "client-1",
        "--professional",
        "p",
        "--starts-at",
        "+3d",
    ]
    proc = subprocess.Popen(book, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before a byte is written
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141, err
    assert b"Traceback" not in err and b"Exception ignored" not in err
    assert len(kara.list_sessions(client_id="client-1").sessions) == 1, "the booking was made once"

    command = " ".join(f"'{part}'" for part in book) + " | head -1"
    piped = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=60, check=False
    )
    assert piped.returncode in (0, 141), piped.stderr
    assert len(kara.list_sessions(client_id="client-1").sessions) == 2


def _json(server: RunningServer, *args: str) -> dict[str, object]:
    done = subprocess.run(
        [*CLI, *_target(server), "--json", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    data: dict[str, object] = json.loads(done.stdout)
    return data


def test_json_has_every_field_with_numbers_as_numbers(
    server: RunningServer, kara: SessionsClient, clock: FakeClock
) -> None:
    """`jq .available` gave null at 0; notice_seconds was a string beside numbers; durations
    were "86400s"."""
    kara.grant_credits("client-g", 1)
    session_id = kara.book("client-g", "p", clock.now() + timedelta(days=3)).session_id
    account = _json(server, "credits", "show", "client-g")
    assert {k: account[k] for k in ("available", "held", "used")} == {"available": 0, "held": 1, "used": 0}
    assert account["next_page_token"] == ""
    preview = _json(server, "preview", session_id, "--by", "client")
    assert isinstance(preview["notice_seconds"], int) and preview["notice_seconds"] > 0
    assert preview["late"] is False and preview["credits_taken"] == 0 and preview["credits_returned"] == 1
    session = _json(server, "session", session_id)
    terms = session["terms"]
    assert isinstance(terms, dict)
    assert terms["notice_window"] == 86400 and terms["cancellation_grace"] == 0
    assert session["moves"] == [] and session["rescheduled_to"] == ""
    programme = _json(server, "programme", "show", "default")
    assert programme["notice_window"] == 86400


def test_migrate_check_and_backup_never_create_a_database(tmp_path: Path) -> None:
    """`migrate --check` on a mistyped path said "schema is current", exit 0, and left a new
    database file behind."""
    missing = tmp_path / "x" / "missing.db"
    url = f"sqlite:///{missing}"
    for args in (
        ["migrate", "--check", "--database-url", url],
        ["backup", "--database-url", url, str(tmp_path / "b.db")],
    ):
        done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2, done.stdout + done.stderr
        assert str(missing) in done.stderr
        assert not missing.exists() and not missing.parent.exists()
        assert not (tmp_path / "b.db").exists()
    # An empty database is not "current" either: it has no schema.
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    done = subprocess.run(
        [*CLI, "migrate", "--check", "--database-url", f"sqlite:///{empty}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1 and "no schema yet" in done.stdout, done.stdout + done.stderr


def _stderr_until(proc: subprocess.Popen[str], wanted: str, seconds: float) -> list[str]:
    """stderr's lines up to the first holding `wanted` (fails after `seconds`)."""
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.1)
        if ready:
            line = proc.stderr.readline()
            assert line, f"ended early: {lines}"
            lines.append(line)
            if wanted in line:
                return lines
    raise AssertionError(f"{wanted!r} not said within {seconds} s: {lines}")


def _follow(port: int) -> subprocess.Popen[str]:
    command = [*CLI, "--target", f"127.0.0.1:{port}", "events", "--follow"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_events_follow_says_at_once_that_no_server_answers_and_when_one_does(
    tmp_path: Path, clock: FakeClock
) -> None:
    port = free_port()
    proc = _follow(port)
    try:
        said = _stderr_until(proc, "cannot reach the server", 3)
        assert f"127.0.0.1:{port}" in said[-1]
        running = start(
            Settings(listen=f"127.0.0.1:{port}", database_url=f"sqlite:///{tmp_path / 'k.db'}"), clock=clock
        )
        try:
            _stderr_until(proc, "answers again", 15)
            with SessionsClient(f"127.0.0.1:{port}") as kara:
                kara.grant_credits("client-1", 1)
            assert proc.stdout is not None
            assert json.loads(proc.stdout.readline())["type"] == "kara.sessions.v1.credits.granted"
        finally:
            running.stop(grace=0)
    finally:
        proc.kill()
        proc.wait()


def test_the_relay_says_at_once_that_the_broker_refuses_and_logs_as_the_server_does(
    server: RunningServer,
) -> None:
    """It said nothing for 5 s, though the connection was refused at once, and logged plain text."""
    proc = subprocess.Popen(
        [
            *CLI,
            *_target(server),
            "relay",
            "--nats-url",
            f"nats://127.0.0.1:{free_port()}",
            "--log-format",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        started = time.monotonic()
        line = _stderr_until(proc, "cannot reach the broker", 4)[-1]
        assert time.monotonic() - started < 3
        logged = json.loads(line)
        assert logged["level"] == "WARNING" and "refused" in logged["message"].lower()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def _cli(server: RunningServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, check=False)


def test_global_options_may_follow_the_command(
    server: RunningServer, kara: SessionsClient, clock: FakeClock
) -> None:
    """`cancel S --by client --json` said "No such option '--json'. Did you mean '--reason'?"."""
    kara.grant_credits("client-1", 1)
    session_id = kara.book("client-1", "p", clock.now() + timedelta(days=3)).session_id
    done = _cli(server, "cancel", session_id, "--by", "client", "--json", *_target(server))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["payment"]["state"] == "PAYMENT_STATE_VOIDED"
    # A command's own option of the same name, and an option's value that looks like one, stay.
    reasoned = _cli(server, *_target(server), "credits", "grant", "client-2", "1", "--request-id", "--json")
    assert reasoned.returncode == 0 and not reasoned.stdout.lstrip().startswith("{"), reasoned.stderr


def test_relative_times_take_compound_amounts_and_weeks_and_keep_to_the_minute(
    server: RunningServer, kara: SessionsClient, clock: FakeClock
) -> None:
    from kara_sessions_client.cli import WHEN

    now = datetime.now(UTC)
    if now.second > 50:  # the two readings below must fall in one minute
        time.sleep(61 - now.second)
    later = WHEN.convert("+2h30m", None, None)
    assert later == WHEN.convert("+2h30m", None, None), "the same within a minute"
    assert later.second == 0 and later.microsecond == 0
    assert timedelta(hours=2, minutes=29) <= later - datetime.now(UTC) <= timedelta(hours=2, minutes=30)
    week = WHEN.convert("+1w", None, None)
    assert timedelta(days=6, hours=23, minutes=58) <= week - datetime.now(UTC) <= timedelta(days=7)
    exact = WHEN.convert("+90s", None, None) - datetime.now(UTC)  # seconds asked for: kept
    assert timedelta(seconds=89) <= exact <= timedelta(seconds=90)
    bad = _cli(server, "book", "--client", "c", "--professional", "p", "--starts-at", "+2x", *_target(server))
    assert bad.returncode == 2
    # Run twice, the same move is the same time: the second is "unchanged", not a second move.
    kara.grant_credits("client-1", 1)
    session_id = kara.book("client-1", "p", datetime.now(UTC) + timedelta(days=3)).session_id
    if datetime.now(UTC).second > 50:
        time.sleep(61 - datetime.now(UTC).second)
    move = ["reschedule", session_id, "--to", "+5d", "--by", "professional", *_target(server)]
    assert _cli(server, *move).returncode == 0
    again = _cli(server, *move)
    assert again.returncode == 1 and "STARTS_AT_UNCHANGED" in again.stderr
    assert len(kara.get_session(session_id).moves) == 1


def test_version_names_the_package_and_the_schema() -> None:
    from importlib.metadata import version

    from kara_sessions_server.adapters.migrations import LATEST

    done = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0
    package, api = version("kara-sessions"), "kara.sessions.v1"
    assert done.stdout.strip() == f"kara-sessions {package}, database schema version {LATEST}, API {api}"


def test_a_file_whose_header_is_wrong_is_a_usage_error_and_sends_nothing(
    server: RunningServer, tmp_path: Path
) -> None:
    """It said "1 rows ... 1 malformed"."""
    path = tmp_path / "wrong.csv"
    path.write_text("session,who\ns-1,client\n")
    done = _cli(server, *_target(server), "bulk-cancel", str(path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "line 1: the header must name the columns" in done.stderr and "nothing was sent" in done.stderr
    assert "rows:" not in done.stdout


def test_a_refusal_says_its_message_once(
    server: RunningServer, kara: SessionsClient, clock: FakeClock
) -> None:
    kara.grant_credits("client-1", 1)
    session_id = kara.book("client-1", "p", clock.now() + timedelta(days=3)).session_id
    done = _cli(server, *_target(server), "cancel", session_id, "--by", "client", "--charge-client")
    assert done.returncode == 1
    assert "CLIENT_CANNOT_CHARGE" in done.stderr
    assert done.stderr.count("only the professional can charge the client") == 1, done.stderr


_INT64_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def _assert_shape(data: object, descriptor: Descriptor, where: str) -> None:
    """Every field of the message is there (a sub-message may be unset), numbers are numbers."""
    assert isinstance(data, dict), where
    for field in descriptor.fields:
        path = f"{where}.{field.name}"
        if field.name not in data:
            assert field.message_type is not None and not _is_repeated(field), f"{path} is missing"
            continue
        values = data[field.name] if _is_repeated(field) else [data[field.name]]
        for value in values:
            if field.message_type is not None and field.message_type.full_name == "google.protobuf.Duration":
                assert isinstance(value, int | float), f"{path}: a duration in seconds, not {value!r}"
            elif field.message_type is not None and field.message_type.full_name.startswith("kara."):
                _assert_shape(value, field.message_type, path)
            elif field.type in _INT64_TYPES:
                assert isinstance(value, int), f"{path}: a number, not {value!r}"


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def test_every_command_prints_one_full_json_shape(
    server: RunningServer, kara: SessionsClient, clock: FakeClock
) -> None:
    """Each command's --json against the message it prints: every field, numbers as numbers."""
    kara.grant_credits("client-1", 4)
    when = clock.now()
    later, early = (when + timedelta(days=d) for d in (3, 4))
    paid = kara.book("client-1", "pro-1", when + timedelta(hours=5)).session_id
    kara.cancel(paid, "client")
    free = kara.book("client-1", "pro-1", later).session_id
    absent = kara.book("client-1", "pro-1", early).session_id
    clock.advance(timedelta(days=5))
    kara.mark_no_show(absent)
    invoice = kara.create_invoice("pro-1", [paid]).invoice_id
    commands: list[tuple[list[str], Descriptor]] = [
        (
            ["book", "--client", "client-1", "--professional", "pro-1", "--starts-at", "+3d"],
            pb.Session.DESCRIPTOR,
        ),
        (["session", free], pb.Session.DESCRIPTOR),
        (["sessions", "--professional", "pro-1"], pb.ListSessionsResponse.DESCRIPTOR),
        (["payment", paid], pb.Payment.DESCRIPTOR),
        (["payments", "--professional", "pro-1", "--section", "paid"], pb.ListPaymentsResponse.DESCRIPTOR),
        (["waive", absent, "--reason", "goodwill"], pb.WaiveChargeResponse.DESCRIPTOR),
        (["credits", "grant", "client-2", "1"], cpb.CreditAccount.DESCRIPTOR),
        (["credits", "show", "client-1"], cpb.CreditAccount.DESCRIPTOR),
        (
            ["programme", "create", "p2", "--name", "Two", "--notice-window-hours", "48"],
            ppb.Programme.DESCRIPTOR,
        ),
        (["programme", "show", "p2"], ppb.Programme.DESCRIPTOR),
        (["programme", "list"], ppb.ListProgrammesResponse.DESCRIPTOR),
        (["programme", "update", "p2", "--name", "Two b"], ppb.Programme.DESCRIPTOR),
        (["invoice", "show", invoice], ipb.Invoice.DESCRIPTOR),
        (["invoice", "list", "--professional", "pro-1"], ipb.ListInvoicesResponse.DESCRIPTOR),
        (["invoice", "submit", invoice], ipb.Invoice.DESCRIPTOR),
    ]
    for args, descriptor in commands:
        _assert_shape(_json(server, *args), descriptor, " ".join(args[:2]))
    booked = _json(server, "book", "--client", "client-1", "--professional", "pro-1", "--starts-at", "+9d")
    session_id = str(booked["session_id"])
    later_commands: list[tuple[list[str], Descriptor]] = [
        (["preview", session_id, "--by", "client"], pb.PreviewCancellationResponse.DESCRIPTOR),
        (
            ["preview-reschedule", session_id, "--to", "+12d", "--by", "client"],
            pb.PreviewRescheduleResponse.DESCRIPTOR,
        ),
        (
            ["reschedule", session_id, "--to", "+12d", "--by", "client"],
            pb.RescheduleSessionResponse.DESCRIPTOR,
        ),
        (["cancel", session_id, "--by", "client"], pb.CancelSessionResponse.DESCRIPTOR),
    ]
    for args, descriptor in later_commands:
        _assert_shape(_json(server, *args), descriptor, " ".join(args[:2]))


def test_events_follow_says_when_a_server_does_not_answer_at_all() -> None:
    """A port that accepts connections and never speaks (a hung host, a wrong service): said
    within a few seconds, not when the connection attempt gives up after 20."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        proc = _follow(port)
        try:
            said = _stderr_until(proc, "cannot reach the server", 8)
            assert "no answer within 3 s" in said[-1]
        finally:
            proc.kill()
            proc.wait()
