"""gRPC servicers. Each handler parses and validates its request, calls one service function as
the authenticated caller and converts the result. Authentication, error statuses, metrics and
logs are the interceptor's (interceptor.py)."""

from __future__ import annotations

import grpc
from kara.sessions.v1 import credits_pb2 as cpb
from kara.sessions.v1 import credits_pb2_grpc, sessions_pb2_grpc
from kara.sessions.v1 import sessions_pb2 as pb

from .convert import (
    MAX_GRANT,
    MAX_REASON_LENGTH,
    PARTY_FROM_PB,
    SECTION_FROM_PB,
    SESSION_STATE_FROM_PB,
    RequestReader,
    account_pb,
    payment_pb,
    preview_pb,
    session_pb,
)
from .interceptor import caller
from .model import BookSession, CancelSession, CompleteSession, GrantCredits, PaymentSection
from .services import Services

Ctx = grpc.ServicerContext


def _cancel_command(request: pb.CancelSessionRequest, *, require_request_id: bool) -> CancelSession:
    r = RequestReader(request)
    session_id = r.id("session_id")
    party = r.enum("cancelled_by", PARTY_FROM_PB, required=True, allowed="PARTY_CLIENT, PARTY_PROFESSIONAL")
    notified_at = r.timestamp("notified_at", required=False)
    reason = r.text("reason", MAX_REASON_LENGTH)
    request_id = r.id("request_id", required=require_request_id)
    r.done()
    assert party is not None
    return CancelSession(session_id, party, request.charge_client, notified_at, reason, request_id)


class SessionServicer(sessions_pb2_grpc.SessionServiceServicer):
    def __init__(self, services: Services):
        self.services = services

    def BookSession(self, request: pb.BookSessionRequest, context: Ctx) -> pb.Session:
        r = RequestReader(request)
        cmd = BookSession(
            client_id=r.id("client_id"),
            professional_id=r.id("professional_id"),
            starts_at=r.timestamp("starts_at", required=True),  # type: ignore[arg-type]
            request_id=r.request_id(),
        )
        r.done()
        return session_pb(self.services.book_session(caller(), cmd))

    def GetSession(self, request: pb.GetSessionRequest, context: Ctx) -> pb.Session:
        r = RequestReader(request)
        session_id = r.id("session_id")
        r.done()
        return session_pb(self.services.get_session(caller(), session_id))

    def ListSessions(self, request: pb.ListSessionsRequest, context: Ctx) -> pb.ListSessionsResponse:
        r = RequestReader(request)
        professional_id = r.id("professional_id", required=False)
        client_id = r.id("client_id", required=False)
        state = r.enum("state", SESSION_STATE_FROM_PB, required=False, allowed="a SessionState")
        r.done()
        page = self.services.list_sessions(
            caller(), professional_id, client_id, state, request.page_size, request.page_token
        )
        return pb.ListSessionsResponse(
            sessions=[session_pb(s) for s in page.items], next_page_token=page.next_page_token
        )

    def CancelSession(self, request: pb.CancelSessionRequest, context: Ctx) -> pb.CancelSessionResponse:
        session, payment = self.services.cancel_session(
            caller(), _cancel_command(request, require_request_id=True)
        )
        return pb.CancelSessionResponse(session=session_pb(session), payment=payment_pb(payment))

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
        section = r.enum(
            "section", SECTION_FROM_PB, required=True, allowed="PAYMENT_SECTION_UNPAID, PAYMENT_SECTION_PAID"
        )
        r.done()
        assert isinstance(section, PaymentSection)
        page = self.services.list_payments(
            caller(), professional_id, section, request.page_size, request.page_token
        )
        return pb.ListPaymentsResponse(
            payments=[payment_pb(p) for p in page.items], next_page_token=page.next_page_token
        )


class CreditServicer(credits_pb2_grpc.CreditServiceServicer):
    def __init__(self, services: Services):
        self.services = services

    def GrantCredits(self, request: cpb.GrantCreditsRequest, context: Ctx) -> cpb.CreditAccount:
        r = RequestReader(request)
        client_id = r.id("client_id")
        if not 1 <= request.credits <= MAX_GRANT:
            r.fail("credits", f"must be between 1 and {MAX_GRANT}")
        request_id = r.request_id()
        r.done()
        return account_pb(
            self.services.grant_credits(caller(), GrantCredits(client_id, request.credits, request_id))
        )

    def GetCreditAccount(self, request: cpb.GetCreditAccountRequest, context: Ctx) -> cpb.CreditAccount:
        r = RequestReader(request)
        client_id = r.id("client_id")
        r.done()
        return account_pb(
            self.services.get_credit_account(caller(), client_id, request.page_size, request.page_token)
        )
