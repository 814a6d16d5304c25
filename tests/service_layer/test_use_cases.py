"""The use cases on an in-memory unit of work (tests/support/memory.py): the article's rows and
every refusal, in milliseconds, with no server and no database. The same paths run through a
real server over real SQLite and PostgreSQL in tests/api/ (test_policy_matrix.py,
test_refusals.py, test_reschedule.py, ...); these say the service layer alone gets them right,
and that a refusal changes nothing: no session, credit, invoice, event or audit row, and no
commit at all."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import pytest

from kara_sessions_server.domain.errors import DomainError
from kara_sessions_server.domain.feed import EventType
from kara_sessions_server.domain.invoicing import MAX_INVOICE_LINES
from kara_sessions_server.domain.model import (
    BookSession,
    CancelSession,
    ChangeInvoiceLines,
    CompleteSession,
    CreateInvoice,
    CreateProgramme,
    GrantCredits,
    LedgerKind,
    MarkNoShow,
    Party,
    Payment,
    PaymentSection,
    PaymentState,
    Rescheduled,
    RescheduleSession,
    Session,
    SessionState,
    SubmitInvoice,
    UpdateProgramme,
    WaiveCharge,
)
from kara_sessions_server.domain.policy import MAX_MOVES_PER_SESSION
from kara_sessions_server.domain.principal import Principal, Role
from kara_sessions_server.domain.programme import (
    DEFAULT_PROGRAMME_ID,
    DEFAULT_TERMS,
    LateReschedule,
    ProgrammeChanges,
    UnmarkedOutcome,
)
from kara_sessions_server.entrypoints.application import build_application
from kara_sessions_server.entrypoints.settings import Settings
from kara_sessions_server.service_layer.feed import EventServices
from kara_sessions_server.service_layer.invoice_services import InvoiceServices
from kara_sessions_server.service_layer.programme_services import ProgrammeServices
from kara_sessions_server.service_layer.services import Services

from ..support.clock import FakeClock
from ..support.memory import MemoryStore

SERVICE = Principal(Role.SERVICE, "tests")
CLIENT = Principal(Role.CLIENT, "client-1")
PRO = Principal(Role.PROFESSIONAL, "pro-1")
HOUR = timedelta(hours=1)


def _id() -> str:
    return str(uuid.uuid4())


@dataclass
class World:
    store: MemoryStore
    clock: FakeClock
    services: Services
    programmes: ProgrammeServices
    invoices: InvoiceServices
    events: EventServices

    def grant(
        self, credits: int = 1, client_id: str = "client-1", programme_id: str = DEFAULT_PROGRAMME_ID
    ) -> None:
        self.services.grant_credits(SERVICE, GrantCredits(client_id, credits, _id(), programme_id))

    def book(
        self, starts_in: timedelta = 72 * HOUR, programme_id: str = DEFAULT_PROGRAMME_ID, grant: bool = True
    ) -> str:
        if grant:
            self.grant(programme_id=programme_id)
        cmd = BookSession("client-1", "pro-1", self.clock.now() + starts_in, _id(), programme_id)
        return self.services.book_session(SERVICE, cmd).session_id

    def cancel(
        self,
        session_id: str,
        by: Party,
        charge: bool = False,
        notified_at: datetime | None = None,
        who: Principal = SERVICE,
        request_id: str = "",
    ) -> tuple[Session, Payment]:
        cmd = CancelSession(session_id, by, charge, notified_at, "", request_id or _id())
        return self.services.cancel_session(who, cmd)

    def reschedule(
        self, session_id: str, to: timedelta, by: Party = Party.CLIENT, charge: bool = False
    ) -> Rescheduled:
        cmd = RescheduleSession(session_id, self.clock.now() + to, by, charge, None, "", _id())
        return self.services.reschedule_session(SERVICE, cmd)

    def programme(self, programme_id: str, **terms: Any) -> None:
        cmd = CreateProgramme(programme_id, programme_id.title(), replace(DEFAULT_TERMS, **terms), _id())
        self.programmes.create_programme(SERVICE, cmd)

    def balance(self, programme_id: str = DEFAULT_PROGRAMME_ID) -> tuple[int, int, int]:
        account = self.services.get_credit_account(SERVICE, "client-1", programme_id, 100, "")
        return account.available, account.held, account.used

    def paid_session(self) -> str:
        """A session the client cancelled late: PAID, invoiceable."""
        session_id = self.book(starts_in=2 * HOUR)
        self.cancel(session_id, Party.CLIENT)
        return session_id


@pytest.fixture
def world() -> World:
    store, clock, settings = MemoryStore(), FakeClock(), Settings()
    # The server's own wiring, on the in-memory unit of work.
    app = build_application(settings, store, clock)
    app.programmes.ensure_default(settings.notice_window)
    return World(store, clock, app.sessions, app.programmes, app.invoices, app.events)


# --- the article's rows -------------------------------------------------------------------

# who cancels, hours of notice, charge box -> session state, payment, the credit's move
ARTICLE = [
    (Party.CLIENT, 48, False, SessionState.CANCELLED_VOIDED, PaymentState.VOIDED, LedgerKind.RETURN),
    (Party.PROFESSIONAL, 48, False, SessionState.CANCELLED_VOIDED, PaymentState.VOIDED, LedgerKind.RETURN),
    (Party.CLIENT, 23, False, SessionState.CANCELLED_PAID, PaymentState.PAID, LedgerKind.TAKE),
    (Party.PROFESSIONAL, 23, True, SessionState.CANCELLED_PAID, PaymentState.PAID, LedgerKind.TAKE),
    (Party.PROFESSIONAL, 23, False, SessionState.CANCELLED_VOIDED, PaymentState.VOIDED, LedgerKind.RETURN),
    # At exactly the window there is enough notice ("24 hours or more").
    (Party.CLIENT, 24, False, SessionState.CANCELLED_VOIDED, PaymentState.VOIDED, LedgerKind.RETURN),
]


@pytest.mark.parametrize(("by", "hours", "charge", "state", "payment", "move"), ARTICLE)
def test_the_articles_rows(
    world: World,
    by: Party,
    hours: int,
    charge: bool,
    state: SessionState,
    payment: PaymentState,
    move: LedgerKind,
) -> None:
    session_id = world.book(starts_in=72 * HOUR)
    world.clock.advance(72 * HOUR - hours * HOUR)
    session, paid = world.cancel(session_id, by, charge)
    assert session.state is state
    assert paid.state is payment
    taken = move is LedgerKind.TAKE
    assert world.balance() == ((0, 0, 1) if taken else (1, 0, 0))
    data = world.store.data
    assert [e.kind for _, e in data.entries] == [LedgerKind.GRANT, LedgerKind.HOLD, move]
    # The Payments tab: in the Paid section only when the credit was taken.
    section = PaymentSection.PAID if taken else PaymentSection.UNPAID
    listed = world.services.list_payments(PRO, "pro-1", section, 10, "").items
    assert [p.session_id for p in listed] == [session_id]
    assert [e.stored.type for e in data.events][-1] is EventType.SESSION_CANCELLED
    assert [row.action for row in data.audit] == ["BOOK", "CANCEL"]


def test_a_replay_returns_the_first_answer_and_changes_nothing(world: World) -> None:
    session_id = world.book()
    first = world.cancel(session_id, Party.CLIENT, request_id="cancel-1")
    before, commits = world.store.data.copy(), world.store.commits
    assert world.cancel(session_id, Party.CLIENT, request_id="cancel-1") == first
    assert world.store.data == before
    assert world.store.commits == commits


def test_a_move_in_place_keeps_the_credit_held_and_a_late_charged_move_takes_it(world: World) -> None:
    session_id = world.book()
    world.reschedule(session_id, 96 * HOUR)
    assert world.balance() == (0, 1, 0)
    world.clock.advance(95 * HOUR)
    world.grant()
    done = world.reschedule(session_id, 48 * HOUR)
    assert done.charged is not None and done.charged.state is SessionState.CANCELLED_PAID
    assert world.balance() == (0, 1, 1)


def test_a_no_show_takes_the_credit_and_a_waiver_gives_it_back(world: World) -> None:
    session_id = world.book(starts_in=2 * HOUR)
    world.clock.advance(3 * HOUR)
    world.services.mark_no_show(SERVICE, MarkNoShow(session_id, _id()))
    assert world.balance() == (0, 0, 1)
    _, payment = world.services.waive_charge(SERVICE, WaiveCharge(session_id, "illness", _id()))
    assert payment.state is PaymentState.VOIDED
    assert world.balance() == (1, 0, 0)


def test_forgiveness_returns_the_first_charges_of_a_period_and_records_each(world: World) -> None:
    """One free late cancellation in a week: a client's late cancellation is forgiven, a no-show
    two days on is charged (one forgiven within the week), and a late cancellation eight days
    after the first is forgiven again."""
    world.programme("kind", free_late_cancellations=1, forgiveness_period=7 * 24 * HOUR)
    first = world.book(starts_in=2 * HOUR, programme_id="kind")
    cancelled, payment = world.cancel(first, Party.CLIENT)
    assert cancelled.state is SessionState.CANCELLED_VOIDED and cancelled.cancellation is not None
    assert cancelled.cancellation.forgiven and payment.state is PaymentState.VOIDED
    world.clock.advance(48 * HOUR)
    missed = world.book(starts_in=HOUR, programme_id="kind")
    world.clock.advance(2 * HOUR)
    session, payment = world.services.mark_no_show(SERVICE, MarkNoShow(missed, _id()))
    assert not session.no_show_forgiven and payment.state is PaymentState.PAID
    world.clock.advance(6 * 24 * HOUR)
    again = world.book(starts_in=2 * HOUR, programme_id="kind")
    preview = world.services.preview_cancellation(
        SERVICE, CancelSession(again, Party.CLIENT, False, None, "", "")
    )
    assert preview.cancellation.forgiven and (preview.forgiveness.used, preview.forgiveness.allowed) == (0, 1)
    assert world.cancel(again, Party.CLIENT)[0].state is SessionState.CANCELLED_VOIDED
    assert world.balance("kind") == (2, 0, 1)
    kinds = [e.kind for _, e in world.store.data.entries if e.session_id in (first, missed, again)]
    assert kinds.count(LedgerKind.RETURN) == 2 and kinds.count(LedgerKind.TAKE) == 1


def test_the_server_settles_an_unmarked_session_once_as_its_terms_say(world: World) -> None:
    world.programme("settles", settle_unmarked_after=48 * HOUR, unmarked_outcome=UnmarkedOutcome.NO_SHOW)
    session_id = world.book(starts_in=2 * HOUR, programme_id="settles")
    world.clock.advance(49 * HOUR)
    assert world.services.unmarked_due(10) == []
    world.clock.advance(HOUR)
    assert world.services.unmarked_due(10) == [session_id]
    settled = world.services.settle_unmarked(session_id)
    assert settled.state is SessionState.NO_SHOW and settled.settled_automatically
    assert world.balance("settles") == (0, 0, 1)
    # Another replica's sweep, a moment later: the same answer, nothing changed.
    before, commits = world.store.data.copy(), world.store.commits
    assert world.services.settle_unmarked(session_id) == settled
    assert world.store.data == before and world.store.commits == commits
    assert world.services.unmarked_due(10) == []
    assert [row.principal for row in world.store.data.audit][-1] == "service:kara-sessions"


def test_an_invoice_takes_the_paid_sessions_and_is_submitted(world: World) -> None:
    paid = world.paid_session()
    invoice = world.invoices.create_invoice(SERVICE, CreateInvoice("pro-1", (paid,), None, _id()))
    assert [line.session_id for line in invoice.lines] == [paid]
    submitted = world.invoices.submit_invoice(SERVICE, SubmitInvoice(invoice.invoice_id, _id()))
    assert submitted.submitted_at == world.clock.now()


# --- every refusal --------------------------------------------------------------------------


def _booked(world: World, starts_in: timedelta = 72 * HOUR) -> str:
    return world.book(starts_in=starts_in)


def _cancelled(world: World) -> str:
    session_id = _booked(world)
    world.cancel(session_id, Party.CLIENT)
    return session_id


def _started(world: World) -> str:
    session_id = _booked(world, 2 * HOUR)
    world.clock.advance(3 * HOUR)
    return session_id


def _late_in(world: World, programme: str, **terms: object) -> str:
    world.programme(programme, **terms)
    session_id = world.book(starts_in=30 * HOUR, programme_id=programme)
    world.clock.advance(10 * HOUR)
    return session_id


def _on_invoice(world: World) -> tuple[str, str]:
    paid = world.paid_session()
    invoice = world.invoices.create_invoice(SERVICE, CreateInvoice("pro-1", (paid,), None, _id()))
    return paid, invoice.invoice_id


def _submitted(world: World) -> str:
    _, invoice_id = _on_invoice(world)
    world.invoices.submit_invoice(SERVICE, SubmitInvoice(invoice_id, _id()))
    return invoice_id


def _many_paid(world: World) -> None:
    world.grant(MAX_INVOICE_LINES + 1)
    for _ in range(MAX_INVOICE_LINES + 1):
        cmd = BookSession("client-1", "pro-1", world.clock.now() + 2 * HOUR, _id())
        session_id = world.services.book_session(SERVICE, cmd).session_id
        world.cancel(session_id, Party.CLIENT)


Refused = Callable[[], object]
Setup = Callable[[World], Refused]
# Each refusal: its reason, and a setup that returns the call to be refused.
REFUSALS: dict[str, tuple[Setup, str]] = {}


def refusal(reason: str) -> Callable[[Setup], Setup]:
    def register(setup: Setup) -> Setup:
        REFUSALS[setup.__name__] = (setup, reason)
        return setup

    return register


# CancelSession


@refusal("CLIENT_CANNOT_CHARGE")
def client_ticks_the_box(w: World) -> Refused:
    s = _booked(w)
    return lambda: w.cancel(s, Party.CLIENT, True)


@refusal("NOTIFIED_AT_NOT_ALLOWED")
def client_says_when_they_told(w: World) -> Refused:
    s = _booked(w)
    return lambda: w.cancel(s, Party.CLIENT, notified_at=w.clock.now())


@refusal("NOTIFIED_AT_IN_FUTURE")
def told_in_the_future(w: World) -> Refused:
    s = _booked(w)
    return lambda: w.cancel(s, Party.PROFESSIONAL, notified_at=w.clock.now() + HOUR)


@refusal("NOTIFIED_AT_BEFORE_BOOKING")
def told_before_the_booking(w: World) -> Refused:
    s = _booked(w)
    return lambda: w.cancel(s, Party.PROFESSIONAL, notified_at=w.clock.now() - HOUR)


@refusal("CHARGE_NOT_ALLOWED_WITH_NOTICE")
def charge_with_notice(w: World) -> Refused:
    s = _booked(w)
    return lambda: w.cancel(s, Party.PROFESSIONAL, True)


@refusal("CHARGE_NOT_ALLOWED_BY_PROGRAMME")
def charge_the_programme_forbids(w: World) -> Refused:
    s = _late_in(w, "nocharge", professional_may_charge_late=False)
    return lambda: w.cancel(s, Party.PROFESSIONAL, True)


@refusal("SESSION_NOT_BOOKED")
def cancel_twice(w: World) -> Refused:
    s = _cancelled(w)
    return lambda: w.cancel(s, Party.CLIENT)


@refusal("SESSION_ALREADY_STARTED")
def cancel_once_started(w: World) -> Refused:
    s = _started(w)
    return lambda: w.cancel(s, Party.CLIENT)


@refusal("NOT_FOUND")
def cancel_no_such_session(w: World) -> Refused:
    return lambda: w.cancel("missing", Party.CLIENT)


@refusal("PERMISSION_DENIED")
def cancel_someone_elses_session(w: World) -> Refused:
    s = _booked(w)
    return lambda: w.cancel(s, Party.CLIENT, who=Principal(Role.CLIENT, "client-2"))


@refusal("REQUEST_ID_REUSED")
def reuse_a_request_id(w: World) -> Refused:
    w.cancel(_booked(w), Party.CLIENT, request_id="used")
    other = _booked(w)
    return lambda: w.cancel(other, Party.CLIENT, request_id="used")


# BookSession, GrantCredits


@refusal("STARTS_AT_NOT_IN_FUTURE")
def book_now(w: World) -> Refused:
    w.grant()
    return lambda: w.services.book_session(SERVICE, BookSession("client-1", "pro-1", w.clock.now(), _id()))


@refusal("STARTS_AT_BEYOND_HORIZON")
def book_beyond_the_horizon(w: World) -> Refused:
    w.grant()
    return lambda: w.book(starts_in=timedelta(days=731), grant=False)


@refusal("INSUFFICIENT_CREDITS")
def book_without_a_credit(w: World) -> Refused:
    return lambda: w.book(grant=False)


@refusal("NOT_FOUND")
def book_in_no_programme(w: World) -> Refused:
    return lambda: w.book(programme_id="nowhere", grant=False)


@refusal("NOT_FOUND")
def grant_in_no_programme(w: World) -> Refused:
    return lambda: w.grant(programme_id="nowhere")


# RescheduleSession


@refusal("STARTS_AT_UNCHANGED")
def move_to_the_same_start(w: World) -> Refused:
    s = _booked(w)
    return lambda: w.reschedule(s, 72 * HOUR)


@refusal("RESCHEDULE_LIMIT_REACHED")
def a_move_past_the_cap(w: World) -> Refused:
    s = _booked(w)
    for n in range(MAX_MOVES_PER_SESSION):
        w.reschedule(s, (100 + n) * HOUR, Party.PROFESSIONAL)
    return lambda: w.reschedule(s, 200 * HOUR, Party.PROFESSIONAL)


@refusal("LATE_RESCHEDULE_NOT_ALLOWED")
def late_move_the_programme_refuses(w: World) -> Refused:
    s = _late_in(w, "strict", late_reschedule=LateReschedule.REFUSED)
    return lambda: w.reschedule(s, 48 * HOUR)


@refusal("INSUFFICIENT_CREDITS")
def charged_move_without_a_spare_credit(w: World) -> Refused:
    s = _late_in(w, "charged")
    return lambda: w.reschedule(s, 48 * HOUR)


@refusal("SESSION_NOT_BOOKED")
def move_a_cancelled_session(w: World) -> Refused:
    s = _cancelled(w)
    return lambda: w.reschedule(s, 96 * HOUR)


# CompleteSession, MarkNoShow, WaiveCharge


@refusal("SESSION_NOT_STARTED")
def complete_before_the_start(w: World) -> Refused:
    s = _booked(w)
    return lambda: w.services.complete_session(SERVICE, CompleteSession(s, _id()))


@refusal("SESSION_NOT_STARTED")
def no_show_before_the_start(w: World) -> Refused:
    s = _booked(w)
    return lambda: w.services.mark_no_show(SERVICE, MarkNoShow(s, _id()))


@refusal("NOT_WAIVABLE")
def waive_what_was_not_charged(w: World) -> Refused:
    s = _booked(w)
    return lambda: w.services.waive_charge(SERVICE, WaiveCharge(s, "", _id()))


@refusal("ON_INVOICE")
def waive_a_session_on_an_invoice(w: World) -> Refused:
    s, _ = _on_invoice(w)
    return lambda: w.services.waive_charge(SERVICE, WaiveCharge(s, "", _id()))


# Programmes


@refusal("ALREADY_EXISTS")
def create_a_programme_twice(w: World) -> Refused:
    return lambda: w.programme(DEFAULT_PROGRAMME_ID)


@refusal("ETAG_MISMATCH")
def update_from_a_stale_etag(w: World) -> Refused:
    changes = ProgrammeChanges(display_name="Renamed")
    cmd = UpdateProgramme(DEFAULT_PROGRAMME_ID, changes, _id(), etag="v9")
    return lambda: w.programmes.update_programme(SERVICE, cmd)


# Invoices


def _invoice(w: World, *session_ids: str, professional_id: str = "pro-1") -> Refused:
    cmd = CreateInvoice(professional_id, session_ids, None, _id())
    return lambda: w.invoices.create_invoice(SERVICE, cmd)


@refusal("SESSION_NOT_PAID")
def invoice_a_session_not_paid(w: World) -> Refused:
    return _invoice(w, _booked(w))


@refusal("SESSION_ALREADY_INVOICED")
def invoice_a_session_twice(w: World) -> Refused:
    return _invoice(w, _on_invoice(w)[0])


@refusal("SESSION_OF_ANOTHER_PROFESSIONAL")
def invoice_another_professionals_session(w: World) -> Refused:
    return _invoice(w, w.paid_session(), professional_id="pro-2")


@refusal("NOTHING_TO_INVOICE")
def invoice_up_to_a_time_with_nothing_paid(w: World) -> Refused:
    cmd = CreateInvoice("pro-1", (), w.clock.now(), _id())
    return lambda: w.invoices.create_invoice(SERVICE, cmd)


@refusal("TOO_MANY_SESSIONS")
def invoice_more_than_an_invoice_holds(w: World) -> Refused:
    _many_paid(w)
    cmd = CreateInvoice("pro-1", (), w.clock.now() + 3 * HOUR, _id())
    return lambda: w.invoices.create_invoice(SERVICE, cmd)


@refusal("INVOICE_NOT_DRAFT")
def add_to_a_submitted_invoice(w: World) -> Refused:
    invoice_id, s = _submitted(w), w.paid_session()
    return lambda: w.invoices.add_to_invoice(SERVICE, ChangeInvoiceLines(invoice_id, (s,), _id()))


@refusal("SESSION_NOT_ON_INVOICE")
def remove_a_session_not_on_the_invoice(w: World) -> Refused:
    (_, invoice_id), s = _on_invoice(w), w.paid_session()
    return lambda: w.invoices.remove_from_invoice(SERVICE, ChangeInvoiceLines(invoice_id, (s,), _id()))


@refusal("INVOICE_EMPTY")
def submit_an_empty_invoice(w: World) -> Refused:
    s, invoice_id = _on_invoice(w)
    w.invoices.remove_from_invoice(SERVICE, ChangeInvoiceLines(invoice_id, (s,), _id()))
    return lambda: w.invoices.submit_invoice(SERVICE, SubmitInvoice(invoice_id, _id()))


# Reads


@refusal("INVALID_REQUEST")
def list_sessions_of_no_one(w: World) -> Refused:
    return lambda: w.services.list_sessions(SERVICE, "", "", None, 10, "")


@refusal("PERMISSION_DENIED")
def list_another_professionals_payments(w: World) -> Refused:
    return lambda: w.services.list_payments(PRO, "pro-2", PaymentSection.PAID, 10, "")


@refusal("INVALID_REQUEST")
def read_the_feed_after_a_made_up_cursor(w: World) -> Refused:
    return lambda: w.events.list_events(SERVICE, "not-a-cursor", 10, ())


@refusal("CURSOR_EXPIRED")
def read_the_feed_after_a_pruned_cursor(w: World) -> Refused:
    w.book()
    first = w.events.list_events(SERVICE, "", 10, ())[0].cursor
    w.clock.advance(timedelta(days=31))
    assert w.events.prune() > 1
    return lambda: w.events.list_events(SERVICE, first, 10, ())


@pytest.mark.parametrize(("setup", "reason"), REFUSALS.values(), ids=REFUSALS.keys())
def test_every_refusal_changes_nothing(world: World, setup: Setup, reason: str) -> None:
    call = setup(world)
    before, commits = world.store.data.copy(), world.store.commits
    with pytest.raises(DomainError) as refused:
        call()
    assert refused.value.reason == reason, refused.value
    assert world.store.data == before
    assert world.store.commits == commits
