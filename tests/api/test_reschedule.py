"""RescheduleSession, PreviewReschedule and cancellation_grace (issue 25), end to end through the
gRPC server on SQLite and PostgreSQL.

Every row of the reschedule table, under 24, 48 and 72 hour programmes, at the window and one
second either side; each refusal proved to change nothing (sessions, payments, accounts, ledger,
events), each success checked against the session, its payment, the account, the ledger and the
feed. Then the grace after booking, the spare credit a charged move needs, moves kept on the
session, replays, authorization and races."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from kara.sessions.v1 import credits_pb2 as cpb
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import KaraError, SessionsClient
from kara_sessions_client.invoice_export import WHY_PAID, write_csv
from kara_sessions_server.entrypoints.grpc.server import RunningServer

from ..support.clock import FakeClock
from ..support.concurrency import race
from ..support.database import assert_ledger_balances
from ..support.refusals import INVALID, PRECONDITION, refuse
from ..support.tokens import secured_server

RESCHEDULED = "kara.sessions.v1.session.rescheduled"
SECOND = timedelta(seconds=1)


@dataclass(frozen=True)
class Row:
    by: str
    charge_client: bool
    late: bool
    # The programme's terms the session was booked under.
    late_reschedule: str = "charge"
    professional_may_charge_late: bool = True
    # "moved", "charged", or the refusal's reason.
    expect: str = "moved"


ROWS = {
    "client, enough notice, box clear: moved in place": Row("client", False, False),
    "professional, enough notice, box clear: moved in place": Row("professional", False, False),
    "professional, enough notice, box ticked: refused": Row(
        "professional", True, False, expect="CHARGE_NOT_ALLOWED_WITH_NOTICE"
    ),
    "professional, late, box clear: moved in place, free": Row("professional", False, True),
    "professional, late, box ticked: charged": Row("professional", True, True, expect="charged"),
    "professional, late, box ticked, programme forbids late charges: refused": Row(
        "professional",
        True,
        True,
        professional_may_charge_late=False,
        expect="CHARGE_NOT_ALLOWED_BY_PROGRAMME",
    ),
    "client, late, late_reschedule CHARGE: charged": Row("client", False, True, expect="charged"),
    "client, late, late_reschedule FREE: moved in place": Row("client", False, True, late_reschedule="free"),
    "client, late, late_reschedule REFUSED: refused": Row(
        "client", False, True, late_reschedule="refused", expect="LATE_RESCHEDULE_NOT_ALLOWED"
    ),
    "client ticks the box with enough notice: invalid": Row(
        "client", True, False, expect="CLIENT_CANNOT_CHARGE"
    ),
    "client ticks the box late: invalid": Row("client", True, True, expect="CLIENT_CANNOT_CHARGE"),
}
# Enough notice is tested at the window and a second more; late, a second less.
OFFSETS = {False: (timedelta(0), SECOND), True: (-SECOND,)}


def utc(stamp: Any) -> datetime:
    return stamp.ToDatetime().replace(tzinfo=UTC)


def new_programme(
    kara: SessionsClient,
    window: timedelta,
    *,
    late_reschedule: str = "charge",
    may_charge_late: bool = True,
    grace: timedelta = timedelta(0),
) -> str:
    programme_id = f"p-{uuid.uuid4().hex[:10]}"
    kara.create_programme(
        programme_id,
        f"{window} {late_reschedule}",
        window,
        professional_may_charge_late=may_charge_late,
        late_reschedule=late_reschedule,
        cancellation_grace=grace,
    )
    return programme_id


@dataclass
class Booked:
    session_id: str
    client_id: str
    programme_id: str
    starts_at: datetime


def book_with_notice(
    kara: SessionsClient, clock: FakeClock, programme_id: str, notice: timedelta, credits: int = 2
) -> Booked:
    """A session booked an hour before now, starting `notice` after now (the clock moved on)."""
    client_id = f"c-{uuid.uuid4().hex[:10]}"
    kara.grant_credits(client_id, credits, programme_id=programme_id)
    starts_at = clock.now() + timedelta(hours=1) + notice
    session = kara.book(client_id, "pro-1", starts_at, programme_id=programme_id)
    clock.advance(timedelta(hours=1))
    return Booked(session.session_id, client_id, programme_id, starts_at)


def balance(kara: SessionsClient, b: Booked) -> tuple[int, int, int]:
    account = kara.get_credit_account(b.client_id, programme_id=b.programme_id)
    return account.available, account.held, account.used


def kinds(kara: SessionsClient, b: Booked) -> list[tuple[str, str]]:
    """(kind, session_id) of the account's entries, oldest first."""
    entries = kara.get_credit_account(b.client_id, programme_id=b.programme_id, page_size=100).entries
    return [(cpb.LedgerEntryKind.Name(e.kind)[len("LEDGER_ENTRY_KIND_") :], e.session_id) for e in entries][
        ::-1
    ]


def rescheduled_events(kara: SessionsClient) -> list[Any]:
    return kara.list_events(types=[RESCHEDULED], page_size=1000)


@pytest.mark.parametrize("hours", [24, 48, 72])
def test_every_row_of_the_reschedule_table(
    kara: SessionsClient, server: RunningServer, clock: FakeClock, hours: int
) -> None:
    window = timedelta(hours=hours)
    programmes: dict[tuple[str, bool], str] = {}
    for name, row in ROWS.items():
        key = (row.late_reschedule, row.professional_may_charge_late)
        if key not in programmes:
            programmes[key] = new_programme(
                kara,
                window,
                late_reschedule=row.late_reschedule,
                may_charge_late=row.professional_may_charge_late,
            )
        for offset in OFFSETS[row.late]:
            case = f"{name} ({hours} h, notice = window {offset.total_seconds():+.0f} s)"
            b = book_with_notice(kara, clock, programmes[key], window + offset)
            check_row(kara, server, b, row, window + offset, case)
    assert_ledger_balances(server)


def check_row(
    kara: SessionsClient, server: RunningServer, b: Booked, row: Row, notice: timedelta, case: str
) -> None:
    new_start = b.starts_at + timedelta(days=2)
    events_before = len(rescheduled_events(kara))

    def move() -> pb.RescheduleSessionResponse:
        return kara.reschedule(
            b.session_id, new_start, row.by, charge_client=row.charge_client, reason=case[:50]
        )

    def preview() -> pb.PreviewRescheduleResponse:
        return kara.preview_reschedule(b.session_id, new_start, row.by, charge_client=row.charge_client)

    if row.expect not in ("moved", "charged"):
        code = INVALID if row.expect == "CLIENT_CANNOT_CHARGE" else PRECONDITION
        refuse(server, preview, code, row.expect)
        refuse(server, move, code, row.expect)
        assert balance(kara, b) == (1, 1, 0), case
        return

    predicted = preview()
    done = move()
    charged = row.expect == "charged"
    outcome = pb.RESCHEDULE_OUTCOME_CHARGED if charged else pb.RESCHEDULE_OUTCOME_MOVED
    assert (predicted.outcome, predicted.late, predicted.notice_seconds) == (
        outcome,
        row.late,
        int(notice.total_seconds()),
    ), case
    assert (predicted.credits_taken, predicted.credits_held) == ((1, 1) if charged else (0, 0)), case
    assert done.session.state == pb.SESSION_STATE_BOOKED and utc(done.session.starts_at) == new_start, case
    events = rescheduled_events(kara)
    assert len(events) == events_before + 1, f"{case}: one event per committed reschedule"
    event = events[-1].session_changed
    assert event.session == done.session, case

    if not charged:
        assert done.session.session_id == b.session_id and not done.HasField("charged"), case
        (last,) = done.session.moves
        assert (utc(last.from_starts_at), utc(last.to_starts_at), last.notice_seconds, last.late) == (
            b.starts_at,
            new_start,
            int(notice.total_seconds()),
            row.late,
        ), case
        assert last.moved_by == pb.Party.Value(f"PARTY_{row.by.upper()}"), case
        payment = kara.get_payment(b.session_id)
        assert payment.state == pb.PAYMENT_STATE_PENDING and utc(payment.session_starts_at) == new_start, case
        assert balance(kara, b) == (1, 1, 0), f"{case}: a move in place keeps the credit held"
        assert kinds(kara, b) == [("GRANT", ""), ("HOLD", b.session_id)], case
        assert not event.HasField("charged"), case
        return

    old, new = done.charged, done.session
    assert old.session_id == b.session_id != new.session_id, case
    assert (old.state, old.rescheduled_to, new.rescheduled_from) == (
        pb.SESSION_STATE_CANCELLED_PAID,
        new.session_id,
        b.session_id,
    ), case
    assert old.cancellation.late and utc(old.starts_at) == b.starts_at, case
    assert (new.programme_id, new.client_id, new.professional_id) == (b.programme_id, b.client_id, "pro-1"), (
        case
    )
    payment = kara.get_payment(b.session_id)
    reason = "CLIENT_LATE_RESCHEDULE" if row.by == "client" else "CHARGED_LATE_RESCHEDULE"
    assert (payment.state, payment.section, pb.PaidReason.Name(payment.paid_reason)) == (
        pb.PAYMENT_STATE_PAID,
        pb.PAYMENT_SECTION_PAID,
        f"PAID_REASON_{reason}",
    ), case
    assert kara.get_payment(new.session_id).state == pb.PAYMENT_STATE_PENDING, case
    assert balance(kara, b) == (0, 1, 1), f"{case}: one credit taken, a new one held"
    assert kinds(kara, b) == [
        ("GRANT", ""),
        ("HOLD", b.session_id),
        ("HOLD", new.session_id),
        ("TAKE", b.session_id),
    ], case
    assert (event.charged, event.charged_payment.state) == (old, pb.PAYMENT_STATE_PAID), case
    listed = kara.list_payments("pro-1", "paid", page_size=1000).payments
    assert b.session_id in [p.session_id for p in listed], f"{case}: invoiceable, in the Paid section"


def test_a_charged_move_needs_a_spare_credit_and_changes_nothing_without_one(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    programme_id = new_programme(kara, timedelta(hours=24))
    b = book_with_notice(kara, clock, programme_id, timedelta(hours=3), credits=1)
    new_start = b.starts_at + timedelta(days=1)
    for call in (
        lambda: kara.preview_reschedule(b.session_id, new_start, "client"),
        lambda: kara.reschedule(b.session_id, new_start, "client"),
    ):
        refused = refuse(server, call, PRECONDITION, "INSUFFICIENT_CREDITS")
        assert "book the session again" in refused.message
    assert balance(kara, b) == (0, 1, 0)
    # The client may still cancel it (late: the credit is taken), or move it with a credit.
    kara.grant_credits(b.client_id, 1, programme_id=programme_id)
    assert kara.reschedule(b.session_id, new_start, "client").HasField("charged")


def test_only_a_booked_session_in_the_future_moves_to_a_new_future_start(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    programme_id = new_programme(kara, timedelta(hours=24))
    b = book_with_notice(kara, clock, programme_id, timedelta(days=3))
    later = b.starts_at + timedelta(days=1)
    cases: list[tuple[Callable[[], Any], grpc.StatusCode, str]] = [
        (
            lambda: kara.reschedule(b.session_id, clock.now() - SECOND, "client"),
            INVALID,
            "STARTS_AT_NOT_IN_FUTURE",
        ),
        (lambda: kara.reschedule(b.session_id, b.starts_at, "client"), INVALID, "STARTS_AT_UNCHANGED"),
        (
            lambda: kara.reschedule(b.session_id, clock.now() + timedelta(days=731), "client"),
            INVALID,
            "STARTS_AT_BEYOND_HORIZON",
        ),
        (
            lambda: kara.reschedule(b.session_id, later, "client", notified_at=clock.now()),
            INVALID,
            "NOTIFIED_AT_NOT_ALLOWED",
        ),
        (
            lambda: kara.reschedule(b.session_id, later, "professional", notified_at=clock.now() + SECOND),
            INVALID,
            "NOTIFIED_AT_IN_FUTURE",
        ),
        (lambda: kara.reschedule("no-such-session", later, "client"), grpc.StatusCode.NOT_FOUND, ""),
    ]
    for call, code, reason in cases:
        refuse(server, call, code, reason or None)
    kara.cancel(b.session_id, "client")
    refuse(server, lambda: kara.reschedule(b.session_id, later, "client"), PRECONDITION, "SESSION_NOT_BOOKED")

    # After the start, only a professional who was told before it may move it (free: their box is clear).
    late = book_with_notice(kara, clock, programme_id, timedelta(hours=2))
    clock.advance(timedelta(hours=3))
    move = lambda: kara.reschedule(late.session_id, clock.now() + timedelta(days=1), "professional")  # noqa: E731
    refuse(server, move, PRECONDITION, "SESSION_ALREADY_STARTED")
    told = late.starts_at - timedelta(hours=1)
    moved = kara.reschedule(
        late.session_id, clock.now() + timedelta(days=1), "professional", notified_at=told
    ).session
    assert moved.session_id == late.session_id and moved.moves[0].notice_seconds == 3600


def test_moves_are_kept_and_later_notice_is_measured_from_the_new_start(
    kara: SessionsClient, clock: FakeClock
) -> None:
    programme_id = new_programme(kara, timedelta(hours=24))
    b = book_with_notice(kara, clock, programme_id, timedelta(days=3))
    first = b.starts_at - timedelta(days=2, hours=12)  # 12 hours from now
    moved = kara.reschedule(b.session_id, first, "client", reason="earlier, please").session
    assert utc(moved.starts_at) == first
    # Now the start is 12 hours away: a client's move is late and, under CHARGE, charged.
    preview = kara.preview_reschedule(b.session_id, first + timedelta(days=1), "client")
    assert (preview.outcome, preview.late, preview.notice_seconds) == (
        pb.RESCHEDULE_OUTCOME_CHARGED,
        True,
        12 * 3600,
    )
    # The professional's own late move is free, and kept after the first.
    again = kara.reschedule(b.session_id, first + timedelta(days=1), "professional").session
    assert [(utc(m.from_starts_at), utc(m.to_starts_at), m.late, m.reason) for m in again.moves] == [
        (b.starts_at, first, False, "earlier, please"),
        (first, first + timedelta(days=1), True, ""),
    ]
    assert kara.get_session(b.session_id) == again
    assert [s.session_id for s in kara.list_sessions(client_id=b.client_id).sessions] == [b.session_id]


def test_a_reschedule_replays_and_a_reused_request_id_is_refused(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    programme_id = new_programme(kara, timedelta(hours=24))
    b = book_with_notice(kara, clock, programme_id, timedelta(hours=3))
    new_start = b.starts_at + timedelta(days=1)
    first = kara.reschedule(b.session_id, new_start, "client", request_id="move-1")
    clock.advance(timedelta(minutes=5))
    assert kara.reschedule(b.session_id, new_start, "client", request_id="move-1") == first
    assert len(rescheduled_events(kara)) == 1 and balance(kara, b) == (0, 1, 1)
    other = lambda: kara.reschedule(b.session_id, new_start + SECOND, "client", request_id="move-1")  # noqa: E731
    refuse(server, other, INVALID, "REQUEST_ID_REUSED")


def test_the_grace_after_booking_is_the_clients_and_ends_on_time(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    grace = timedelta(minutes=15)
    programme_id = new_programme(kara, timedelta(hours=24), grace=grace)
    assert kara.get_programme(programme_id).cancellation_grace.ToTimedelta() == grace

    def booked_two_hours_ahead() -> Booked:
        client_id = f"c-{uuid.uuid4().hex[:10]}"
        kara.grant_credits(client_id, 2, programme_id=programme_id)
        starts_at = clock.now() + timedelta(hours=2)
        session = kara.book(client_id, "pro-1", starts_at, programme_id=programme_id)
        assert session.terms.cancellation_grace.ToTimedelta() == grace
        return Booked(session.session_id, client_id, programme_id, starts_at)

    # Within the grace (its last instant included): the client's cancellation has enough notice.
    b = booked_two_hours_ahead()
    clock.advance(grace)
    preview = kara.preview(b.session_id, "client")
    assert (preview.late, preview.within_grace, preview.payment_state) == (
        False,
        True,
        pb.PAYMENT_STATE_VOIDED,
    )
    cancelled = kara.cancel(b.session_id, "client")
    assert cancelled.payment.state == pb.PAYMENT_STATE_VOIDED and cancelled.session.cancellation.within_grace
    assert balance(kara, b) == (2, 0, 0)

    # A second after it: the article's rule, late and charged.
    b = booked_two_hours_ahead()
    clock.advance(grace + SECOND)
    assert kara.preview(b.session_id, "client").within_grace is False
    assert kara.cancel(b.session_id, "client").payment.state == pb.PAYMENT_STATE_PAID

    # A move within the grace is free and says so; the professional's box is not the grace's.
    b = booked_two_hours_ahead()
    clock.advance(timedelta(minutes=1))
    charged = kara.preview_reschedule(
        b.session_id, b.starts_at + timedelta(days=3), "professional", charge_client=True
    )
    assert (charged.outcome, charged.within_grace) == (pb.RESCHEDULE_OUTCOME_CHARGED, False)
    moved = kara.reschedule(b.session_id, b.starts_at + timedelta(days=3), "client")
    assert moved.session.session_id == b.session_id and not moved.HasField("charged")
    assert (moved.session.moves[0].late, moved.session.moves[0].within_grace) == (False, True)


def test_a_programme_without_the_new_terms_keeps_the_articles_rule(kara: SessionsClient) -> None:
    """A caller that predates late_reschedule and cancellation_grace sends neither."""
    default = kara.get_programme("default")
    assert (default.late_reschedule, default.cancellation_grace.ToTimedelta()) == (
        cpb_late("CHARGE"),
        timedelta(0),
    )
    created = kara.create_programme("older-caller", "Older", timedelta(hours=24))
    assert created.late_reschedule == cpb_late("CHARGE")
    updated = kara.update_programme(
        "older-caller", late_reschedule="free", cancellation_grace=timedelta(hours=1)
    )
    assert (updated.late_reschedule, updated.cancellation_grace.ToTimedelta()) == (
        cpb_late("FREE"),
        timedelta(hours=1),
    )
    with pytest.raises(KaraError) as refused:
        kara.update_programme("older-caller", cancellation_grace=timedelta(hours=25))
    assert refused.value.code == INVALID and "programme.cancellation_grace" in str(refused.value)


def cpb_late(name: str) -> int:
    from kara.sessions.v1 import programmes_pb2 as ppb

    return int(ppb.LateReschedule.Value(f"LATE_RESCHEDULE_{name}"))


def test_who_may_move_a_session(database_url: str, clock: FakeClock, tmp_path: Path) -> None:
    principals = (
        "service:workstation",
        "client:c-1",
        "client:c-2",
        "professional:pro-1",
        "professional:pro-2",
    )
    with secured_server(database_url, clock, tmp_path, principals) as as_:
        service = as_("service:workstation")
        service.grant_credits("c-1", 2)
        session_id = service.book("c-1", "pro-1", clock.now() + timedelta(days=3)).session_id
        later = clock.now() + timedelta(days=4)
        denied = grpc.StatusCode.PERMISSION_DENIED
        for who, by in (
            ("client:c-2", "client"),  # someone else's: looks like a missing one
            ("professional:pro-2", "professional"),
            ("client:c-1", "professional"),  # a client moves only as the client
        ):
            with pytest.raises(KaraError) as refused:
                as_(who).reschedule(session_id, later, by)
            assert refused.value.code == denied, (who, by)
        with pytest.raises(KaraError) as missing:
            as_("client:c-2").reschedule("no-such-session", later, "client")
        assert missing.value.code == denied and "does not exist or you may not" in missing.value.message
        assert as_("client:c-1").reschedule(session_id, later, "client").session.session_id == session_id
        moved = as_("professional:pro-1").reschedule(session_id, later + timedelta(hours=1), "professional")
        assert [m.moved_by for m in moved.session.moves] == [pb.PARTY_CLIENT, pb.PARTY_PROFESSIONAL]


# --- races: exactly one wins, credits balance -------------------------------------------------


def late_booking(kara: SessionsClient, clock: FakeClock) -> Booked:
    return book_with_notice(kara, clock, "default", timedelta(hours=3))


@pytest.mark.parametrize("attempt", range(2))
def test_a_charged_reschedule_racing_a_cancellation_or_another_reschedule_has_one_winner(
    kara: SessionsClient, server: RunningServer, clock: FakeClock, attempt: int
) -> None:
    b = late_booking(kara, clock)
    new_start = b.starts_at + timedelta(days=1)
    calls: list[Callable[[], Any]] = [
        lambda: kara.reschedule(b.session_id, new_start, "client"),
        lambda: kara.reschedule(b.session_id, new_start + timedelta(hours=1), "client"),
        lambda: kara.cancel(b.session_id, "client"),
        lambda: kara.cancel(b.session_id, "professional"),
    ]
    results = race(len(calls), lambda i: calls[i]())
    winners = [r for r in results if not isinstance(r, KaraError)]
    assert len(winners) == 1, results
    assert all(
        isinstance(r, KaraError) and r.code == PRECONDITION and r.reason == "SESSION_NOT_BOOKED"
        for r in results
        if r is not winners[0]
    ), results
    available, held, used = balance(kara, b)
    winner = winners[0]
    if isinstance(winner, pb.RescheduleSessionResponse):
        assert (available, held, used) == (0, 1, 1)
    elif winner.session.state == pb.SESSION_STATE_CANCELLED_PAID:
        assert (available, held, used) == (1, 0, 1)
    else:
        assert (available, held, used) == (2, 0, 0)
    assert len(rescheduled_events(kara)) == (1 if isinstance(winner, pb.RescheduleSessionResponse) else 0)
    assert_ledger_balances(server)


def test_moves_in_place_racing_each_other_lose_nothing(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    b = book_with_notice(kara, clock, "default", timedelta(days=5))
    starts = [b.starts_at + timedelta(hours=n + 1) for n in range(4)]
    results = race(4, lambda i: kara.reschedule(b.session_id, starts[i], "client"))
    done = [r for r in results if isinstance(r, pb.RescheduleSessionResponse)]
    # One writer at a time moves it again and again; two at once: one is told to retry.
    assert done and all(
        isinstance(r, pb.RescheduleSessionResponse) or r.code in (PRECONDITION, grpc.StatusCode.ABORTED)
        for r in results
    ), results
    session = kara.get_session(b.session_id)
    assert len(session.moves) == len(done) == len(rescheduled_events(kara))
    assert utc(session.starts_at) == utc(session.moves[-1].to_starts_at)
    assert balance(kara, b) == (1, 1, 0)
    assert_ledger_balances(server)


def test_a_reschedule_racing_a_no_show_has_one_winner(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    b = book_with_notice(kara, clock, "default", timedelta(hours=2))
    clock.advance(timedelta(hours=2, minutes=10))  # started; the professional was told before
    told = b.starts_at - timedelta(hours=1)
    calls: list[Callable[[], Any]] = [
        lambda: kara.reschedule(
            b.session_id, clock.now() + timedelta(days=1), "professional", notified_at=told
        ),
        lambda: kara.mark_no_show(b.session_id),
    ]
    results = race(2, lambda i: calls[i]())
    winners = [r for r in results if not isinstance(r, KaraError)]
    assert len(winners) == 1, results
    loser = next(r for r in results if isinstance(r, KaraError))
    # A move in place leaves the session BOOKED: a no-show that lost to it on PostgreSQL is told
    # to read it again (CONCURRENT_MODIFICATION), and would then find it not started.
    reasons = ("SESSION_NOT_BOOKED", "SESSION_NOT_STARTED", "CONCURRENT_MODIFICATION")
    assert loser.code == PRECONDITION and loser.reason in reasons, loser
    assert balance(kara, b) == (
        (1, 1, 0) if isinstance(winners[0], pb.RescheduleSessionResponse) else (1, 0, 1)
    )
    assert_ledger_balances(server)


def test_a_charged_reschedule_racing_an_invoice_of_the_session(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    """A BOOKED session is never invoiced: the invoice gets it only once the move has settled it."""
    b = late_booking(kara, clock)
    calls: list[Callable[[], Any]] = [
        lambda: kara.reschedule(b.session_id, b.starts_at + timedelta(days=1), "client"),
        lambda: kara.create_invoice("pro-1", [b.session_id]),
    ]
    moved, invoiced = race(2, lambda i: calls[i]())
    assert isinstance(moved, pb.RescheduleSessionResponse), moved
    if isinstance(invoiced, KaraError):
        assert invoiced.code == PRECONDITION and invoiced.reason == "SESSION_NOT_PAID", invoiced
    else:
        (line,) = kara.get_invoice(invoiced.invoice_id).lines
        assert (line.session_id, pb.PaidReason.Name(line.paid_reason)) == (
            b.session_id,
            "PAID_REASON_CLIENT_LATE_RESCHEDULE",
        )
    assert kara.get_payment(moved.session.session_id).invoice_id == ""
    assert balance(kara, b) == (0, 1, 1)
    assert_ledger_balances(server)


def test_a_charged_move_goes_on_an_invoice_and_its_export(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    b = late_booking(kara, clock)
    kara.reschedule(b.session_id, b.starts_at + timedelta(days=1), "professional", charge_client=True)
    invoice = kara.create_invoice("pro-1", [b.session_id])
    out = io.StringIO()
    write_csv(kara.get_invoice(invoice.invoice_id), out)
    assert f"{b.session_id}" in out.getvalue() and "charged late reschedule" in out.getvalue()
    assert set(pb.PaidReason.values()) - {pb.PAID_REASON_UNSPECIFIED} == set(WHY_PAID), (
        "every reason has words"
    )
