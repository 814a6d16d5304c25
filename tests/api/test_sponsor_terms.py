"""The sponsor's terms (issue 36) through the real gRPC server, on SQLite and PostgreSQL: a
client's late cancellation that the programme sends to the professional ("contact your
professional to cancel"), and a programme's cap on moves. Each term's default keeps the
article's rule; each refusal changes nothing and a preview refuses as the change would; a
session keeps the terms it was booked under when the programme changes later."""

from __future__ import annotations

import uuid
from datetime import timedelta

import grpc
import pytest
from kara.sessions.v1 import programmes_pb2 as ppb
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client import exit_codes
from kara_sessions_client.client import KaraError, SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer

from ..support.booking import new_programme
from ..support.clock import FakeClock
from ..support.database import assert_ledger_balances
from ..support.processes import run_cli
from ..support.refusals import INVALID, PRECONDITION, refuse
from .test_reschedule import Booked, balance, book_with_notice

SECOND = timedelta(seconds=1)
WINDOW = timedelta(hours=48)


def programme(kara: SessionsClient, **terms: object) -> str:
    return new_programme(kara, WINDOW, **terms)


# --- client_late_cancel ---


@pytest.mark.parametrize(
    ("who", "charge", "notice", "grace", "expect"),
    [
        ("client", False, WINDOW - SECOND, timedelta(0), "LATE_CANCEL_CONTACT_PROFESSIONAL"),
        ("client", False, SECOND, timedelta(0), "LATE_CANCEL_CONTACT_PROFESSIONAL"),
        ("client", False, WINDOW, timedelta(0), "voided"),
        ("client", False, WINDOW - SECOND, timedelta(hours=2), "voided"),  # within the grace
        ("professional", True, WINDOW - SECOND, timedelta(0), "paid"),
        ("professional", False, WINDOW - SECOND, timedelta(0), "voided"),
    ],
    ids=[
        "client late: refused",
        "client a second before the start: refused",
        "client with enough notice: voided",
        "client late within the grace after booking: voided",
        "professional late, box ticked: paid",
        "professional late, box clear: voided",
    ],
)
def test_contact_professional_refuses_only_the_clients_own_late_cancellation(
    kara: SessionsClient,
    server: RunningServer,
    clock: FakeClock,
    who: str,
    charge: bool,
    notice: timedelta,
    grace: timedelta,
    expect: str,
) -> None:
    programme_id = programme(kara, client_late_cancel="contact-professional", cancellation_grace=grace)
    # Booked an hour ago (book_with_notice): within a grace of two hours.
    booked = book_with_notice(kara, clock, programme_id, notice)
    if expect.isupper():
        preview = refuse(server, lambda: kara.preview(booked.session_id, who), PRECONDITION, expect)
        refused = refuse(server, lambda: kara.cancel(booked.session_id, who), PRECONDITION, expect)
        assert preview.message == refused.message
        assert "contact their professional" in refused.message and programme_id in refused.message
        assert refused.metadata["programme_id"] == programme_id
        # The professional can still cancel it, and decides with the box.
        done = kara.cancel(booked.session_id, "professional", charge_client=False)
        assert done.session.state == pb.SESSION_STATE_CANCELLED_VOIDED
        return
    done = kara.cancel(booked.session_id, who, charge_client=charge)
    state = pb.SESSION_STATE_CANCELLED_PAID if expect == "paid" else pb.SESSION_STATE_CANCELLED_VOIDED
    assert done.session.state == state
    assert done.session.cancellation.within_grace == bool(grace)
    # Two credits granted, one held by the booking: taken, or back with the other.
    assert balance(kara, booked) == ((1, 0, 1) if expect == "paid" else (2, 0, 0))
    assert_ledger_balances(server)


def test_the_default_charges_a_clients_late_cancellation_as_the_article_says(
    kara: SessionsClient, clock: FakeClock
) -> None:
    programme_id = programme(kara)
    shown = kara.get_programme(programme_id)
    assert (shown.client_late_cancel, shown.max_reschedules) == (ppb.CLIENT_LATE_CANCEL_CHARGE, 0)
    booked = book_with_notice(kara, clock, programme_id, WINDOW - SECOND)
    assert kara.get_session(booked.session_id).terms.client_late_cancel == ppb.CLIENT_LATE_CANCEL_CHARGE
    assert kara.cancel(booked.session_id, "client").session.state == pb.SESSION_STATE_CANCELLED_PAID


def test_a_session_keeps_the_late_cancel_rule_it_was_booked_under(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    programme_id = programme(kara)
    before = book_with_notice(kara, clock, programme_id, WINDOW + timedelta(hours=2))
    kara.update_programme(programme_id, client_late_cancel="contact-professional")
    after = book_with_notice(kara, clock, programme_id, WINDOW + timedelta(hours=2))
    assert kara.get_session(after.session_id).terms.client_late_cancel == (
        ppb.CLIENT_LATE_CANCEL_CONTACT_PROFESSIONAL
    )
    clock.advance(timedelta(hours=3))  # both late now
    refuse(
        server,
        lambda: kara.cancel(after.session_id, "client"),
        PRECONDITION,
        "LATE_CANCEL_CONTACT_PROFESSIONAL",
    )
    assert kara.cancel(before.session_id, "client").session.state == pb.SESSION_STATE_CANCELLED_PAID


# --- max_reschedules ---


def _move(kara: SessionsClient, booked: Booked, n: int, by: str = "client") -> pb.RescheduleSessionResponse:
    return kara.reschedule(booked.session_id, booked.starts_at + timedelta(hours=n), by)


def test_a_session_moved_max_reschedules_times_refuses_another_move(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    programme_id = programme(kara, max_reschedules=2)
    booked = book_with_notice(kara, clock, programme_id, timedelta(days=5))
    for n in (1, 2):
        assert _move(kara, booked, n).session.session_id == booked.session_id
    target = booked.starts_at + timedelta(hours=3)
    preview = refuse(
        server,
        lambda: kara.preview_reschedule(booked.session_id, target, "professional"),
        PRECONDITION,
        "RESCHEDULE_LIMIT_REACHED",
    )
    refused = refuse(
        server,
        lambda: kara.reschedule(booked.session_id, target, "professional"),
        PRECONDITION,
        "RESCHEDULE_LIMIT_REACHED",
    )
    assert preview.message == refused.message and "allows (2)" in refused.message
    assert refused.metadata["max_reschedules"] == "2" and refused.metadata["moves"] == "2"
    # It can still be cancelled.
    assert kara.cancel(booked.session_id, "client").session.state == pb.SESSION_STATE_CANCELLED_VOIDED


def test_no_programme_limit_by_default_and_a_session_keeps_its_cap(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    programme_id = programme(kara)
    free = book_with_notice(kara, clock, programme_id, timedelta(days=5))
    kara.update_programme(programme_id, max_reschedules=1)
    capped = book_with_notice(kara, clock, programme_id, timedelta(days=5))
    for n in (1, 2, 3):
        _move(kara, free, n)
    _move(kara, capped, 1)
    refuse(server, lambda: _move(kara, capped, 2), PRECONDITION, "RESCHEDULE_LIMIT_REACHED")
    assert len(kara.get_session(free.session_id).moves) == 3
    assert kara.get_session(capped.session_id).terms.max_reschedules == 1


@pytest.mark.parametrize("value", [-1, 51])
def test_max_reschedules_out_of_range_is_refused(
    kara: SessionsClient, server: RunningServer, value: int
) -> None:
    refused = refuse(
        server,
        lambda: kara.create_programme(f"p-{uuid.uuid4().hex[:8]}", "Bad", WINDOW, max_reschedules=value),
        INVALID,
        None,
    )
    assert [f for f, _ in refused.field_violations] == ["programme.max_reschedules"]
    programme_id = programme(kara, max_reschedules=50)
    refuse(server, lambda: kara.update_programme(programme_id, max_reschedules=value), INVALID, None)
    assert kara.get_programme(programme_id).max_reschedules == 50


def test_an_unknown_client_late_cancel_number_is_refused_by_name(
    kara: SessionsClient, server: RunningServer
) -> None:
    request = ppb.CreateProgrammeRequest(
        programme_id=f"p-{uuid.uuid4().hex[:8]}",
        request_id=str(uuid.uuid4()),
        programme=ppb.Programme(display_name="X", client_late_cancel=7),  # type: ignore[arg-type]
    )
    request.programme.notice_window.FromTimedelta(WINDOW)

    def raw() -> None:  # a caller of its own, with an enum number this API never had
        try:
            kara.programmes.CreateProgramme(request, timeout=10)
        except grpc.RpcError as exc:
            raise KaraError.from_rpc_error(exc) from exc

    refused = refuse(server, raw, INVALID, None)
    assert "CLIENT_LATE_CANCEL_CONTACT_PROFESSIONAL" in refused.message


def test_the_command_line_sets_and_shows_both_terms_and_says_why_a_cancellation_is_refused(
    server: RunningServer, kara: SessionsClient, clock: FakeClock
) -> None:
    import json
    import subprocess

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("--target", f"127.0.0.1:{server.port}", *args)

    made = cli("--json", "programme", "create", "sponsor", "--name", "Sponsor", "--notice-window-hours",
               "48", "--client-late-cancel", "contact-professional", "--max-reschedules", "3")  # fmt: skip
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["client_late_cancel"] == "CLIENT_LATE_CANCEL_CONTACT_PROFESSIONAL"
    assert created["max_reschedules"] == 3
    changed = cli("--json", "programme", "update", "sponsor", "--max-reschedules", "1")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["max_reschedules"] == 1
    shown = cli("programme", "show", "sponsor")
    assert "client_late_cancel" in shown.stdout and "CONTACT_PROFESSIONAL" in shown.stdout
    assert cli("programme", "update", "sponsor", "--max-reschedules", "51").returncode == 2
    booked = book_with_notice(kara, clock, "sponsor", timedelta(hours=47))
    refused = cli("cancel", booked.session_id, "--by", "client")
    assert refused.returncode == exit_codes.REFUSED  # the server said no: a retry will not help
    assert (
        "LATE_CANCEL_CONTACT_PROFESSIONAL" in refused.stderr
        and "contact their professional" in refused.stderr
    )
