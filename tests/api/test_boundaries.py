"""Notice boundaries with an injected clock: exactly 24 h, 24 h +/- 1 s, after the start, and
notified_at edge cases."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import KaraError, SessionsClient

from ..support.booking import book
from ..support.clock import FakeClock

H24 = timedelta(hours=24)
SECOND = timedelta(seconds=1)


@pytest.mark.parametrize(
    ("notice", "expected"),
    [
        (H24 + SECOND, pb.SESSION_STATE_CANCELLED_VOIDED),
        # The article leaves exactly 24 h open; we count it as enough notice (client's favour).
        (H24, pb.SESSION_STATE_CANCELLED_VOIDED),
        (H24 - SECOND, pb.SESSION_STATE_CANCELLED_PAID),
        (SECOND, pb.SESSION_STATE_CANCELLED_PAID),
    ],
    ids=["24h+1s-voided", "exactly-24h-voided", "24h-1s-paid", "1s-before-start-paid"],
)
def test_client_notice_boundary(
    kara: SessionsClient, clock: FakeClock, notice: timedelta, expected: int
) -> None:
    session_id = book(kara, clock, starts_in=timedelta(days=3))
    clock.advance(timedelta(days=3) - notice)
    result = kara.cancel(session_id, "client")
    assert result.session.state == expected
    assert result.session.cancellation.notice_seconds == int(notice.total_seconds())


def test_professional_may_charge_at_24h_minus_1s_but_not_at_exactly_24h(
    kara: SessionsClient, clock: FakeClock
) -> None:
    late_id = book(kara, clock, starts_in=timedelta(days=3), client_id="a")
    on_time_id = book(kara, clock, starts_in=timedelta(days=3) + SECOND, client_id="b")
    clock.advance(timedelta(days=3) - H24 + SECOND)
    assert (
        kara.cancel(late_id, "professional", charge_client=True).session.state
        == pb.SESSION_STATE_CANCELLED_PAID
    )
    with pytest.raises(KaraError) as refused:
        kara.cancel(on_time_id, "professional", charge_client=True)
    assert refused.value.reason == "CHARGE_NOT_ALLOWED_WITH_NOTICE"


def test_cancelling_at_or_after_the_start_is_refused(kara: SessionsClient, clock: FakeClock) -> None:
    session_id = book(kara, clock, starts_in=timedelta(hours=2))
    for offset in (timedelta(0), timedelta(minutes=5)):
        clock.set(
            kara.get_session(session_id).starts_at.ToDatetime().replace(tzinfo=clock.now().tzinfo) + offset
        )
        with pytest.raises(KaraError) as refused:
            kara.cancel(session_id, "client")
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.reason == "SESSION_ALREADY_STARTED"
    assert kara.get_session(session_id).state == pb.SESSION_STATE_BOOKED


def test_professional_records_after_the_start_a_notice_given_before_it(
    kara: SessionsClient, clock: FakeClock
) -> None:
    """Scenario 1: the client's email arrived 5 h before the session; the professional records
    the cancellation only after the session's start time."""
    session_id = book(kara, clock, starts_in=timedelta(days=2))
    emailed_at = clock.now() + timedelta(days=2) - timedelta(hours=5)
    clock.advance(timedelta(days=2, hours=1))
    result = kara.cancel(session_id, "professional", charge_client=True, notified_at=emailed_at)
    assert result.session.state == pb.SESSION_STATE_CANCELLED_PAID
    assert result.session.cancellation.notice_seconds == 5 * 3600
    assert (
        result.session.cancellation.notified_at.ToDatetime().replace(tzinfo=emailed_at.tzinfo) == emailed_at
    )


def test_notified_at_gives_enough_notice_even_when_recorded_late(
    kara: SessionsClient, clock: FakeClock
) -> None:
    session_id = book(kara, clock, starts_in=timedelta(days=3))
    emailed_at = clock.now() + timedelta(days=1)  # 48 h before the start
    clock.advance(timedelta(days=3) - timedelta(hours=2))
    with pytest.raises(KaraError) as refused:
        kara.cancel(session_id, "professional", charge_client=True, notified_at=emailed_at)
    assert refused.value.reason == "CHARGE_NOT_ALLOWED_WITH_NOTICE"
    result = kara.cancel(session_id, "professional", notified_at=emailed_at)
    assert result.session.state == pb.SESSION_STATE_CANCELLED_VOIDED
    assert result.session.cancellation.notice_seconds == 48 * 3600


@pytest.mark.parametrize(
    ("notified", "reason"),
    [
        (lambda booked, now, start: now + SECOND, "NOTIFIED_AT_IN_FUTURE"),
        (lambda booked, now, start: booked - SECOND, "NOTIFIED_AT_BEFORE_BOOKING"),
    ],
    ids=["one-second-in-the-future", "one-second-before-booking"],
)
def test_notified_at_out_of_range_is_invalid(
    kara: SessionsClient, clock: FakeClock, notified, reason
) -> None:  # type: ignore[no-untyped-def]
    booked = clock.now()
    session_id = book(kara, clock, starts_in=timedelta(days=3))
    clock.advance(timedelta(days=1))
    with pytest.raises(KaraError) as refused:
        kara.cancel(session_id, "professional", notified_at=notified(booked, clock.now(), None))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.reason == reason
    assert [f for f, _ in refused.value.field_violations] == ["notified_at"]


def test_notified_at_exactly_now_and_exactly_at_booking_are_accepted(
    kara: SessionsClient, clock: FakeClock
) -> None:
    booked = clock.now()
    first = book(kara, clock, starts_in=timedelta(days=3), client_id="a")
    second = book(kara, clock, starts_in=timedelta(days=3), client_id="b")
    clock.advance(timedelta(hours=1))
    at_booking = kara.cancel(first, "professional", notified_at=booked)
    assert at_booking.session.cancellation.notice_seconds == 3 * 24 * 3600
    assert (
        kara.cancel(second, "professional", notified_at=clock.now()).session.state
        == pb.SESSION_STATE_CANCELLED_VOIDED
    )


def test_complete_only_once_started(kara: SessionsClient, clock: FakeClock) -> None:
    session_id = book(kara, clock, starts_in=timedelta(hours=1))
    clock.advance(timedelta(hours=1) - SECOND)
    with pytest.raises(KaraError) as refused:
        kara.complete(session_id)
    assert refused.value.reason == "SESSION_NOT_STARTED"
    clock.advance(SECOND)
    assert kara.complete(session_id).state == pb.SESSION_STATE_COMPLETED
    payment = kara.get_payment(session_id)
    assert (payment.state, payment.section) == (pb.PAYMENT_STATE_PAID, pb.PAYMENT_SECTION_PAID)
    account = kara.get_credit_account("client-1")
    assert (account.available, account.held, account.used) == (0, 0, 1)


def test_notice_window_is_configuration(database_url: str, clock: FakeClock) -> None:
    from kara_sessions_server.entrypoints.grpc.server import Settings, start

    running = start(
        Settings(listen="127.0.0.1:0", database_url=database_url, notice_window=timedelta(hours=48)),
        clock=clock,
    )
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            session_id = book(kara, clock, starts_in=timedelta(days=5))
            clock.advance(timedelta(days=5) - timedelta(hours=30))
            assert kara.cancel(session_id, "client").session.state == pb.SESSION_STATE_CANCELLED_PAID
    finally:
        running.stop(1)
