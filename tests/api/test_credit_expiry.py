"""Credits that expire (issue 36): GrantCredits' expire_time, an account's lots, bookings held
from the lot that expires soonest among those valid at the session's start, and the server's
expiry of what is left of a lot when its time comes; through real servers on SQLite and
PostgreSQL, with a clock the test moves.

For an account and for each lot: available + held + used + expired = granted
(assert_ledger_balances checks both against the ledger after each test)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import grpc
import pytest
from kara.sessions.v1 import credits_pb2 as cpb
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import NO_RETRY, KaraError, SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer
from kara_sessions_server.entrypoints.maintenance import EXPIRED_LOTS

from ..conftest import ALL_DATABASES
from ..support.clock import FakeClock
from ..support.concurrency import race
from ..support.database import assert_ledger_balances
from ..support.processes import run_cli
from ..support.refusals import INVALID, PRECONDITION, refuse

DAY = timedelta(days=1)
EXPIRED = "kara.sessions.v1.credits.expired"


def client_id() -> str:
    return f"c-{uuid.uuid4().hex[:10]}"


def lots(account: cpb.CreditAccount) -> list[tuple[datetime | None, int, int, int, int, int]]:
    return [
        (
            lot.expire_time.ToDatetime().replace(tzinfo=None) if lot.HasField("expire_time") else None,
            lot.granted,
            lot.available,
            lot.held,
            lot.used,
            lot.expired,
        )
        for lot in account.lots
    ]


def kinds(kara: SessionsClient, client: str) -> list[str]:
    entries = kara.get_credit_account(client, page_size=100).entries
    return [cpb.LedgerEntryKind.Name(e.kind).removeprefix("LEDGER_ENTRY_KIND_") for e in reversed(entries)]


def naive(at: datetime) -> datetime:
    return at.replace(tzinfo=None)


def test_a_booking_holds_from_the_soonest_lot_still_valid_at_its_start(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    client, now = client_id(), clock.now()
    soon, later = now + 10 * DAY, now + 30 * DAY
    kara.grant_credits(client, 1, expires_at=later)
    kara.grant_credits(client, 1)
    kara.grant_credits(client, 1, expires_at=soon)
    granted = kara.grant_credits(client, 1, expires_at=soon)  # the same lot as the one before
    assert lots(granted) == [
        (naive(soon), 2, 2, 0, 0, 0),
        (naive(later), 1, 1, 0, 0, 0),
        (None, 1, 1, 0, 0, 0),
    ]
    # A session in 20 days cannot use the credits that expire in 10: the one of 30 days it is.
    far = kara.book(client, "pro-1", now + 20 * DAY)
    assert naive(far.credit_expire_time.ToDatetime()) == naive(later)
    near = kara.book(client, "pro-1", now + 5 * DAY)
    assert naive(near.credit_expire_time.ToDatetime()) == naive(soon)
    # Past every expiring lot: only the credit that never expires will do.
    never = kara.book(client, "pro-1", now + 40 * DAY)
    assert not never.HasField("credit_expire_time")
    account = kara.get_credit_account(client)
    assert lots(account) == [
        (naive(soon), 2, 1, 1, 0, 0),
        (naive(later), 1, 0, 1, 0, 0),
        (None, 1, 0, 1, 0, 0),
    ]
    assert (account.available, account.held, account.used, account.expired) == (1, 3, 0, 0)
    # What is left expires at 10 days; nothing valid then for a session in 40 days.
    refused = refuse(
        server,
        lambda: kara.book(client, "pro-1", now + 40 * DAY),
        PRECONDITION,
        "CREDITS_EXPIRE_BEFORE_SESSION",
    )
    assert refused.metadata["credit_expire_time"].startswith(soon.date().isoformat())
    assert_ledger_balances(server)


def test_no_credit_at_all_is_insufficient_credits_not_expiry(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    client = client_id()
    kara.grant_credits(client, 1, expires_at=clock.now() + DAY)
    kara.book(client, "pro-1", clock.now() + timedelta(hours=5))
    refuse(
        server,
        lambda: kara.book(client, "pro-1", clock.now() + 2 * DAY),
        PRECONDITION,
        "INSUFFICIENT_CREDITS",
    )


def test_a_lot_expires_at_its_time_leaving_held_credits_to_their_sessions(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    client, now = client_id(), clock.now()
    kara.grant_credits(client, 3, expires_at=now + 2 * DAY)
    session = kara.book(client, "pro-1", now + DAY)
    clock.advance(2 * DAY - timedelta(seconds=1))
    assert server.settler.run_once()[EXPIRED_LOTS] == 0
    clock.advance(timedelta(seconds=1))
    assert server.settler.run_once()[EXPIRED_LOTS] == 1
    account = kara.get_credit_account(client)
    assert (account.available, account.held, account.used, account.expired) == (0, 1, 0, 2)
    assert kinds(kara, client) == ["GRANT", "HOLD", "EXPIRE"]
    [event] = kara.list_events(types=[EXPIRED])
    assert event.subject == client and event.credit_account.expired == 2
    # The held credit went on with its session, which took place.
    kara.complete(session.session_id)
    assert server.settler.run_once()[EXPIRED_LOTS] == 0
    account = kara.get_credit_account(client)
    assert (account.available, account.held, account.used, account.expired) == (0, 0, 1, 2)
    expired = server.metrics.registry.get_sample_value("kara_credits_moved_total", {"kind": "EXPIRE"})
    assert expired == 2
    assert_ledger_balances(server)


def test_a_credit_given_back_to_an_expired_lot_expires_as_it_comes_back(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    client, now = client_id(), clock.now()
    kara.grant_credits(client, 2, expires_at=now + 6 * 3600 * timedelta(seconds=1))
    cancelled = kara.book(client, "pro-1", now + timedelta(hours=2))
    missed = kara.book(client, "pro-1", now + timedelta(hours=3))
    clock.advance(timedelta(hours=4))
    kara.mark_no_show(missed.session_id)  # charged: the credit taken
    clock.advance(timedelta(hours=3))  # the lot's time has passed
    server.settler.run_once()
    # The professional records notice the client gave before the start: voided, given back,
    # and expired at once rather than coming back to life.
    done = kara.cancel(cancelled.session_id, "professional", notified_at=now + timedelta(hours=1))
    assert done.session.state == pb.SESSION_STATE_CANCELLED_VOIDED
    kara.waive_charge(missed.session_id, "the client was ill")
    account = kara.get_credit_account(client)
    assert (account.available, account.held, account.used, account.expired) == (0, 0, 0, 2)
    assert kinds(kara, client) == ["GRANT", "HOLD", "HOLD", "TAKE", "RETURN", "EXPIRE", "REFUND", "EXPIRE"]
    # Nothing was left for the sweep: no credits.expired event; each change told its own.
    assert kara.list_events(types=[EXPIRED]) == []
    assert_ledger_balances(server)


def test_a_move_in_place_past_its_credits_expiry_is_refused_and_a_charged_move_rebooks_validly(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    client, now = client_id(), clock.now()
    kara.grant_credits(client, 1, expires_at=now + 10 * DAY)
    kara.grant_credits(client, 1)
    session = kara.book(client, "pro-1", now + 5 * DAY)
    refused = refuse(
        server,
        lambda: kara.reschedule(session.session_id, now + 12 * DAY, "client"),
        PRECONDITION,
        "CREDITS_EXPIRE_BEFORE_SESSION",
    )
    assert "cancel it and book" in refused.message
    assert (
        kara.reschedule(session.session_id, now + 9 * DAY, "client").session.session_id == session.session_id
    )
    # Late, and charged: the old session's credit is taken; the new booking holds the one that
    # never expires (the lot of 10 days is spent).
    clock.advance(8 * DAY + timedelta(hours=12))
    moved = kara.reschedule(session.session_id, now + 12 * DAY, "client")
    assert moved.HasField("charged") and not moved.session.HasField("credit_expire_time")
    assert_ledger_balances(server)


@pytest.mark.parametrize(
    ("expires_in", "reason"),
    [(timedelta(0), "EXPIRE_TIME_NOT_IN_FUTURE"), (timedelta(days=3654), "EXPIRE_TIME_TOO_FAR")],
    ids=["now", "beyond ten years"],
)
def test_an_expire_time_not_ahead_or_too_far_is_refused(
    kara: SessionsClient, server: RunningServer, clock: FakeClock, expires_in: timedelta, reason: str
) -> None:
    refused = refuse(
        server,
        lambda: kara.grant_credits(client_id(), 1, expires_at=clock.now() + expires_in),
        INVALID,
        reason,
    )
    assert [f for f, _ in refused.field_violations] == ["expire_time"]


def test_two_replicas_expire_each_lot_exactly_once(
    kara: SessionsClient, server: RunningServer, second_replica: RunningServer, clock: FakeClock
) -> None:
    clients = [client_id() for _ in range(6)]
    for n, client in enumerate(clients):
        kara.grant_credits(client, 2, expires_at=clock.now() + DAY + timedelta(minutes=n))
    clock.advance(2 * DAY)
    replicas = [server, second_replica]
    race(4, lambda i: replicas[i % 2].settler.run_once())
    assert sorted(e.subject for e in kara.list_events(types=[EXPIRED])) == sorted(clients)
    for client in clients:
        assert kinds(kara, client) == ["GRANT", "EXPIRE"]
    assert_ledger_balances(server)


@pytest.mark.parametrize("database_url", ALL_DATABASES, indirect=True)
def test_racing_bookings_never_overdraw_a_lot(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    client = client_id()
    kara.grant_credits(client, 3, expires_at=clock.now() + 3 * DAY)
    kara.grant_credits(client, 2, expires_at=clock.now() + 10 * DAY)
    results = race(8, lambda i: kara.book(client, "pro-1", clock.now() + DAY + timedelta(minutes=i)))
    booked = [r for r in results if isinstance(r, pb.Session)]
    refused = [r for r in results if isinstance(r, KaraError)]
    assert len(booked) == 5 and len(refused) == 3, results
    assert all(e.code == grpc.StatusCode.FAILED_PRECONDITION for e in refused)
    # The three that expire first went first.
    assert lots(kara.get_credit_account(client))[0][2:4] == (0, 3)
    assert_ledger_balances(server)


def test_the_command_line_grants_credits_that_expire(server: RunningServer) -> None:
    import json

    client = client_id()
    granted = run_cli(
        "--target", f"127.0.0.1:{server.port}", "--json", "credits", "grant", client, "3", "--expires", "+30d"
    )
    assert granted.returncode == 0, granted.stderr
    [lot] = json.loads(granted.stdout)["lots"]
    assert lot["granted"] == 3 and lot["expire_time"]


@pytest.mark.parametrize("database_url", ALL_DATABASES, indirect=True)
def test_grants_and_bookings_racing_on_one_lot_take_their_locks_in_one_order(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    """A grant to a lot and a booking from it lock the lot and then the account, as every move
    does (a lot's UPDATE before its account's): in the other order, PostgreSQL broke the tie
    by aborting one of them (ABORTED, DATABASE_CONFLICT)."""
    client, expires = client_id(), clock.now() + 10 * DAY
    kara.grant_credits(client, 2, expires_at=expires)
    # No retries: an abort (a deadlock PostgreSQL broke) must show, not be retried away.
    once = SessionsClient(f"127.0.0.1:{server.port}", timeout=15, retry=NO_RETRY)
    for attempt in range(3):
        results = race(
            12,
            lambda i, attempt=attempt: (
                once.grant_credits(client, 1, expires_at=expires)
                if i % 2
                else once.book(client, "pro-1", clock.now() + DAY + timedelta(minutes=100 * attempt + i))
            ),
        )
        errors = [r for r in results if isinstance(r, KaraError)]
        assert all(e.reason == "INSUFFICIENT_CREDITS" for e in errors), errors
    once.close()
    assert_ledger_balances(server)


@pytest.mark.parametrize("database_url", ALL_DATABASES, indirect=True)
def test_charged_moves_between_lots_and_cancellations_racing_take_their_locks_in_one_order(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    """A charged late move takes the old session's credit in its lot and holds a new one from
    another (the old lot expires before the new start): it holds the old lot before anything of
    the account's, as a cancellation of another session in that lot does."""
    client, now = client_id(), clock.now()
    kara.grant_credits(client, 40, expires_at=now + 3 * DAY)
    kara.grant_credits(client, 40, expires_at=now + 10 * DAY)
    # No retries: an abort (a deadlock PostgreSQL broke) must show, not be retried away.
    once = SessionsClient(f"127.0.0.1:{server.port}", timeout=15, retry=NO_RETRY)
    for attempt in range(4):
        booked = [
            kara.book(client, "pro-1", now + timedelta(hours=2, minutes=10 * attempt + i)).session_id
            for i in range(8)
        ]
        results = race(
            8,
            lambda i, booked=booked: (
                once.reschedule(booked[i], now + 5 * DAY + timedelta(minutes=i), "client")
                if i % 2
                else once.cancel(booked[i], "client")
            ),
        )
        errors = [r for r in results if isinstance(r, KaraError)]
        assert not errors, errors
    once.close()
    moved = kara.list_sessions(client_id=client, page_size=100).sessions
    assert {naive(s.credit_expire_time.ToDatetime()) for s in moved if s.rescheduled_from} == {
        naive(now + 10 * DAY)
    }
    assert_ledger_balances(server)
