"""Calling the server as callers no one here wrote do: plain stubs generated from protos/, with
no deadline, no metadata and no help from SessionsClient. Every RPC of the API is reached by its
full name from the protobuf descriptors, so a new RPC cannot be left out of the suite."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from kara.sessions.v1 import credits_pb2, events_pb2, invoices_pb2, programmes_pb2, sessions_pb2

from kara_sessions_client.client import SessionsClient

from .clock import FakeClock

API_FILES = (sessions_pb2, credits_pb2, invoices_pb2, events_pb2, programmes_pb2)


def api_methods() -> list[MethodDescriptor]:
    """Every RPC the API declares, in declaration order."""
    return [
        method
        for module in API_FILES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def message_class(full_name: str) -> type[Message]:
    cls: type[Message] = message_factory.GetMessageClass(
        descriptor_pool.Default().FindMessageTypeByName(full_name)
    )
    return cls


def raw_call(channel: grpc.Channel, method: MethodDescriptor) -> Callable[..., object]:
    """A multicallable as a generated stub makes it: the caller's own serializer, no deadline."""
    response = message_class(method.output_type.full_name)
    kinds = {"request_serializer": _serialize, "response_deserializer": response.FromString}
    if method.server_streaming:
        return channel.unary_stream(path(method), **kinds)
    return channel.unary_unary(path(method), **kinds)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def raw_bytes_call(channel: grpc.Channel, method: MethodDescriptor) -> Callable[..., object]:
    """The same method, sending whatever bytes it is given as the request."""
    if method.server_streaming:
        return channel.unary_stream(path(method), request_serializer=bytes)
    return channel.unary_unary(path(method), request_serializer=bytes)


def ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


@dataclass
class World:
    """What the valid requests below name: sessions booked ahead, started, paid, invoiced."""

    now: datetime
    booked: str
    started: str
    paid: str
    invoiced: str
    invoice: str
    client: str = "fc-client"
    professional: str = "fc-pro"


def make_world(kara: SessionsClient, clock: FakeClock, spare_credits: int) -> World:
    """Books what World names (the clock then 90 minutes on, so one has started), leaving the
    client `spare_credits` to book with."""
    client, pro = "fc-client", "fc-pro"
    kara.grant_credits(client, 4 + spare_credits)
    booked = kara.book(client, pro, clock.now() + timedelta(days=3)).session_id
    started = kara.book(client, pro, clock.now() + timedelta(hours=1)).session_id
    paid = kara.book(client, pro, clock.now() + timedelta(hours=2)).session_id
    invoiced = kara.book(client, pro, clock.now() + timedelta(hours=3)).session_id
    kara.cancel(paid, "client")
    kara.cancel(invoiced, "client")
    invoice = kara.create_invoice(pro, [invoiced]).invoice_id
    clock.advance(timedelta(hours=1, minutes=30))
    return World(clock.now(), booked, started, paid, invoiced, invoice)


def rid() -> str:
    return f"fc-{uuid.uuid4().hex}"


def valid_request(method: MethodDescriptor, w: World) -> Message:
    """A well-formed request for `method`, as a careful caller sends it (a new request_id each)."""
    build: dict[str, Callable[[], Message]] = {
        "BookSession": lambda: sessions_pb2.BookSessionRequest(
            client_id=w.client,
            professional_id=w.professional,
            starts_at=ts(w.now + timedelta(days=5)),
            request_id=rid(),
        ),
        "GetSession": lambda: sessions_pb2.GetSessionRequest(session_id=w.booked),
        "MarkNoShow": lambda: sessions_pb2.MarkNoShowRequest(session_id=w.started, request_id=rid()),
        "WaiveCharge": lambda: sessions_pb2.WaiveChargeRequest(
            session_id=w.paid, reason="goodwill", request_id=rid()
        ),
        "ListSessions": lambda: sessions_pb2.ListSessionsRequest(professional_id=w.professional),
        "CancelSession": lambda: sessions_pb2.CancelSessionRequest(
            session_id=w.booked, cancelled_by=sessions_pb2.PARTY_CLIENT, request_id=rid()
        ),
        "PreviewCancellation": lambda: sessions_pb2.CancelSessionRequest(
            session_id=w.booked, cancelled_by=sessions_pb2.PARTY_PROFESSIONAL
        ),
        # Five days' notice and a day later: moved in place, so the world's session stays booked.
        "RescheduleSession": lambda: sessions_pb2.RescheduleSessionRequest(
            session_id=w.booked,
            new_starts_at=ts(w.now + timedelta(days=6, seconds=uuid.uuid4().int % 86_400)),
            rescheduled_by=sessions_pb2.PARTY_CLIENT,
            request_id=rid(),
        ),
        "PreviewReschedule": lambda: sessions_pb2.RescheduleSessionRequest(
            session_id=w.booked,
            new_starts_at=ts(w.now + timedelta(days=6)),
            rescheduled_by=sessions_pb2.PARTY_PROFESSIONAL,
        ),
        "CompleteSession": lambda: sessions_pb2.CompleteSessionRequest(
            session_id=w.started, request_id=rid()
        ),
        "GetPayment": lambda: sessions_pb2.GetPaymentRequest(session_id=w.paid),
        "ListPayments": lambda: sessions_pb2.ListPaymentsRequest(
            professional_id=w.professional, section=sessions_pb2.PAYMENT_SECTION_PAID
        ),
        "GrantCredits": lambda: credits_pb2.GrantCreditsRequest(
            client_id=w.client, credits=1, request_id=rid()
        ),
        "GetCreditAccount": lambda: credits_pb2.GetCreditAccountRequest(client_id=w.client),
        "CreateInvoice": lambda: invoices_pb2.CreateInvoiceRequest(
            professional_id=w.professional, up_to=ts(w.now + timedelta(days=1)), request_id=rid()
        ),
        "GetInvoice": lambda: invoices_pb2.GetInvoiceRequest(invoice_id=w.invoice),
        "ListInvoices": lambda: invoices_pb2.ListInvoicesRequest(professional_id=w.professional),
        "AddToInvoice": lambda: invoices_pb2.AddToInvoiceRequest(
            invoice_id=w.invoice, session_ids=[w.paid], request_id=rid()
        ),
        "RemoveFromInvoice": lambda: invoices_pb2.RemoveFromInvoiceRequest(
            invoice_id=w.invoice, session_ids=[w.invoiced], request_id=rid()
        ),
        "SubmitInvoice": lambda: invoices_pb2.SubmitInvoiceRequest(invoice_id=w.invoice, request_id=rid()),
        "ListEvents": events_pb2.ListEventsRequest,
        "StreamEvents": events_pb2.StreamEventsRequest,
        "CreateProgramme": lambda: programmes_pb2.CreateProgrammeRequest(
            programme_id=f"p-{uuid.uuid4().hex[:12]}",
            programme=programmes_pb2.Programme(
                display_name="Foreign", notice_window={"seconds": 86_400}, no_show_takes_credit=True
            ),
            request_id=rid(),
        ),
        "GetProgramme": lambda: programmes_pb2.GetProgrammeRequest(programme_id="default"),
        "ListProgrammes": programmes_pb2.ListProgrammesRequest,
        "GetProgrammeUsage": lambda: programmes_pb2.GetProgrammeUsageRequest(
            programme_id="default", start_time=ts(w.now - timedelta(days=30)), end_time=ts(w.now)
        ),
        "SimulateTerms": lambda: programmes_pb2.SimulateTermsRequest(
            programme_id="default",
            start_time=ts(w.now - timedelta(days=30)),
            end_time=ts(w.now),
            terms=programmes_pb2.ProgrammeTerms(notice_window={"seconds": 2 * 86_400}),
            update_mask={"paths": ["notice_window"]},
        ),
        "UpdateProgramme": lambda: programmes_pb2.UpdateProgrammeRequest(
            programme=programmes_pb2.Programme(programme_id="default", display_name=f"Default {rid()[:10]}"),
            update_mask={"paths": ["display_name"]},
            request_id=rid(),
        ),
    }
    return build[method.name]()


def outcome(call: Callable[..., object], request: object, streaming: bool) -> grpc.StatusCode:
    """The status a plain call ends with. A stream is read until its first event, then dropped,
    as a consumer that has what it came for does."""
    try:
        result = call(request)
        if streaming:
            stream: Iterator[object] = result  # type: ignore[assignment]
            next(stream, None)
            stream.cancel()  # type: ignore[attr-defined]
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


# A caller's request, however odd, is never answered with these: they mean the server failed.
SERVER_FAULTS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
