"""Forgiven late cancellations and no-shows (issue 36's free_late_cancellations and
forgiveness_period) through the real gRPC server, on SQLite and PostgreSQL (the race behind
PgBouncer too).

A programme forgives up to N of a client's charges (a late cancellation or a no-show that
would take the credit) within a rolling period: each is voided instead, its credit returned,
and says so (Cancellation.forgiven, Session.no_show_forgiven). What would not have been charged
is not a forgiveness and uses none; a waiver is not one either, and a forgiven charge cannot be
waived. The preview says whether the next charge would be forgiven and how many remain."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

import grpc
import pytest
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import NO_RETRY, KaraError, SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer

from ..conftest import ALL_DATABASES
from ..support.booking import new_programme
from ..support.clock import FakeClock
from ..support.concurrency import race
from ..support.database import assert_ledger_balances
from ..support.processes import run_cli
from ..support.refusals import INVALID, PRECONDITION, refuse

WINDOW = timedelta(hours=48)
VOIDED, PAID = pb.SESSION_STATE_CANCELLED_VOIDED, pb.SESSION_STATE_CANCELLED_PAID


def programme(kara: SessionsClient, **terms: object) -> str:
    return new_programme(kara, WINDOW, **terms)


@dataclass(frozen=True)
class Client:
    client_id: str
    programme_id: str
    sessions: list[str]

    def balance(self, kara: SessionsClient) -> tuple[int, int, int]:
        account = kara.get_credit_account(self.client_id, programme_id=self.programme_id)
        return account.available, account.held, account.used


def client_with_sessions(kara: SessionsClient, clock: FakeClock, programme_id: str, n: int) -> Client:
    """A client granted n + 1 credits with n sessions booked now, each starting within the hour
    after next: cancelled now, each is late (the window is 48 h)."""
    client_id = f"c-{uuid.uuid4().hex[:10]}"
    kara.grant_credits(client_id, n + 1, programme_id=programme_id)
    starts = [clock.now() + timedelta(hours=2, minutes=i) for i in range(n)]
    ids = [kara.book(client_id, "pro-1", at, programme_id=programme_id).session_id for at in starts]
    return Client(client_id, programme_id, ids)


def test_the_first_n_late_cancellations_in_the_period_are_forgiven_then_charged(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    programme_id = programme(kara, free_late_cancellations=2, forgiveness_period=timedelta(days=30))
    client = client_with_sessions(kara, clock, programme_id, 4)
    expected = [(True, 0, VOIDED), (True, 1, VOIDED), (False, 2, PAID)]
    for session_id, (forgiven, used, state) in zip(client.sessions, expected, strict=False):
        preview = kara.preview(session_id, "client")
        assert (preview.forgiven, preview.forgiveness_used, preview.forgiveness_allowed) == (
            forgiven,
            used,
            2,
        )
        assert preview.late and preview.session_state == state
        done = kara.cancel(session_id, "client")
        assert done.session.state == state and done.session.cancellation.late
        assert done.session.cancellation.forgiven == forgiven == done.payment.cancellation.forgiven
        assert done.payment.state == (pb.PAYMENT_STATE_VOIDED if forgiven else pb.PAYMENT_STATE_PAID)
        assert kara.get_session(session_id).cancellation.forgiven == forgiven
    # Five credits granted, four booked: two returned (three available), one taken, one held.
    assert client.balance(kara) == (3, 1, 1)
    # A month on, the first two have left the period: the next late cancellation is forgiven.
    clock.advance(timedelta(days=30, seconds=1))
    later = kara.book(client.client_id, "pro-1", clock.now() + timedelta(hours=3), programme_id=programme_id)
    assert kara.preview(later.session_id, "client").forgiveness_used == 0
    assert kara.cancel(later.session_id, "client").session.cancellation.forgiven
    assert_ledger_balances(server)


@pytest.mark.parametrize(
    ("who", "charge", "notice", "forgiven", "state"),
    [
        ("professional", True, timedelta(hours=2), True, VOIDED),
        ("professional", False, timedelta(hours=2), False, VOIDED),
        ("client", False, WINDOW, False, VOIDED),
        ("professional", False, WINDOW, False, VOIDED),
    ],
    ids=[
        "professional late, box ticked: forgiven",
        "professional late, box clear: not charged, nothing forgiven",
        "client with notice: not charged, nothing forgiven",
        "professional with notice: not charged, nothing forgiven",
    ],
)
def test_only_a_charge_is_forgiven_and_only_a_forgiveness_uses_one(
    kara: SessionsClient,
    clock: FakeClock,
    who: str,
    charge: bool,
    notice: timedelta,
    forgiven: bool,
    state: int,
) -> None:
    programme_id = programme(kara, free_late_cancellations=1)
    client_id = f"c-{uuid.uuid4().hex[:10]}"
    kara.grant_credits(client_id, 2, programme_id=programme_id)
    first = kara.book(
        client_id, "pro-1", clock.now() + notice + timedelta(minutes=5), programme_id=programme_id
    )
    clock.advance(timedelta(minutes=5))
    done = kara.cancel(first.session_id, who, charge_client=charge)
    assert (done.session.state, done.session.cancellation.forgiven) == (state, forgiven)
    second = kara.book(client_id, "pro-1", clock.now() + timedelta(hours=2), programme_id=programme_id)
    # The one free cancellation is still there unless the first used it.
    preview = kara.preview(second.session_id, "client")
    assert (preview.forgiven, preview.forgiveness_used) == (not forgiven, int(forgiven))


def test_a_no_show_its_terms_charge_is_forgiven_and_counts_with_cancellations(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    programme_id = programme(kara, free_late_cancellations=1)
    client = client_with_sessions(kara, clock, programme_id, 2)
    clock.advance(timedelta(hours=3))  # both have started
    missed = kara.mark_no_show(client.sessions[0])
    assert missed.session.state == pb.SESSION_STATE_NO_SHOW and missed.session.no_show_forgiven
    assert missed.payment.state == pb.PAYMENT_STATE_VOIDED and missed.payment.no_show_forgiven
    assert missed.payment.paid_reason == pb.PAID_REASON_UNSPECIFIED
    charged = kara.mark_no_show(client.sessions[1])
    assert not charged.session.no_show_forgiven and charged.payment.state == pb.PAYMENT_STATE_PAID
    assert client.balance(kara) == (2, 0, 1)
    # A forgiven charge is not there to waive.
    refused = refuse(
        server, lambda: kara.waive_charge(client.sessions[0], "goodwill"), PRECONDITION, "NOT_WAIVABLE"
    )
    assert "forgiven" in refused.message
    assert_ledger_balances(server)


def test_a_no_show_its_terms_do_not_charge_uses_no_forgiveness(
    kara: SessionsClient, clock: FakeClock
) -> None:
    programme_id = programme(kara, free_late_cancellations=1, no_show_takes_credit=False)
    client = client_with_sessions(kara, clock, programme_id, 1)
    clock.advance(timedelta(hours=3))
    missed = kara.mark_no_show(client.sessions[0])
    assert missed.payment.state == pb.PAYMENT_STATE_VOIDED and not missed.session.no_show_forgiven
    later = kara.book(client.client_id, "pro-1", clock.now() + timedelta(hours=2), programme_id=programme_id)
    assert kara.preview(later.session_id, "client").forgiven


def test_a_waiver_is_not_a_forgiveness_and_forgiveness_is_per_programme(
    kara: SessionsClient, clock: FakeClock
) -> None:
    programme_id = programme(kara, free_late_cancellations=1)
    client = client_with_sessions(kara, clock, programme_id, 3)
    assert kara.cancel(client.sessions[0], "client").session.cancellation.forgiven
    charged = kara.cancel(client.sessions[1], "client")
    assert charged.session.state == PAID
    kara.waive_charge(client.sessions[1], "the client was ill")
    # The waiver gave a credit back; it used no forgiveness, and made none available.
    preview = kara.preview(client.sessions[2], "client")
    assert (preview.forgiven, preview.forgiveness_used) == (False, 1)
    # The same client under another programme that forgives has its own count.
    other = programme(kara, free_late_cancellations=1)
    kara.grant_credits(client.client_id, 1, programme_id=other)
    elsewhere = kara.book(client.client_id, "pro-1", clock.now() + timedelta(hours=2), programme_id=other)
    assert kara.preview(elsewhere.session_id, "client").forgiven


def test_the_default_forgives_nothing_and_a_session_keeps_the_terms_it_was_booked_under(
    kara: SessionsClient, clock: FakeClock
) -> None:
    programme_id = programme(kara)
    shown = kara.get_programme(programme_id)
    assert shown.free_late_cancellations == 0
    assert shown.forgiveness_period.ToTimedelta() == timedelta(days=365)
    client = client_with_sessions(kara, clock, programme_id, 2)
    kara.update_programme(programme_id, free_late_cancellations=3)
    newer = kara.book(client.client_id, "pro-1", clock.now() + timedelta(hours=2), programme_id=programme_id)
    preview = kara.preview(client.sessions[0], "client")
    assert (preview.forgiven, preview.forgiveness_used, preview.forgiveness_allowed) == (False, 0, 0)
    assert kara.cancel(client.sessions[0], "client").session.state == PAID
    assert kara.get_session(newer.session_id).terms.free_late_cancellations == 3
    assert kara.cancel(newer.session_id, "client").session.cancellation.forgiven


@pytest.mark.parametrize(
    ("terms", "field"),
    [
        ({"free_late_cancellations": -1}, "programme.free_late_cancellations"),
        ({"free_late_cancellations": 11}, "programme.free_late_cancellations"),
        ({"forgiveness_period": timedelta(hours=12)}, "programme.forgiveness_period"),
        ({"forgiveness_period": timedelta(days=731)}, "programme.forgiveness_period"),
    ],
    ids=["-1 free", "11 free", "half a day", "731 days"],
)
def test_forgiveness_terms_out_of_range_are_refused(
    kara: SessionsClient, server: RunningServer, terms: dict[str, object], field: str
) -> None:
    refused = refuse(
        server,
        lambda: kara.create_programme(f"p-{uuid.uuid4().hex[:8]}", "Bad", WINDOW, **terms),  # type: ignore[arg-type]
        INVALID,
        None,
    )
    assert [f for f, _ in refused.field_violations] == [field]
    programme_id = programme(kara, free_late_cancellations=10, forgiveness_period=timedelta(days=730))
    refuse(server, lambda: kara.update_programme(programme_id, **terms), INVALID, None)  # type: ignore[arg-type]
    shown = kara.get_programme(programme_id)
    assert (shown.free_late_cancellations, shown.forgiveness_period.ToTimedelta()) == (
        10,
        timedelta(days=730),
    )


@pytest.mark.parametrize("database_url", ALL_DATABASES, indirect=True)
@pytest.mark.parametrize("attempt", range(2))
def test_racing_late_cancellations_of_one_client_never_forgive_more_than_n(
    kara: SessionsClient, server: RunningServer, clock: FakeClock, attempt: int
) -> None:
    programme_id = programme(kara, free_late_cancellations=2)
    client = client_with_sessions(kara, clock, programme_id, 6)
    # Each session cancelled twice at once (one of each pair loses: SESSION_NOT_BOOKED).
    results = race(12, lambda i: kara.cancel(client.sessions[i % 6], "client"))
    done = [r for r in results if isinstance(r, pb.CancelSessionResponse)]
    lost = [r for r in results if isinstance(r, KaraError)]
    assert len(done) == 6, results
    assert all(
        e.code == grpc.StatusCode.FAILED_PRECONDITION and e.reason == "SESSION_NOT_BOOKED" for e in lost
    )
    assert sum(r.session.cancellation.forgiven for r in done) == 2
    assert sorted(kara.get_session(s).state for s in client.sessions) == sorted([VOIDED] * 2 + [PAID] * 4)
    # Seven credits: two returned with the spare, four taken.
    assert client.balance(kara) == (3, 0, 4)
    assert_ledger_balances(server)


def test_the_command_line_sets_forgiveness_and_the_preview_says_what_is_left(
    server: RunningServer, kara: SessionsClient, clock: FakeClock
) -> None:
    import json
    import subprocess

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("--target", f"127.0.0.1:{server.port}", *args)

    made = cli("--json", "programme", "create", "kind", "--name", "Kind", "--notice-window-hours", "48",
               "--free-late-cancellations", "2", "--forgiveness-period-days", "90")  # fmt: skip
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert (created["free_late_cancellations"], created["forgiveness_period"]) == (2, 90 * 86400)
    changed = cli("--json", "programme", "update", "kind", "--forgiveness-period-days", "30")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["forgiveness_period"] == 30 * 86400
    assert cli("programme", "update", "kind", "--free-late-cancellations", "11").returncode == 2
    assert cli("programme", "update", "kind", "--forgiveness-period-days", "0.5").returncode == 2
    client = client_with_sessions(kara, clock, "kind", 1)
    preview = cli("--json", "preview", client.sessions[0], "--by", "client")
    assert preview.returncode == 0, preview.stderr
    shown = json.loads(preview.stdout)
    assert (shown["forgiven"], shown["forgiveness_used"], shown["forgiveness_allowed"]) == (True, 0, 2)
    done = cli("cancel", client.sessions[0], "--by", "client")
    assert done.returncode == 0, done.stderr
    assert "forgiven: true" in done.stdout


@pytest.mark.parametrize("database_url", ALL_DATABASES, indirect=True)
def test_forgiven_cancellations_and_bookings_racing_on_one_lot_take_their_locks_in_one_order(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    """A forgiving cancellation holds the session, then the session's lot, then the account
    before counting, the order every move takes them in (a booking: the lot, then the account):
    in another order PostgreSQL broke the tie by aborting one (ABORTED, DATABASE_CONFLICT)."""
    programme_id = programme(kara, free_late_cancellations=10)
    client_id = f"c-{uuid.uuid4().hex[:10]}"
    expires = clock.now() + timedelta(days=10)
    kara.grant_credits(client_id, 40, programme_id=programme_id, expires_at=expires)
    # No retries: an abort (a deadlock PostgreSQL broke) must show, not be retried away.
    once = SessionsClient(f"127.0.0.1:{server.port}", timeout=15, retry=NO_RETRY)
    for attempt in range(3):
        starts = [clock.now() + timedelta(hours=2, minutes=10 * attempt + i) for i in range(6)]
        booked = [kara.book(client_id, "pro-1", at, programme_id=programme_id).session_id for at in starts]
        results = race(
            12,
            lambda i, booked=booked: (
                once.cancel(booked[i // 2], "client")
                if i % 2
                else once.book(
                    client_id, "pro-1", clock.now() + timedelta(days=1, minutes=i), programme_id=programme_id
                )
            ),
        )
        errors = [r for r in results if isinstance(r, KaraError)]
        assert not errors, errors
    once.close()
    # Ten forgiven (the allowance), the other eight charged.
    cancelled = [
        s for s in kara.list_sessions(client_id=client_id, page_size=100).sessions if s.cancellation.late
    ]
    assert sorted(s.cancellation.forgiven for s in cancelled) == [False] * 8 + [True] * 10
    assert_ledger_balances(server)
