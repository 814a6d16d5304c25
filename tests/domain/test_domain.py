"""The policy and the state machine on their own: no server, no database."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from kara_sessions_server.domain import session_lifecycle as lifecycle
from kara_sessions_server.domain.errors import (
    ChargeNotAllowedWithNotice,
    InvalidRequest,
    LateRescheduleNotAllowed,
    SessionNotBooked,
)
from kara_sessions_server.domain.model import (
    CancelSession,
    LedgerKind,
    Party,
    PaymentState,
    RescheduleSession,
    Session,
    SessionState,
)
from kara_sessions_server.domain.policy import NoticePolicy
from kara_sessions_server.domain.programme import DEFAULT_TERMS, LateReschedule
from kara_sessions_server.domain.session_lifecycle import SessionLifecycle

NOW = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)


def _session(starts_in: timedelta, state: SessionState = SessionState.BOOKED) -> Session:
    return Session("s-1", "c", "p", NOW + starts_in, NOW - timedelta(days=7), NOW, state, 1)


def _cancel(by: Party, charge: bool = False, notified_at: datetime | None = None) -> CancelSession:
    return CancelSession("s-1", by, charge, notified_at, "", "r")


# (who, notice, charge box) -> (session state, payment state, credit movement): the article's table.
ARTICLE = [
    (
        Party.CLIENT,
        timedelta(hours=25),
        False,
        SessionState.CANCELLED_VOIDED,
        PaymentState.VOIDED,
        LedgerKind.RETURN,
    ),
    (
        Party.PROFESSIONAL,
        timedelta(hours=25),
        False,
        SessionState.CANCELLED_VOIDED,
        PaymentState.VOIDED,
        LedgerKind.RETURN,
    ),
    (
        Party.CLIENT,
        timedelta(hours=23),
        False,
        SessionState.CANCELLED_PAID,
        PaymentState.PAID,
        LedgerKind.TAKE,
    ),
    (
        Party.PROFESSIONAL,
        timedelta(hours=23),
        True,
        SessionState.CANCELLED_PAID,
        PaymentState.PAID,
        LedgerKind.TAKE,
    ),
    (
        Party.PROFESSIONAL,
        timedelta(hours=23),
        False,
        SessionState.CANCELLED_VOIDED,
        PaymentState.VOIDED,
        LedgerKind.RETURN,
    ),
]


@pytest.mark.parametrize(("by", "notice", "charge", "state", "payment", "move"), ARTICLE)
def test_article_table(by, notice, charge, state, payment, move) -> None:  # type: ignore[no-untyped-def]
    outcome = SessionLifecycle(NoticePolicy()).cancel(_session(notice), _cancel(by, charge), NOW)
    assert (outcome.session_state, outcome.payment_state, outcome.credit_move) == (state, payment, move)
    assert outcome.cancellation.notice == notice


def test_charge_with_notice_is_refused_by_the_policy() -> None:
    with pytest.raises(ChargeNotAllowedWithNotice):
        SessionLifecycle(NoticePolicy()).cancel(
            _session(timedelta(hours=24)), _cancel(Party.PROFESSIONAL, True), NOW
        )


def test_state_check_comes_before_the_policy() -> None:
    """A session that is not BOOKED says so, rather than complaining about its notice."""
    cancelled = _session(timedelta(hours=-1), SessionState.CANCELLED_VOIDED)
    with pytest.raises(SessionNotBooked):
        SessionLifecycle(NoticePolicy()).cancel(cancelled, _cancel(Party.PROFESSIONAL, True), NOW)


def test_request_rules_need_no_session() -> None:
    policy = NoticePolicy()
    with pytest.raises(InvalidRequest):
        policy.validate_request(_cancel(Party.CLIENT, charge=True), NOW)
    with pytest.raises(InvalidRequest):
        policy.validate_request(_cancel(Party.CLIENT, notified_at=NOW), NOW)
    with pytest.raises(InvalidRequest):
        policy.validate_request(_cancel(Party.PROFESSIONAL, notified_at=NOW + timedelta(microseconds=1)), NOW)


def test_one_machine_serves_every_session_and_keeps_none() -> None:
    machine = lifecycle._MACHINE
    lc = SessionLifecycle(NoticePolicy())
    for hours in (1, 30):
        lc.cancel(_session(timedelta(hours=hours)), _cancel(Party.CLIENT), NOW)
    with pytest.raises(SessionNotBooked):
        lc.complete(_session(timedelta(hours=-1), SessionState.COMPLETED), NOW)
    assert lifecycle._MACHINE is machine
    assert machine.models == []  # each event is fired on a model the machine never holds


def test_threads_firing_on_the_shared_machine_at_once_each_get_their_own_outcome() -> None:
    """The Machine is shared by every worker thread: a late and an early cancellation decided at
    the same moment must not see each other's model."""
    lc = SessionLifecycle(NoticePolicy())
    late, early = _session(timedelta(hours=1)), _session(timedelta(hours=30))
    start = threading.Barrier(8)

    def decide(i: int) -> list[tuple[bool, SessionState]]:
        start.wait()
        session = late if i % 2 else early
        outcomes = [lc.cancel(session, _cancel(Party.CLIENT), NOW) for _ in range(300)]
        return [(i % 2 == 1, o.session_state) for o in outcomes]

    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(decide, range(8)) for r in rs]
    expected = {True: SessionState.CANCELLED_PAID, False: SessionState.CANCELLED_VOIDED}
    assert [state for _, state in results] == [expected[was_late] for was_late, _ in results]


# --- reschedules and the grace after booking (issue 25) ---------------------------------------


def _move(by: Party, starts_in: timedelta, charge: bool = False) -> RescheduleSession:
    return RescheduleSession("s-1", NOW + starts_in + timedelta(days=1), by, charge, None, "", "r")


def _terms_session(starts_in: timedelta, late: LateReschedule, grace: timedelta = timedelta(0)) -> Session:
    terms = replace(DEFAULT_TERMS, late_reschedule=late, cancellation_grace=grace)
    return replace(_session(starts_in), terms=terms)


# (who, box, late, the terms' late_reschedule) -> charged, or the refusal: the reschedule table.
MOVES = [
    (Party.CLIENT, False, False, LateReschedule.CHARGE, False),
    (Party.PROFESSIONAL, False, False, LateReschedule.CHARGE, False),
    (Party.PROFESSIONAL, True, False, LateReschedule.CHARGE, ChargeNotAllowedWithNotice),
    (Party.PROFESSIONAL, False, True, LateReschedule.CHARGE, False),
    (Party.PROFESSIONAL, True, True, LateReschedule.REFUSED, True),
    (Party.CLIENT, False, True, LateReschedule.CHARGE, True),
    (Party.CLIENT, False, True, LateReschedule.FREE, False),
    (Party.CLIENT, False, True, LateReschedule.REFUSED, LateRescheduleNotAllowed),
    (Party.CLIENT, True, True, LateReschedule.CHARGE, InvalidRequest),
]


@pytest.mark.parametrize(("by", "charge", "late", "rule", "expected"), MOVES)
def test_reschedule_table(
    by: Party, charge: bool, late: bool, rule: LateReschedule, expected: object
) -> None:
    starts_in = timedelta(hours=23 if late else 24)
    session = _terms_session(starts_in, rule)
    machine = SessionLifecycle(NoticePolicy())
    if isinstance(expected, type):
        with pytest.raises(expected):
            machine.reschedule(session, _move(by, starts_in, charge), NOW)
        return
    outcome = machine.reschedule(session, _move(by, starts_in, charge), NOW)
    assert (outcome.charged, outcome.move.late) == (expected, late)
    assert (outcome.cancellation is not None) == expected
    if not expected:
        moved = lifecycle.moved(session, outcome.move, NOW)
        assert (moved.session_id, moved.state, moved.starts_at, moved.moves) == (
            "s-1",
            SessionState.BOOKED,
            outcome.move.to_starts_at,
            (outcome.move,),
        )


def test_only_a_booked_session_moves() -> None:
    with pytest.raises(SessionNotBooked):
        SessionLifecycle(NoticePolicy()).reschedule(
            _session(timedelta(days=2), SessionState.CANCELLED_VOIDED),
            _move(Party.CLIENT, timedelta(days=2)),
            NOW,
        )


@pytest.mark.parametrize(
    ("since_booking", "by", "within"),
    [
        (timedelta(minutes=15), Party.CLIENT, True),
        (timedelta(minutes=15, microseconds=1), Party.CLIENT, False),
        (timedelta(minutes=1), Party.PROFESSIONAL, False),
    ],
)
def test_the_grace_after_booking(since_booking: timedelta, by: Party, within: bool) -> None:
    session = replace(
        _terms_session(timedelta(hours=2), LateReschedule.CHARGE, timedelta(minutes=15)),
        booked_at=NOW - since_booking,
    )
    notice = NoticePolicy().assess(session, _cancel(by), NOW)
    assert (notice.within_grace, notice.late) == (within, not within)
