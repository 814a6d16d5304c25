"""`kara-sessions` as a first user meets it (issue 23): a bad value is a usage error (exit 2),
never a traceback; a failure says what to change on the command line; free text from other
people is shown, never obeyed, by the terminal."""

from __future__ import annotations

import json
import socket
import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from kara_sessions_client.cli import main as cli
from kara_sessions_client.client import SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start

from ..support.clock import FakeClock
from ..support.tokens import write_tokens

TERMINAL = {"TTY_COMPATIBLE": "1", "COLUMNS": "200", "LINES": "50", "TERM": "xterm", "NO_COLOR": "1"}
ESCAPES = "\x1b[2J\x1b[1;31mURGENT\x1b]0;owned\x07 [bold]marked up[/bold]"


@pytest.fixture
def database_file(tmp_path: Path) -> Path:
    return tmp_path / "kara.db"


@pytest.fixture
def running(database_file: Path) -> Iterator[RunningServer]:
    # One per test: the storage's database is process-wide, so a server another test starts
    # would take it over from a shared one (issue 27).
    server = start(
        Settings(listen="127.0.0.1:0", database_url=f"sqlite:///{database_file}", max_workers=4),
        clock=FakeClock(),
    )
    yield server
    server.stop(grace=1)


def run(
    server: RunningServer | None, *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> Result:
    target = ["--target", f"127.0.0.1:{server.port}"] if server else []
    return CliRunner().invoke(cli, [*target, *args], env=env, input=stdin)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["sessions", "--professional", "p", "--page-size", "10000000000"], "--page-size"),
        (["book", "--client", "c", "--professional", "p", "--starts-at", "+9999999d"], "0001-9999"),
        (["book", "--client", "c", "--professional", "p", "--starts-at", "9999-12-31T23:00:00-05:00"], "UTC"),
        (["cancel", "s", "--by", "professional", "--notified-at", "0001-01-01T00:00:00+05:00"], "0001-9999"),
        (["--timeout", "-1", "session", "s"], "--timeout"),
        (["--timeout", "0", "session", "s"], "--timeout"),
        (["sessions"], "--professional ID or --client ID"),
    ],
    ids=[
        "page-size",
        "relative-overflow",
        "offset-past-9999",
        "offset-before-0001",
        "timeout-neg",
        "timeout-0",
        "no-filter",
    ],
)
def test_a_bad_value_is_a_usage_error_not_a_traceback(
    running: RunningServer, args: list[str], says: str
) -> None:
    result = run(running, *args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    assert says in result.output


def test_the_starts_at_example_is_in_the_future(running: RunningServer) -> None:
    from datetime import UTC, datetime

    result = run(running, "book", "--client", "c", "--professional", "p", "--starts-at", "soon")
    assert result.exit_code == 2
    example = result.output.split("ISO-8601 time (")[1].split(")")[0]
    assert datetime.fromisoformat(example.replace("Z", "+00:00")) > datetime.now(UTC)


def test_an_unreachable_server_names_the_target_flag() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once it closes
    result = CliRunner().invoke(
        cli, ["--target", f"127.0.0.1:{port}", "--attempts", "1", "--timeout", "2", "session", "s"]
    )
    assert result.exit_code == 3
    assert "--target" in result.output and "KARA_TARGET" in result.output


def test_a_missing_token_names_the_flag_and_the_variable(tmp_path: Path) -> None:
    write_tokens(tmp_path / "tokens.toml", ("service:ops",))
    from kara_sessions_server.entrypoints.grpc.tokens import TokenTable

    server = start(
        Settings(
            listen="127.0.0.1:0",
            database_url=f"sqlite:///{tmp_path / 'kara.db'}",
            tokens=TokenTable.load(tmp_path / "tokens.toml"),
        )
    )
    try:
        result = run(server, "session", "s")
    finally:
        server.stop(grace=1)
    assert result.exit_code == 1
    assert "--token" in result.output and "KARA_TOKEN" in result.output


def test_free_text_from_others_is_shown_escaped(running: RunningServer, database_file: Path) -> None:
    """A client's reason is shown to the professional; it came through a careless caller (the
    server now refuses control characters, so the row is written directly, as one stored before
    that check would be)."""
    with SessionsClient(f"127.0.0.1:{running.port}") as kara:
        kara.grant_credits("c-esc", 1)
        session = kara.book("c-esc", "p-esc", FakeClock().now() + timedelta(days=3))
        kara.cancel(session.session_id, "client", reason="placeholder")
    with sqlite3.connect(database_file) as db:
        written = db.execute(
            "UPDATE sessions SET reason = ? WHERE session_id = ?", (ESCAPES, session.session_id)
        )
    assert written.rowcount == 1
    for env in (TERMINAL, {}):  # a terminal, and a pipe
        # Only rich's own bold and reset may remain (NO_COLOR keeps bold).
        shown = run(running, "session", session.session_id, env=env).output.replace("\x1b[1m", "")
        shown = shown.replace("\x1b[0m", "")
        assert "\x1b" not in shown and "\x07" not in shown, repr(shown)
        assert "\\x1b[2J" in shown and "\\x07" in shown
        assert "[bold]marked up[/bold]" in shown  # as written, not styled


def test_an_empty_list_says_so(running: RunningServer) -> None:
    for env in (TERMINAL, {}):
        result = run(running, "sessions", "--professional", "nobody-here", env=env)
        assert result.exit_code == 0
        assert "no sessions" in result.output


def test_bulk_cancel_of_an_empty_file_is_a_usage_error(running: RunningServer) -> None:
    result = run(running, "bulk-cancel", "-", stdin="")
    assert result.exit_code == 2
    assert "no rows" in result.output
    assert "malformed" not in result.output


def test_a_session_is_moved_and_previewed_from_the_command_line(running: RunningServer) -> None:
    assert run(running, "credits", "grant", "client-1", "2").exit_code == 0
    booked = run(
        running, "--json", "book", "--client", "client-1", "--professional", "pro-1", "--starts-at", "+3d"
    )
    session_id = json.loads(booked.output)["session_id"]
    preview = run(running, "--json", "preview-reschedule", session_id, "--to", "+5d", "--by", "client")
    assert preview.exit_code == 0 and json.loads(preview.output)["outcome"] == "RESCHEDULE_OUTCOME_MOVED"
    moved = run(
        running, "--json", "reschedule", session_id, "--to", "+5d", "--by", "client", "--reason", "work"
    )
    assert moved.exit_code == 0, moved.output
    session = json.loads(moved.output)["session"]
    assert session["session_id"] == session_id and session["moves"][0]["reason"] == "work"
    refused = run(running, "reschedule", session_id, "--to", "+5d", "--by", "client", "--charge-client")
    assert refused.exit_code != 0 and "only the professional can charge" in refused.output
    bad = run(running, "reschedule", session_id, "--to", "next tuesday", "--by", "client")
    assert bad.exit_code == 2 and "--to" in bad.output
