"""What `kara-sessions` prints, checked against snapshots in tests/api/snapshots/: plain and
stable when stdout is not a terminal (scripts read it), tables and aligned views on a terminal,
and --json unchanged. The server is real; ids (random UUIDs) are replaced by <id-N> in order of
appearance. After a deliberate change of the output, rewrite the snapshots with
KARA_UPDATE_SNAPSHOTS=1 and review their diff."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from kara_sessions_client.cli import main as cli
from kara_sessions_client.client import SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start

from ..support.clock import FakeClock

SNAPSHOTS = Path(__file__).parent / "snapshots"
Workstation = tuple[RunningServer, dict[str, str]]
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# On a terminal: rich decides it is one, 200 columns wide, without colour codes.
TERMINAL = {"TTY_COMPATIBLE": "1", "COLUMNS": "200", "LINES": "50", "NO_COLOR": "1", "TERM": "xterm"}
COMMANDS = {
    "sessions": ["sessions", "--professional", "pro-1"],
    "payments": ["payments", "--professional", "pro-1", "--section", "paid"],
    "credits": ["credits", "show", "client-a"],
    "invoices": ["invoice", "list", "--professional", "pro-1"],
    "session": ["session", "{late}"],
}


@pytest.fixture(scope="module")
def workstation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, dict[str, str]]]:
    """The article's scenarios for one professional, on SQLite at a fixed time."""
    clock = FakeClock()
    db = tmp_path_factory.mktemp("cli") / "kara.db"
    settings = Settings(listen="127.0.0.1:0", database_url=f"sqlite:///{db}", max_workers=4)
    running = start(settings, clock=clock)
    now = clock.now()
    with SessionsClient(f"127.0.0.1:{running.port}") as kara:
        kara.grant_credits("client-a", 5, request_id="grant-a")
        kara.grant_credits("client-b", 2, request_id="grant-b")
        early = kara.book("client-a", "pro-1", now + timedelta(days=3)).session_id
        late = kara.book("client-a", "pro-1", now + timedelta(hours=10)).session_id
        own_late = kara.book("client-b", "pro-1", now + timedelta(hours=20)).session_id
        kara.book("client-b", "pro-1", now + timedelta(days=5))
        kara.cancel(early, "client", request_id="cancel-early")
        kara.cancel(late, "client", request_id="cancel-late")
        kara.cancel(own_late, "professional", reason="ill", request_id="cancel-own")
        kara.create_invoice("pro-1", [late], request_id="invoice-1")
    yield running, {"late": late}
    running.stop(grace=1)


def _run(server: RunningServer, args: list[str], env: dict[str, str] | None = None) -> str:
    done = CliRunner().invoke(cli, ["--target", f"127.0.0.1:{server.port}", *args], env=env)
    assert done.exit_code == 0, done.output
    return done.output


def _normalised(text: str) -> str:
    ids: dict[str, str] = {}
    # Placeholders as wide as a UUID, so that tables keep their shape.
    text = _UUID.sub(lambda m: ids.setdefault(m.group(0), f"<id-{len(ids) + 1}>".ljust(36)), text)
    return "\n".join(line.rstrip() for line in _ANSI.sub("", text).splitlines()) + "\n"


def _check(name: str, output: str) -> None:
    path = SNAPSHOTS / f"{name}.txt"
    got = _normalised(output)
    if os.environ.get("KARA_UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(got)
    assert path.exists(), f"no snapshot {path}: run with KARA_UPDATE_SNAPSHOTS=1, then review it"
    assert got == path.read_text(), f"{name}: output changed (KARA_UPDATE_SNAPSHOTS=1 rewrites it)"


@pytest.mark.parametrize("name", COMMANDS)
def test_plain_output_when_not_a_terminal(workstation: Workstation, name: str) -> None:
    server, ids = workstation
    _check(f"plain-{name}", _run(server, [a.format(**ids) for a in COMMANDS[name]]))


@pytest.mark.parametrize("name", COMMANDS)
def test_tables_and_views_on_a_terminal(workstation: Workstation, name: str) -> None:
    server, ids = workstation
    _check(f"terminal-{name}", _run(server, [a.format(**ids) for a in COMMANDS[name]], env=TERMINAL))


def test_json_is_the_message_for_scripts(workstation: Workstation) -> None:
    server, _ = workstation
    plain = json.loads(_run(server, ["--json", *COMMANDS["sessions"]]))
    on_terminal = json.loads(_run(server, ["--json", *COMMANDS["sessions"]], env=TERMINAL))
    assert plain == on_terminal, "--json does not depend on the terminal"
    assert [s["state"] for s in plain["sessions"]] == [
        "SESSION_STATE_CANCELLED_PAID",
        "SESSION_STATE_CANCELLED_VOIDED",
        "SESSION_STATE_CANCELLED_VOIDED",
        "SESSION_STATE_BOOKED",
    ]


def test_a_terminal_table_right_aligns_credits(workstation: Workstation) -> None:
    server, _ = workstation
    lines = _normalised(_run(server, COMMANDS["credits"], env=TERMINAL)).splitlines()
    header = next(line for line in lines if "kind" in line and "credits" in line)
    grant = next(line for line in lines if " GRANT " in line)
    # The figure ends where its column's header ends.
    assert grant.index("5") + 1 == header.index("credits") + len("credits")


@pytest.mark.parametrize("name", COMMANDS)
def test_an_80_column_terminal_keeps_every_word_whole(workstation: Workstation, name: str) -> None:
    """At 80 columns the tables broke states into CANC/ELLE/D_PA/ID; a table that does not fit
    is shown as one block of `column  value` lines per row instead."""
    server, ids = workstation
    narrow = {**TERMINAL, "COLUMNS": "80"}
    output = _ANSI.sub("", _run(server, [a.format(**ids) for a in COMMANDS[name]], env=narrow))
    assert max(len(line.rstrip()) for line in output.splitlines()) <= 80
    if name in ("sessions", "session"):
        assert "CANCELLED_PAID" in output.split()
    shown = json.loads(_run(server, ["--json", *[a.format(**ids) for a in COMMANDS[name]]]))
    for uuid in _ids(shown):
        assert uuid in output, "every id whole, to copy into the next command"


def _ids(data: object) -> set[str]:
    """The session and invoice ids in `data` (what a person copies from a list)."""
    if isinstance(data, dict):
        own = {v for k, v in data.items() if k in ("session_id", "invoice_id") and _UUID.fullmatch(str(v))}
        return own.union(*(_ids(v) for v in data.values()))
    if isinstance(data, list):
        return set().union(*(_ids(v) for v in data))
    return set()


def test_a_terminal_shows_every_enum_of_the_api_by_its_short_name_and_free_text_as_written() -> None:
    from kara.sessions.v1 import credits_pb2, invoices_pb2, programmes_pb2, sessions_pb2

    from kara_sessions_client.render import _value

    modules = (sessions_pb2, credits_pb2, invoices_pb2, programmes_pb2)
    enums = [enum for module in modules for enum in module.DESCRIPTOR.enum_types_by_name.values()]
    assert len(enums) >= 9
    for enum in enums:
        # Each type's prefix, as its zero value spells it (AIP-126: FOO_UNSPECIFIED).
        prefix = enum.values[0].name.removesuffix("UNSPECIFIED")
        for value in enum.values:
            assert _value(value.name) == value.name.removeprefix(prefix) != value.name
    # A reason someone typed is text, even when it looks like an enum value.
    assert _value("PARTY_CLIENT_LATE_AGAIN") == "PARTY_CLIENT_LATE_AGAIN"
