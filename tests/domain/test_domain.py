"""The policy and the state machine on their own: no server, no database."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from kara_sessions_server.domain import session_lifecycle as lifecycle
from kara_sessions_server.domain.errors import ChargeNotAllowedWithNotice, InvalidRequest, SessionNotBooked
from kara_sessions_server.domain.model import (
    CancelSession,
    LedgerKind,
    Party,
    PaymentState,
    Session,
    SessionState,
)
from kara_sessions_server.domain.policy import CancellationPolicy
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
    outcome = SessionLifecycle(CancellationPolicy()).cancel(_session(notice), _cancel(by, charge), NOW)
    assert (outcome.session_state, outcome.payment_state, outcome.credit_move) == (state, payment, move)
    assert outcome.cancellation.notice == notice


def test_charge_with_notice_is_refused_by_the_policy() -> None:
    with pytest.raises(ChargeNotAllowedWithNotice):
        SessionLifecycle(CancellationPolicy()).cancel(
            _session(timedelta(hours=24)), _cancel(Party.PROFESSIONAL, True), NOW
        )


def test_state_check_comes_before_the_policy() -> None:
    """A session that is not BOOKED says so, rather than complaining about its notice."""
    cancelled = _session(timedelta(hours=-1), SessionState.CANCELLED_VOIDED)
    with pytest.raises(SessionNotBooked):
        SessionLifecycle(CancellationPolicy()).cancel(cancelled, _cancel(Party.PROFESSIONAL, True), NOW)


def test_request_rules_need_no_session() -> None:
    policy = CancellationPolicy()
    with pytest.raises(InvalidRequest):
        policy.validate_request(_cancel(Party.CLIENT, charge=True), NOW)
    with pytest.raises(InvalidRequest):
        policy.validate_request(_cancel(Party.CLIENT, notified_at=NOW), NOW)
    with pytest.raises(InvalidRequest):
        policy.validate_request(_cancel(Party.PROFESSIONAL, notified_at=NOW + timedelta(microseconds=1)), NOW)


def test_one_machine_serves_every_session_and_keeps_none() -> None:
    machine = lifecycle._MACHINE
    lc = SessionLifecycle(CancellationPolicy())
    for hours in (1, 30):
        lc.cancel(_session(timedelta(hours=hours)), _cancel(Party.CLIENT), NOW)
    with pytest.raises(SessionNotBooked):
        lc.complete(_session(timedelta(hours=-1), SessionState.COMPLETED), NOW)
    assert lifecycle._MACHINE is machine
    assert machine.models == []  # each event is fired on a model the machine never holds


def test_threads_firing_on_the_shared_machine_at_once_each_get_their_own_outcome() -> None:
    """The Machine is shared by every worker thread: a late and an early cancellation decided at
    the same moment must not see each other's model."""
    lc = SessionLifecycle(CancellationPolicy())
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
