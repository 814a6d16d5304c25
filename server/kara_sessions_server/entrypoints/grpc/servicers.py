"""gRPC servicers. Each handler parses and validates its request, calls one service function as
the authenticated caller and converts the result. Authentication, error statuses, metrics and
logs are the interceptor's (interceptor.py)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
from google.rpc import code_pb2
from kara.sessions.v1 import credits_pb2 as cpb
from kara.sessions.v1 import (
    credits_pb2_grpc,
    events_pb2_grpc,
    invoices_pb2_grpc,
    programmes_pb2_grpc,
    sessions_pb2_grpc,
)
from kara.sessions.v1 import events_pb2 as epb
from kara.sessions.v1 import invoices_pb2 as ipb
from kara.sessions.v1 import programmes_pb2 as ppb
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_server.domain.feed import EventType, FeedEvent
from kara_sessions_server.domain.invoicing import MAX_INVOICE_LINES
from kara_sessions_server.domain.model import (
    BookSession,
    CancelSession,
    ChangeInvoiceLines,
    CompleteSession,
    CreateInvoice,
    CreateProgramme,
    GrantCredits,
    MarkNoShow,
    Payment,
    PaymentSection,
    RescheduleSession,
    Session,
    SubmitInvoice,
    UpdateProgramme,
    WaiveCharge,
)
from kara_sessions_server.domain.programme import (
    MAX_DISPLAY_NAME,
    MUTABLE_FIELDS,
    ProgrammeChanges,
    Terms,
)
from kara_sessions_server.entrypoints.grpc.convert import (
    INVOICE_STATE_FROM_PB,
    MAX_GRANT,
    MAX_REASON_LENGTH,
    PARTY_FROM_PB,
    SECTION_FROM_PB,
    SESSION_STATE_FROM_PB,
    TERM_FIELDS,
    RequestReader,
    account_pb,
    count_pb,
    event_pb,
    fill_payment,
    fill_session,
    invoice_pb,
    ledger_entry_pb,
    payment_pb,
    preview_pb,
    programme_pb,
    reschedule_preview_pb,
    session_pb,
    usage_pb,
)
from kara_sessions_server.entrypoints.grpc.interceptor import abort, caller
from kara_sessions_server.entrypoints.grpc.metrics import Metrics
from kara_sessions_server.entrypoints.grpc.sizes import fit, fit_all
from kara_sessions_server.entrypoints.grpc.status import error_info, status
from kara_sessions_server.service_layer.feed import DEFAULT_PAGE_SIZE as FEED_PAGE_SIZE
from kara_sessions_server.service_layer.feed import EventServices
from kara_sessions_server.service_layer.invoice_services import InvoiceServices
from kara_sessions_server.service_layer.programme_reports import ProgrammeReports
from kara_sessions_server.service_layer.programme_services import ProgrammeServices
from kara_sessions_server.service_layer.services import Services

Ctx = grpc.ServicerContext
S = TypeVar("S", pb.CancelSessionResponse, pb.MarkNoShowResponse, pb.WaiveChargeResponse)

# A cursor is a few dozen characters; anything much longer is not one.
MAX_CURSOR_LENGTH = 200
# An etag is "v" and a version; anything much longer is not one of ours.
MAX_ETAG_LENGTH = 64


def _cancel_command(request: pb.CancelSessionRequest, *, require_request_id: bool) -> CancelSession:
    r = RequestReader(request)
    session_id = r.id("session_id")
    party = r.enum("cancelled_by", PARTY_FROM_PB, required=True)
    notified_at = r.timestamp("notified_at", required=False)
    reason = r.text("reason", MAX_REASON_LENGTH)
    request_id = r.id("request_id", required=require_request_id)
    r.done()
    assert party is not None
    return CancelSession(session_id, party, request.charge_client, notified_at, reason, request_id)


def _reschedule_command(
    request: pb.RescheduleSessionRequest, *, require_request_id: bool
) -> RescheduleSession:
    r = RequestReader(request)
    session_id = r.id("session_id")
    new_starts_at = r.timestamp("new_starts_at", required=True)
    party = r.enum("rescheduled_by", PARTY_FROM_PB, required=True)
    notified_at = r.timestamp("notified_at", required=False)
    reason = r.text("reason", MAX_REASON_LENGTH)
    request_id = r.id("request_id", required=require_request_id)
    r.done()
    assert party is not None and new_starts_at is not None
    return RescheduleSession(
        session_id, new_starts_at, party, request.charge_client, notified_at, reason, request_id
    )


def _settled(response: S, settled: tuple[Session, Payment]) -> S:
    """A response of a session and its payment (CancelSession, MarkNoShow, WaiveCharge), written
    in place."""
    fill_session(response.session, settled[0])
    fill_payment(response.payment, settled[1])
    return response


# Each term's type, default (MISSING: required) and, for an enum, the domain value of each
# protobuf number, UNSPECIFIED meaning the term's default.
_TERM_READERS = {
    name: (kind, default, None if numbers is None else {0: default} | {n: m for m, n in numbers.items()})
    for name, kind, default, numbers in TERM_FIELDS
}


def _term(
    r: RequestReader, given: ppb.Programme | ppb.ProgrammeTerms, name: str, prefix: str = "programme"
) -> Any:
    """`prefix`.`name`, a term, read by its type: a duration (required unless the term has a
    default, which unset means), an enum (UNSPECIFIED means the default), or as it is."""
    kind, default, numbers = _TERM_READERS[name]
    path = f"{prefix}.{name}"
    if kind is timedelta:
        return r.duration(given, name, path, None if default is dataclasses.MISSING else default)  # type: ignore[arg-type]
    if numbers is not None:
        return r.enum(name, numbers, required=False, message=given, name=path)
    return getattr(given, name)


def _masked(r: RequestReader, given: Sequence[str], fields: Sequence[str], *, empty_is_all: bool) -> set[str]:
    """An update mask's paths among `fields` ("*": all of them; none: all of them where
    `empty_is_all`, else refused as naming nothing)."""
    paths = set(given)
    if "*" in paths or (empty_is_all and not paths):
        return set(fields)
    unknown = sorted(paths - set(fields))
    if not paths or unknown:
        r.fail(
            "update_mask",
            f"name the fields to change among {', '.join(fields)} (or *)"
            + (f"; not {', '.join(unknown)}" if unknown else ""),
        )
    return paths


def _period(r: RequestReader) -> tuple[str, datetime | None, datetime | None]:
    """A report's programme and period, read from its request."""
    return (
        r.id("programme_id"),
        r.timestamp("start_time", required=True),
        r.timestamp("end_time", required=True),
    )


class SessionServicer(sessions_pb2_grpc.SessionServiceServicer):
    def __init__(self, services: Services, budget: int):
        self.services = services
        # What a page's records may take of a message (sizes.fit).
        self.budget = budget

    def BookSession(self, request: pb.BookSessionRequest, context: Ctx) -> pb.Session:
        r = RequestReader(request)
        cmd = BookSession(
            client_id=r.id("client_id"),
            professional_id=r.id("professional_id"),
            starts_at=r.timestamp("starts_at", required=True),  # type: ignore[arg-type]
            request_id=r.request_id(),
            programme_id=r.programme_id(),
        )
        r.done()
        return session_pb(self.services.book_session(caller(), cmd))

    def MarkNoShow(self, request: pb.MarkNoShowRequest, context: Ctx) -> pb.MarkNoShowResponse:
        r = RequestReader(request)
        cmd = MarkNoShow(session_id=r.id("session_id"), request_id=r.request_id())
        r.done()
        return _settled(pb.MarkNoShowResponse(), self.services.mark_no_show(caller(), cmd))

    def WaiveCharge(self, request: pb.WaiveChargeRequest, context: Ctx) -> pb.WaiveChargeResponse:
        r = RequestReader(request)
        session_id = r.id("session_id")
        reason = r.text("reason", MAX_REASON_LENGTH)
        if not reason.strip():
            r.fail("reason", "is required: say why the charge is waived (it is kept with the waiver)")
        cmd = WaiveCharge(session_id=session_id, reason=reason, request_id=r.request_id())
        r.done()
        return _settled(pb.WaiveChargeResponse(), self.services.waive_charge(caller(), cmd))

    def GetSession(self, request: pb.GetSessionRequest, context: Ctx) -> pb.Session:
        r = RequestReader(request)
        session_id = r.id("session_id")
        r.done()
        return session_pb(self.services.get_session(caller(), session_id))

    def ListSessions(self, request: pb.ListSessionsRequest, context: Ctx) -> pb.ListSessionsResponse:
        r = RequestReader(request)
        professional_id = r.id("professional_id", required=False)
        client_id = r.id("client_id", required=False)
        state = r.enum("state", SESSION_STATE_FROM_PB, required=False)
        size = r.page_size()
        r.done()
        page = self.services.list_sessions(
            caller(), professional_id, client_id, state, size, request.page_token
        )
        sessions, token = fit(page.items, session_pb, self.budget, page.next_page_token, page.token_after)
        return pb.ListSessionsResponse(sessions=sessions, next_page_token=token)

    def CancelSession(self, request: pb.CancelSessionRequest, context: Ctx) -> pb.CancelSessionResponse:
        settled = self.services.cancel_session(caller(), _cancel_command(request, require_request_id=True))
        return _settled(pb.CancelSessionResponse(), settled)

    def RescheduleSession(
        self, request: pb.RescheduleSessionRequest, context: Ctx
    ) -> pb.RescheduleSessionResponse:
        done = self.services.reschedule_session(
            caller(), _reschedule_command(request, require_request_id=True)
        )
        response = pb.RescheduleSessionResponse()
        fill_session(response.session, done.session)
        if done.charged is not None:
            fill_session(response.charged, done.charged)
        return response

    def PreviewReschedule(
        self, request: pb.RescheduleSessionRequest, context: Ctx
    ) -> pb.PreviewRescheduleResponse:
        outcome = self.services.preview_reschedule(
            caller(), _reschedule_command(request, require_request_id=False)
        )
        return reschedule_preview_pb(outcome)

    def PreviewCancellation(
        self, request: pb.CancelSessionRequest, context: Ctx
    ) -> pb.PreviewCancellationResponse:
        outcome = self.services.preview_cancellation(
            caller(), _cancel_command(request, require_request_id=False)
        )
        return preview_pb(outcome)

    def CompleteSession(self, request: pb.CompleteSessionRequest, context: Ctx) -> pb.Session:
        r = RequestReader(request)
        cmd = CompleteSession(session_id=r.id("session_id"), request_id=r.request_id())
        r.done()
        return session_pb(self.services.complete_session(caller(), cmd))

    def GetPayment(self, request: pb.GetPaymentRequest, context: Ctx) -> pb.Payment:
        r = RequestReader(request)
        session_id = r.id("session_id")
        r.done()
        return payment_pb(self.services.get_payment(caller(), session_id))

    def ListPayments(self, request: pb.ListPaymentsRequest, context: Ctx) -> pb.ListPaymentsResponse:
        r = RequestReader(request)
        professional_id = r.id("professional_id")
        section = r.enum("section", SECTION_FROM_PB, required=True)
        size = r.page_size()
        r.done()
        assert isinstance(section, PaymentSection)
        page = self.services.list_payments(caller(), professional_id, section, size, request.page_token)
        payments, token = fit(page.items, payment_pb, self.budget, page.next_page_token, page.token_after)
        return pb.ListPaymentsResponse(payments=payments, next_page_token=token)


class CreditServicer(credits_pb2_grpc.CreditServiceServicer):
    def __init__(self, services: Services, budget: int):
        self.services = services
        self.budget = budget

    def GrantCredits(self, request: cpb.GrantCreditsRequest, context: Ctx) -> cpb.CreditAccount:
        r = RequestReader(request)
        client_id = r.id("client_id")
        if not 1 <= request.credits <= MAX_GRANT:
            r.fail("credits", f"must be between 1 and {MAX_GRANT}")
        request_id = r.request_id()
        programme_id = r.programme_id()
        expires_at = r.timestamp("expire_time", required=False)
        r.done()
        cmd = GrantCredits(client_id, request.credits, request_id, programme_id, expires_at)
        return account_pb(self.services.grant_credits(caller(), cmd))

    def GetCreditAccount(self, request: cpb.GetCreditAccountRequest, context: Ctx) -> cpb.CreditAccount:
        r = RequestReader(request)
        client_id = r.id("client_id")
        programme_id = r.programme_id()
        size = r.page_size()
        r.done()
        account = self.services.get_credit_account(
            caller(), client_id, programme_id, size, request.page_token
        )
        response = account_pb(replace(account, entries=()))
        if account.entries and account.entries_after is not None:
            entries, token = fit(
                account.entries, ledger_entry_pb, self.budget, account.next_page_token, account.entries_after
            )
            response.entries.extend(entries)
            response.next_page_token = token
        return response


def _lines_command(request: ipb.AddToInvoiceRequest | ipb.RemoveFromInvoiceRequest) -> ChangeInvoiceLines:
    r = RequestReader(request)
    cmd = ChangeInvoiceLines(
        invoice_id=r.id("invoice_id"),
        session_ids=r.ids("session_ids", MAX_INVOICE_LINES),
        request_id=r.request_id(),
    )
    r.done()
    return cmd


class InvoiceServicer(invoices_pb2_grpc.InvoiceServiceServicer):
    def __init__(self, services: InvoiceServices, budget: int):
        self.services = services
        self.budget = budget

    def CreateInvoice(self, request: ipb.CreateInvoiceRequest, context: Ctx) -> ipb.Invoice:
        r = RequestReader(request)
        professional_id = r.id("professional_id")
        up_to = r.timestamp("up_to", required=False)
        session_ids: tuple[str, ...] = ()
        if request.session_ids and request.HasField("up_to"):
            r.fail("session_ids", "give either session_ids or up_to, not both")
        elif not request.HasField("up_to"):
            session_ids = r.ids("session_ids", MAX_INVOICE_LINES)
        request_id = r.request_id()
        r.done()
        cmd = CreateInvoice(professional_id, session_ids, up_to, request_id)
        return invoice_pb(self.services.create_invoice(caller(), cmd))

    def GetInvoice(self, request: ipb.GetInvoiceRequest, context: Ctx) -> ipb.Invoice:
        r = RequestReader(request)
        invoice_id = r.id("invoice_id")
        r.done()
        return invoice_pb(self.services.get_invoice(caller(), invoice_id))

    def ListInvoices(self, request: ipb.ListInvoicesRequest, context: Ctx) -> ipb.ListInvoicesResponse:
        r = RequestReader(request)
        professional_id = r.id("professional_id")
        state = r.enum("state", INVOICE_STATE_FROM_PB, required=False)
        size = r.page_size()
        r.done()
        page = self.services.list_invoices(caller(), professional_id, state, size, request.page_token)
        invoices, token = fit(page.items, invoice_pb, self.budget, page.next_page_token, page.token_after)
        return ipb.ListInvoicesResponse(invoices=invoices, next_page_token=token)

    def AddToInvoice(self, request: ipb.AddToInvoiceRequest, context: Ctx) -> ipb.Invoice:
        return invoice_pb(self.services.add_to_invoice(caller(), _lines_command(request)))

    def RemoveFromInvoice(self, request: ipb.RemoveFromInvoiceRequest, context: Ctx) -> ipb.Invoice:
        return invoice_pb(self.services.remove_from_invoice(caller(), _lines_command(request)))

    def SubmitInvoice(self, request: ipb.SubmitInvoiceRequest, context: Ctx) -> ipb.Invoice:
        r = RequestReader(request)
        cmd = SubmitInvoice(invoice_id=r.id("invoice_id"), request_id=r.request_id())
        r.done()
        return invoice_pb(self.services.submit_invoice(caller(), cmd))


def _feed_request(
    request: epb.ListEventsRequest | epb.StreamEventsRequest, r: RequestReader | None = None
) -> tuple[str, tuple[EventType, ...]]:
    """The cursor and the types asked for (`r`: a reader that has read other fields)."""
    r = r or RequestReader(request)
    after = r.text("after", MAX_CURSOR_LENGTH)
    known = {t.value for t in EventType}
    for index, name in enumerate(request.types):
        if name not in known:
            r.fail(f"types[{index}]", f"unknown event type {name!r}; known: {', '.join(sorted(known))}")
    r.done()
    return after, tuple(EventType(name) for name in dict.fromkeys(request.types))


class StreamGate:
    """Bounds the open StreamEvents calls (each holds a worker thread for as long as it is open)
    and ends them all when the server shuts down."""

    def __init__(self, limit: int):
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)
        self.closing = threading.Event()

    def try_enter(self) -> bool:
        return not self.closing.is_set() and self._slots.acquire(blocking=False)

    def leave(self) -> None:
        self._slots.release()


class EventServicer(events_pb2_grpc.EventServiceServicer):
    def __init__(self, services: EventServices, gate: StreamGate, metrics: Metrics, budget: int):
        self.services = services
        self.budget = budget
        self.gate = gate
        self.metrics = metrics

    def ListEvents(self, request: epb.ListEventsRequest, context: Ctx) -> epb.ListEventsResponse:
        r = RequestReader(request)
        size = r.page_size(FEED_PAGE_SIZE)
        after, types = _feed_request(request, r)
        events = self.services.list_events(caller(), after, size, types)
        # Fewer events than page_size when they would not fit: the caller resumes after the last.
        return epb.ListEventsResponse(events=fit_all(events, event_pb, self.budget))

    def StreamEvents(self, request: epb.StreamEventsRequest, context: Ctx) -> Iterator[epb.Event]:
        after, types = _feed_request(request)
        # Read now, while the interceptor has set it: the stream below runs after this returns.
        who = caller()
        return self._stream(context, self.services.follow(who, after, types, lambda: self._open(context)))

    def _open(self, context: Ctx) -> bool:
        return context.is_active() and not self.gate.closing.is_set()

    def _stream(self, context: Ctx, events: Iterator[FeedEvent]) -> Iterator[epb.Event]:
        if not self.gate.try_enter():
            abort(
                context,
                status(
                    code_pb2.RESOURCE_EXHAUSTED,
                    f"this server streams events to at most {self.gate.limit} callers at once (or is "
                    "shutting down): retry later, poll ListEvents, or raise --max-event-streams",
                    error_info("TOO_MANY_STREAMS", limit=str(self.gate.limit)),
                ),
            )
        # A caller that hangs up wakes the stream at once instead of at its next look.
        context.add_callback(self.services.wake_followers)
        self.metrics.event_streams.inc()
        try:
            for event in events:
                self.metrics.event_lag.observe(max(0.0, (datetime.now(UTC) - event.time).total_seconds()))
                yield event_pb(event)
        finally:
            self.metrics.event_streams.dec()
            self.gate.leave()


class ProgrammeServicer(programmes_pb2_grpc.ProgrammeServiceServicer):
    def __init__(self, services: ProgrammeServices, reports: ProgrammeReports, budget: int):
        self.services = services
        self.reports = reports
        self.budget = budget

    def GetProgrammeUsage(self, request: ppb.GetProgrammeUsageRequest, context: Ctx) -> ppb.ProgrammeUsage:
        r = RequestReader(request)
        programme_id, start, end = _period(r)
        r.done()
        assert start is not None and end is not None
        report = self.reports.usage(caller(), programme_id, start, end)
        return usage_pb(report, programme_id, start, end)

    def SimulateTerms(self, request: ppb.SimulateTermsRequest, context: Ctx) -> ppb.SimulateTermsResponse:
        r = RequestReader(request)
        programme_id, start, end = _period(r)
        paths = _masked(r, request.update_mask.paths, tuple(_TERM_READERS), empty_is_all=True)
        given = {
            name: _term(r, request.terms, name, "terms") if name in paths else None for name in _TERM_READERS
        }
        r.done()
        assert start is not None and end is not None
        done = self.reports.simulate(caller(), programme_id, start, end, ProgrammeChanges(**given))
        return ppb.SimulateTermsResponse(
            current=usage_pb(done.current, programme_id, start, end),
            proposed=usage_pb(done.proposed, programme_id, start, end),
            decisions_changed=count_pb(done.changed),
            refused=count_pb(done.refused),
        )

    def CreateProgramme(self, request: ppb.CreateProgrammeRequest, context: Ctx) -> ppb.Programme:
        r = RequestReader(request)
        given = request.programme
        terms = {name: _term(r, given, name) for name in _TERM_READERS}
        r.text("display_name", MAX_DISPLAY_NAME, message=given, name="programme.display_name")
        request_id = r.request_id()
        r.done()
        cmd = CreateProgramme(request.programme_id, given.display_name, Terms(**terms), request_id)
        return programme_pb(self.services.create_programme(caller(), cmd))

    def GetProgramme(self, request: ppb.GetProgrammeRequest, context: Ctx) -> ppb.Programme:
        r = RequestReader(request)
        programme_id = r.id("programme_id")
        r.done()
        return programme_pb(self.services.get_programme(caller(), programme_id))

    def ListProgrammes(self, request: ppb.ListProgrammesRequest, context: Ctx) -> ppb.ListProgrammesResponse:
        r = RequestReader(request)
        size = r.page_size()
        r.done()
        page = self.services.list_programmes(caller(), size, request.page_token)
        programmes, token = fit(page.items, programme_pb, self.budget, page.next_page_token, page.token_after)
        return ppb.ListProgrammesResponse(programmes=programmes, next_page_token=token)

    def UpdateProgramme(self, request: ppb.UpdateProgrammeRequest, context: Ctx) -> ppb.Programme:
        r = RequestReader(request)
        given = request.programme
        r.id("programme_id", message=given, name="programme.programme_id")
        paths = _masked(r, request.update_mask.paths, MUTABLE_FIELDS, empty_is_all=False)
        if "display_name" in paths:
            r.text("display_name", MAX_DISPLAY_NAME, message=given, name="programme.display_name")
        terms = {name: _term(r, given, name) if name in paths else None for name in _TERM_READERS}
        r.text("etag", MAX_ETAG_LENGTH, message=given, name="programme.etag")
        request_id = r.request_id()
        r.done()
        changes = ProgrammeChanges(
            display_name=given.display_name if "display_name" in paths else None, **terms
        )
        cmd = UpdateProgramme(given.programme_id, changes, request_id, etag=given.etag)
        return programme_pb(self.services.update_programme(caller(), cmd))
