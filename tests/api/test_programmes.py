"""Each programme's own terms, no-shows and waivers, through the real server on SQLite and
PostgreSQL: the article's table under 24, 48 and 72 hour windows, terms kept from the booking,
a programme that forbids the professional's late charge, the no-show rows, the waiver rows and
their refusals, and a waiver racing an invoice."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from kara.sessions.v1 import credits_pb2 as cpb
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import NO_RETRY, KaraError, SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer

from ..support.clock import FakeClock
from ..support.database import assert_ledger_balances, db_snapshot
from ..support.refusals import INVALID, NOT_FOUND, PRECONDITION, refuse
from ..support.tokens import secured_server

VOIDED, PAID = pb.PAYMENT_STATE_VOIDED, pb.PAYMENT_STATE_PAID
UNPAID_SECTION, PAID_SECTION = pb.PAYMENT_SECTION_UNPAID, pb.PAYMENT_SECTION_PAID
SECOND = timedelta(seconds=1)


@dataclass(frozen=True)
class Row:
    """One row of the article's table, at a notice relative to the programme's window."""

    name: str
    by: str
    notice: Callable[[timedelta], timedelta]
    charge: bool
    payment: int
    section: int


ROWS = [
    Row(
        "client, window + 1 s: credit returned", "client", lambda w: w + SECOND, False, VOIDED, UNPAID_SECTION
    ),
    Row("client, exactly the window: enough notice", "client", lambda w: w, False, VOIDED, UNPAID_SECTION),
    Row("client, window - 1 s: credit taken", "client", lambda w: w - SECOND, False, PAID, PAID_SECTION),
    Row(
        "professional, window + 1 s, box clear",
        "professional",
        lambda w: w + SECOND,
        False,
        VOIDED,
        UNPAID_SECTION,
    ),
    Row(
        "professional, window - 1 s, box ticked",
        "professional",
        lambda w: w - SECOND,
        True,
        PAID,
        PAID_SECTION,
    ),
    Row(
        "professional, window - 1 s, box clear",
        "professional",
        lambda w: w - SECOND,
        False,
        VOIDED,
        UNPAID_SECTION,
    ),
]


def programme(kara: SessionsClient, hours: int, **terms: bool) -> str:
    programme_id = f"p{hours}h" + "".join(f"-{k[:6]}{int(v)}" for k, v in terms.items()).replace("_", "")
    kara.create_programme(programme_id, f"{hours}-hour programme", timedelta(hours=hours), **terms)
    return programme_id


@pytest.mark.parametrize("hours", [24, 48, 72])
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_the_article_under_each_programme_window(
    kara: SessionsClient, clock: FakeClock, server: RunningServer, hours: int, row: Row
) -> None:
    window = timedelta(hours=hours)
    programme_id = "default" if hours == 24 else programme(kara, hours)
    kara.grant_credits("client-1", 1, programme_id=programme_id)
    session = kara.book("client-1", "pro-1", clock.now() + timedelta(days=10), programme_id=programme_id)
    assert session.terms.notice_window.ToTimedelta() == window
    clock.set(session.starts_at.ToDatetime().replace(tzinfo=clock.now().tzinfo) - row.notice(window))
    result = kara.cancel(session.session_id, row.by, charge_client=row.charge)
    assert (result.payment.state, result.payment.section) == (row.payment, row.section)
    assert result.payment.programme_id == programme_id
    account = kara.get_credit_account("client-1", programme_id=programme_id)
    assert (account.available, account.used) == ((1, 0) if row.payment == VOIDED else (0, 1))
    assert_ledger_balances(server)


def test_charging_with_enough_notice_is_refused_under_every_window(
    kara: SessionsClient, clock: FakeClock, server: RunningServer
) -> None:
    p48 = programme(kara, 48)
    kara.grant_credits("client-1", 1, programme_id=p48)
    session_id = kara.book(
        "client-1", "pro-1", clock.now() + timedelta(hours=48), programme_id=p48
    ).session_id
    err = refuse(
        server,
        lambda: kara.cancel(session_id, "professional", charge_client=True),
        PRECONDITION,
        "CHARGE_NOT_ALLOWED_WITH_NOTICE",
    )
    assert p48 in err.message and err.metadata["notice_window_seconds"] == str(48 * 3600)


def test_a_programme_may_forbid_the_professionals_late_charge(
    kara: SessionsClient, clock: FakeClock, server: RunningServer
) -> None:
    strict = programme(kara, 24, professional_may_charge_late=False)
    kara.grant_credits("client-1", 2, programme_id=strict)
    late = kara.book("client-1", "pro-1", clock.now() + timedelta(hours=3), programme_id=strict).session_id
    err = refuse(
        server,
        lambda: kara.cancel(late, "professional", charge_client=True),
        PRECONDITION,
        "CHARGE_NOT_ALLOWED_BY_PROGRAMME",
    )
    assert strict in err.message and err.metadata["programme_id"] == strict
    preview = kara.preview(late, "professional")
    assert preview.payment_state == VOIDED
    assert kara.cancel(late, "professional").payment.state == VOIDED
    # The client's own late cancellation is still charged: the programme limits the professional.
    other = kara.book("client-1", "pro-1", clock.now() + timedelta(hours=3), programme_id=strict).session_id
    assert kara.cancel(other, "client").payment.state == PAID


def test_terms_changed_after_booking_apply_to_new_sessions_only(
    kara: SessionsClient, clock: FakeClock, server: RunningServer
) -> None:
    p = programme(kara, 24)
    kara.grant_credits("client-1", 2, programme_id=p)
    old = kara.book("client-1", "pro-1", clock.now() + timedelta(hours=30), programme_id=p).session_id
    updated = kara.update_programme(p, notice_window=timedelta(hours=48), professional_may_charge_late=False)
    assert updated.notice_window.ToTimedelta() == timedelta(hours=48)
    assert updated.update_time.ToDatetime() >= updated.create_time.ToDatetime()
    new = kara.book("client-1", "pro-1", clock.now() + timedelta(hours=30), programme_id=p).session_id
    assert kara.get_session(old).terms.notice_window.ToTimedelta() == timedelta(hours=24)
    # 30 hours of notice: enough under the old session's 24 h, late under the new one's 48 h.
    assert kara.preview(old, "client").payment_state == VOIDED
    assert kara.preview(new, "client").payment_state == PAID
    assert kara.cancel(old, "professional", charge_client=False).payment.state == VOIDED
    refuse(
        server,
        lambda: kara.cancel(new, "professional", charge_client=True),
        PRECONDITION,
        "CHARGE_NOT_ALLOWED_BY_PROGRAMME",
    )
    assert kara.get_payment(old).terms.professional_may_charge_late is True


def test_credits_belong_to_a_programme(kara: SessionsClient, clock: FakeClock, server: RunningServer) -> None:
    p = programme(kara, 48)
    kara.grant_credits("client-1", 1, programme_id=p)
    refuse(
        server,
        lambda: kara.book("client-1", "pro-1", clock.now() + timedelta(days=3)),
        PRECONDITION,
        "INSUFFICIENT_CREDITS",
    )
    session = kara.book("client-1", "pro-1", clock.now() + timedelta(days=3), programme_id=p)
    assert session.programme_id == p
    assert kara.get_credit_account("client-1", programme_id=p).held == 1
    refuse(server, lambda: kara.get_credit_account("client-1"), NOT_FOUND, "NOT_FOUND")
    refuse(server, lambda: kara.grant_credits("client-1", 1, programme_id="nope"), NOT_FOUND, "NOT_FOUND")
    refuse(
        server,
        lambda: kara.book("client-1", "pro-1", clock.now() + timedelta(days=3), programme_id="nope"),
        NOT_FOUND,
        "NOT_FOUND",
    )


def test_programmes_are_created_listed_and_validated(kara: SessionsClient, server: RunningServer) -> None:
    default = kara.get_programme("default")
    assert (
        default.notice_window.ToTimedelta(),
        default.professional_may_charge_late,
        default.no_show_takes_credit,
    ) == (
        timedelta(hours=24),
        True,
        True,
    )
    created = kara.create_programme("acme-eap", "ACME EAP", timedelta(hours=72), no_show_takes_credit=False)
    assert (created.programme_id, created.display_name, created.no_show_takes_credit) == (
        "acme-eap",
        "ACME EAP",
        False,
    )
    refuse(
        server,
        lambda: kara.create_programme("acme-eap", "Again", timedelta(hours=24)),
        grpc.StatusCode.ALREADY_EXISTS,
        "ALREADY_EXISTS",
    )
    assert [p.programme_id for p in kara.list_programmes().programmes] == ["acme-eap", "default"]
    first = kara.list_programmes(page_size=1)
    assert [p.programme_id for p in first.programmes] == ["acme-eap"]
    assert [p.programme_id for p in kara.list_programmes(1, first.next_page_token).programmes] == ["default"]
    for bad, fields in [
        (lambda: kara.create_programme("Bad Id", "x", timedelta(hours=24)), ["programme_id"]),
        (lambda: kara.create_programme("short", "x", timedelta(minutes=59)), ["programme.notice_window"]),
        (
            lambda: kara.create_programme("long", "x", timedelta(days=14, seconds=1)),
            ["programme.notice_window"],
        ),
        (lambda: kara.create_programme("nameless", " ", timedelta(hours=24)), ["programme.display_name"]),
        (lambda: kara.update_programme("acme-eap"), ["update_mask"]),
        (lambda: kara.update_programme("acme-eap", notice_window=timedelta(0)), ["programme.notice_window"]),
    ]:
        err = refuse(server, bad, INVALID, None)
        assert [f for f, _ in err.field_violations] == fields
    refuse(server, lambda: kara.update_programme("nope", display_name="x"), NOT_FOUND, "NOT_FOUND")


# --- no-shows -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("takes_credit", "payment", "section", "reason"),
    [
        (True, PAID, PAID_SECTION, pb.PAID_REASON_NO_SHOW),
        (False, VOIDED, UNPAID_SECTION, pb.PAID_REASON_UNSPECIFIED),
    ],
    ids=["no-show-takes-the-credit", "no-show-returns-the-credit"],
)
def test_a_no_show_follows_its_programme(
    kara: SessionsClient,
    clock: FakeClock,
    server: RunningServer,
    takes_credit: bool,
    payment: int,
    section: int,
    reason: int,
) -> None:
    p = programme(kara, 24, no_show_takes_credit=takes_credit)
    kara.grant_credits("client-1", 1, programme_id=p)
    session_id = kara.book("client-1", "pro-1", clock.now() + timedelta(hours=2), programme_id=p).session_id
    refuse(server, lambda: kara.mark_no_show(session_id), PRECONDITION, "SESSION_NOT_STARTED")
    clock.advance(timedelta(hours=2, minutes=10))
    result = kara.mark_no_show(session_id)
    assert result.session.state == pb.SESSION_STATE_NO_SHOW
    assert result.session.no_show_at.ToDatetime().replace(tzinfo=clock.now().tzinfo) == clock.now()
    assert (result.payment.state, result.payment.section, result.payment.paid_reason) == (
        payment,
        section,
        reason,
    )
    account = kara.get_credit_account("client-1", programme_id=p)
    assert (account.available, account.held, account.used) == ((0, 0, 1) if takes_credit else (1, 0, 0))
    refuse(server, lambda: kara.mark_no_show(session_id), PRECONDITION, "SESSION_NOT_BOOKED")
    refuse(server, lambda: kara.cancel(session_id, "client"), PRECONDITION, "SESSION_NOT_BOOKED")
    section_name = "paid" if takes_credit else "unpaid"
    listed = kara.list_payments("pro-1", section_name).payments
    assert [p.session_id for p in listed] == [session_id]
    if takes_credit:
        invoice = kara.create_invoice("pro-1", [session_id])
        assert invoice.lines[0].paid_reason == pb.PAID_REASON_NO_SHOW
    assert_ledger_balances(server)


# --- waivers --------------------------------------------------------------------------------


@pytest.fixture
def charged(kara: SessionsClient, clock: FakeClock) -> str:
    """A client's late cancellation: its credit taken, its payment PAID."""
    kara.grant_credits("client-1", 3)
    session_id = kara.book("client-1", "pro-1", clock.now() + timedelta(hours=5)).session_id
    kara.cancel(session_id, "client")
    return str(session_id)


def test_a_waiver_gives_the_credit_back_and_voids_the_payment(
    kara: SessionsClient, charged: str, server: RunningServer, clock: FakeClock
) -> None:
    clock.advance(timedelta(minutes=5))
    result = kara.waive_charge(charged, "family emergency; goodwill")
    assert result.session.state == pb.SESSION_STATE_CANCELLED_PAID  # what happened stays recorded
    assert (result.payment.state, result.payment.section) == (VOIDED, UNPAID_SECTION)
    w = result.payment.waiver
    assert (w.waived_by, w.reason) == ("service:unauthenticated", "family emergency; goodwill")
    assert w.waived_at.ToDatetime().replace(tzinfo=clock.now().tzinfo) == clock.now()
    assert kara.get_payment(charged) == result.payment
    account = kara.get_credit_account("client-1")
    assert (account.available, account.held, account.used) == (3, 0, 0)
    assert account.entries[0].kind == cpb.LEDGER_ENTRY_KIND_REFUND
    assert [p.session_id for p in kara.list_payments("pro-1", "unpaid").payments] == [charged]
    assert kara.list_payments("pro-1", "paid").payments == []
    audit = db_snapshot(server)["audit_log"][-1]
    assert (audit["action"], audit["principal"], audit["reason"]) == (
        "WAIVE",
        "service:unauthenticated",
        "family emergency; goodwill",
    )
    refuse(server, lambda: kara.create_invoice("pro-1", [charged]), PRECONDITION, "SESSION_NOT_PAID")
    assert_ledger_balances(server)


def test_a_charged_no_show_can_be_waived(
    kara: SessionsClient, clock: FakeClock, server: RunningServer
) -> None:
    kara.grant_credits("client-1", 1)
    session_id = kara.book("client-1", "pro-1", clock.now() + timedelta(hours=1)).session_id
    clock.advance(timedelta(hours=2))
    kara.mark_no_show(session_id)
    assert kara.waive_charge(session_id, "the client was ill").payment.state == VOIDED
    assert kara.get_credit_account("client-1").available == 1
    assert_ledger_balances(server)


def test_every_waiver_refusal_changes_nothing(
    kara: SessionsClient, clock: FakeClock, server: RunningServer, charged: str
) -> None:
    booked = kara.book("client-1", "pro-1", clock.now() + timedelta(days=3)).session_id
    voided = kara.book("client-1", "pro-1", clock.now() + timedelta(days=3)).session_id
    kara.cancel(voided, "client")
    completed = kara.book("client-1", "pro-1", clock.now() + timedelta(minutes=30)).session_id
    clock.advance(timedelta(hours=1))
    kara.complete(completed)
    for session_id in (booked, voided, completed):
        refuse(server, lambda s=session_id: kara.waive_charge(s, "why not"), PRECONDITION, "NOT_WAIVABLE")
    invoice = kara.create_invoice("pro-1", [charged]).invoice_id
    err = refuse(server, lambda: kara.waive_charge(charged, "goodwill"), PRECONDITION, "ON_INVOICE")
    assert invoice in err.message
    kara.submit_invoice(invoice)
    refuse(server, lambda: kara.waive_charge(charged, "goodwill"), PRECONDITION, "ON_INVOICE")
    refuse(server, lambda: kara.waive_charge("no-such-session", "goodwill"), NOT_FOUND, "NOT_FOUND")
    refuse(server, lambda: kara.waive_charge(charged, " "), INVALID, None)


def test_a_waiver_after_removal_from_a_draft_and_only_once(
    kara: SessionsClient, charged: str, server: RunningServer
) -> None:
    invoice = kara.create_invoice("pro-1", [charged]).invoice_id
    kara.remove_from_invoice(invoice, [charged])
    first = kara.waive_charge(charged, "goodwill", request_id="waive-1")
    assert kara.waive_charge(charged, "goodwill", request_id="waive-1") == first  # a replay
    refuse(server, lambda: kara.waive_charge(charged, "goodwill"), PRECONDITION, "NOT_WAIVABLE")
    assert kara.get_credit_account("client-1").available == 3


@pytest.mark.parametrize("attempt", range(3))
def test_a_waiver_racing_an_invoice_one_wins_and_the_ledger_balances(
    server: RunningServer, clock: FakeClock, attempt: int
) -> None:
    target = f"127.0.0.1:{server.port}"
    with SessionsClient(target, retry=NO_RETRY) as setup:
        setup.grant_credits("client-1", 10)
        sessions = []
        for _ in range(5):
            s = setup.book("client-1", "pro-1", clock.now() + timedelta(hours=3)).session_id
            setup.cancel(s, "client")
            sessions.append(s)
        invoice = setup.create_invoice("pro-1", [sessions[0]]).invoice_id
    outcomes: dict[str, list[str]] = {s: [] for s in sessions[1:]}
    start_line = threading.Barrier(2)

    def waive_all() -> None:
        with SessionsClient(target, retry=NO_RETRY) as kara:
            start_line.wait()
            for s in sessions[1:]:
                try:
                    kara.waive_charge(s, "goodwill")
                    outcomes[s].append("waived")
                except KaraError as exc:
                    outcomes[s].append(f"waive refused {exc.reason}")

    def invoice_all() -> None:
        with SessionsClient(target, retry=NO_RETRY) as kara:
            start_line.wait()
            for s in sessions[1:]:
                try:
                    kara.add_to_invoice(invoice, [s])
                    outcomes[s].append("invoiced")
                except KaraError as exc:
                    outcomes[s].append(f"invoice refused {exc.reason}")

    threads = [threading.Thread(target=waive_all), threading.Thread(target=invoice_all)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with SessionsClient(target) as kara:
        lines = {line.session_id for line in kara.get_invoice(invoice).lines}
        for s, said in outcomes.items():
            payment = kara.get_payment(s)
            waived = payment.HasField("waiver")
            assert waived != (s in lines), (s, said)  # exactly one won
            assert sorted(said) in (
                ["invoice refused SESSION_NOT_PAID", "waived"],
                ["invoiced", "waive refused ON_INVOICE"],
            ), said
            assert payment.state == (VOIDED if waived else PAID)
    assert_ledger_balances(server)


# --- who may do what ---------------------------------------------------------------------------

PRINCIPALS = ("service:workstation", "professional:pro-1", "professional:pro-2", "client:cl-1")


@pytest.fixture
def as_(database_url: str, clock: FakeClock, tmp_path: Path) -> Iterator[Callable[[str], SessionsClient]]:
    with secured_server(database_url, clock, tmp_path, PRINCIPALS) as as_:
        yield as_


def _code(call: Callable[[], object]) -> grpc.StatusCode | None:
    try:
        call()
    except KaraError as exc:
        return exc.code
    return None


def test_who_may_manage_programmes_mark_no_shows_and_waive(
    as_: Callable[[str], SessionsClient], clock: FakeClock
) -> None:
    svc, pro, other_pro, client = (as_(p) for p in PRINCIPALS)
    anonymous = as_("anonymous")
    denied, unauthenticated = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED

    assert svc.create_programme("eap", "EAP", timedelta(hours=48)).programme_id == "eap"
    for caller in (pro, client):
        assert _code(lambda c=caller: c.create_programme("x", "X", timedelta(hours=24))) == denied
        assert _code(lambda c=caller: c.update_programme("eap", display_name="mine")) == denied
        assert caller.get_programme("eap").programme_id == "eap"  # no secret to those it binds
    assert _code(anonymous.list_programmes) == unauthenticated

    svc.grant_credits("cl-1", 4, programme_id="eap")
    sessions = [
        svc.book("cl-1", "pro-1", clock.now() + timedelta(hours=1), programme_id="eap").session_id
        for _ in range(3)
    ]
    clock.advance(timedelta(hours=2))
    assert _code(lambda: client.mark_no_show(sessions[0])) == denied
    assert _code(lambda: other_pro.mark_no_show(sessions[0])) == denied
    assert _code(lambda: anonymous.mark_no_show(sessions[0])) == unauthenticated
    assert pro.mark_no_show(sessions[0]).session.state == pb.SESSION_STATE_NO_SHOW
    assert svc.mark_no_show(sessions[1]).session.state == pb.SESSION_STATE_NO_SHOW
    assert _code(lambda: client.waive_charge(sessions[0], "me")) == denied
    assert _code(lambda: other_pro.waive_charge(sessions[0], "them")) == denied
    assert pro.waive_charge(sessions[0], "goodwill").payment.waiver.waived_by == "professional:pro-1"
    assert svc.waive_charge(sessions[1], "goodwill").payment.waiver.waived_by == "service:workstation"
    # Someone else's session reads as one that does not exist, to anyone but a service.
    missing = _code(lambda: other_pro.mark_no_show("no-such-session"))
    assert missing == _code(lambda: other_pro.mark_no_show(sessions[2])) == denied
    assert _code(lambda: svc.mark_no_show("no-such-session")) == grpc.StatusCode.NOT_FOUND
