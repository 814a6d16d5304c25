"""A typed Python client for kara-sessions, for internal services and scripts.

    with SessionsClient("127.0.0.1:50051") as kara:
        session = kara.book(client_id="c-1", professional_id="p-1", starts_at=when)
        result = kara.cancel(session.session_id, cancelled_by="client")

Errors are raised as KaraError with the gRPC code and the ErrorInfo reason. Mutations get a
fresh request_id unless one is given; transient failures (UNAVAILABLE, DEADLINE_EXCEEDED) are
retried with backoff and the same request_id, which the server never applies twice.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2, field_mask_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
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

from .trace_context import with_trace

R = TypeVar("R")
V = TypeVar("V", bound=int)

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 10.0
# SimulateTerms replays every decision of its period: a large programme's year takes seconds.
SIMULATION_TIMEOUT = 60.0


def choices(values: type[V]) -> dict[str, V]:
    """A protobuf enum's values by the names a person types: without the type's prefix (AIP-126,
    as its zero value spells it), in lower case with dashes (`cancelled-paid`); the zero value
    is no choice. Drawn from the descriptors, so a new value is a new choice."""
    wrapper: Any = values  # protobuf's EnumTypeWrapper
    return _choices_of(wrapper.DESCRIPTOR)  # type: ignore[return-value]


def _choices_of(enum: Any) -> dict[str, int]:
    """`choices`, from the enum's descriptor: each value's number by its typed name."""
    prefix = enum.values[0].name.removesuffix("UNSPECIFIED")
    return {v.name.removeprefix(prefix).lower().replace("_", "-"): v.number for v in enum.values if v.number}


PARTIES = choices(pb.Party)
SECTIONS = choices(pb.PaymentSection)
LATE_RESCHEDULE = choices(ppb.LateReschedule)
CLIENT_LATE_CANCEL = choices(ppb.ClientLateCancel)
UNMARKED_OUTCOME = choices(ppb.UnmarkedOutcome)
INVOICE_STATES = choices(ipb.InvoiceState)
SESSION_STATES = choices(pb.SessionState)

# Transient failures worth another attempt. A mutation is retried with its request_id, so the
# server applies it at most once even when the first attempt committed but its answer was lost.
# ABORTED: the transaction lost a conflict with a concurrent one. INTERNAL (a bug, or a database
# an operator must fix: read-only, full, wrong schema) and refusals are not retried.
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)
# An event stream that ends for one of these is reopened from the last cursor: the server went
# away or is shutting down (CANCELLED, UNAVAILABLE), or has no stream to spare right now.
STREAM_RETRYABLE = RETRYABLE | {grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED}
# How long `events(follow=True)` waits for a server to answer before it reports an outage.
FOLLOW_ANSWER_SECONDS = 3.0


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for RETRYABLE codes; a refusal (INVALID_ARGUMENT,
    FAILED_PRECONDITION, ...) is never retried."""

    attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 5.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_backoff, self.initial_backoff * 2**attempt) * random.uniform(0.5, 1.0))


NO_RETRY = RetryPolicy(attempts=1)


@dataclass(frozen=True)
class TLS:
    """Server authentication (root_certificates: PEM of the CA; None = system roots) and, for
    mutual TLS, the client's own certificate chain and private key (PEM)."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


@dataclass
class KaraError(Exception):
    """A call the server refused or could not complete."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    # (type, subject, description) of each google.rpc.PreconditionFailure violation.
    precondition_violations: list[tuple[str, str, str]] = field(default_factory=list)
    # A refusal of the policy's (a preview's too): the decision behind it.
    decision: pb.Decision | None = None
    attempts: int = 1

    @property
    def transient(self) -> bool:
        """True when the call might succeed if tried again later (server unreachable or slow)."""
        return self.code in RETRYABLE

    def __str__(self) -> str:
        reason = f" [{self.reason}]" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> KaraError:
        call: Any = error
        error_obj = cls(code=call.code(), message=call.details() or "")
        status = rpc_status.from_call(call)
        for detail in status.details if status else ():
            info = error_details_pb2.ErrorInfo()
            bad_request = error_details_pb2.BadRequest()
            failure = error_details_pb2.PreconditionFailure()
            decision = pb.Decision()
            if detail.Unpack(info):
                error_obj.reason = info.reason
                error_obj.metadata = dict(info.metadata)
            elif detail.Unpack(bad_request):
                error_obj.field_violations = [(v.field, v.description) for v in bad_request.field_violations]
            elif detail.Unpack(failure):
                error_obj.precondition_violations = [
                    (v.type, v.subject, v.description) for v in failure.violations
                ]
            elif detail.Unpack(decision):
                error_obj.decision = decision
        return error_obj


def timestamp(value: datetime) -> Timestamp:
    if value.tzinfo is None:
        raise ValueError("give a timezone-aware datetime (e.g. 2026-12-01T10:00:00+00:00)")
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _write_programme(programme: ppb.Programme | ppb.ProgrammeTerms, given: dict[str, object]) -> list[str]:
    """Writes each field given (not None) into `programme` (or terms), by the field's type: a
    duration from a timedelta, an enum from the name a person types (see `choices`), else as it
    is. Returns their names, in order: an update mask's paths."""
    written = []
    for name, value in given.items():
        if value is None:
            continue
        field = programme.DESCRIPTOR.fields_by_name.get(name)
        if field is None:
            raise ValueError(f"{name!r} is not a field of {programme.DESCRIPTOR.name}")
        if isinstance(value, timedelta):
            getattr(programme, name).CopyFrom(_duration(value))
        elif field.enum_type is not None:
            setattr(programme, name, _choices_of(field.enum_type)[str(value)])
        else:
            setattr(programme, name, value)
        written.append(name)
    return written


def _duration(value: timedelta) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(value)
    return d


def new_request_id() -> str:
    return str(uuid.uuid4())


class SessionsClient:
    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy = RetryPolicy(),
        tls: TLS | None = None,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        channel: grpc.Channel | None = None,
    ):
        """`timeout` is the deadline of each attempt, in seconds; `token` is sent as
        `authorization: Bearer <token>`; `metadata` is added to every call."""
        if channel is None:
            channel = grpc.secure_channel(target, tls.credentials()) if tls else grpc.insecure_channel(target)
        self.channel = channel
        self.timeout = timeout
        self.retry = retry
        auth = (("authorization", f"Bearer {token}"),) if token else ()
        self.metadata = (*auth, *metadata)
        self.sessions = sessions_pb2_grpc.SessionServiceStub(self.channel)
        self.credits = credits_pb2_grpc.CreditServiceStub(self.channel)
        self.invoices = invoices_pb2_grpc.InvoiceServiceStub(self.channel)
        self.feed = events_pb2_grpc.EventServiceStub(self.channel)
        self.programmes = programmes_pb2_grpc.ProgrammeServiceStub(self.channel)

    def __enter__(self) -> SessionsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: Any, request: Any, response_type: type[R], timeout: float | None = None) -> R:
        return self._call_replayed(method, request, response_type, trailers=False, timeout=timeout)[0]

    def _call_replayed(
        self,
        method: Any,
        request: Any,
        response_type: type[R],
        trailers: bool = True,
        timeout: float | None = None,
    ) -> tuple[R, bool]:
        """The response, and whether the server says it replays the request_id's first result
        (`timeout`: this call's, instead of the client's)."""
        timeout = timeout or self.timeout
        attempt = 0
        while True:
            try:
                replayed = False
                if trailers:
                    response, call = method.with_call(
                        request, timeout=timeout, metadata=with_trace(self.metadata)
                    )
                    replayed = ("kara-replayed", "true") in tuple(call.trailing_metadata() or ())
                else:
                    response = method(request, timeout=timeout, metadata=with_trace(self.metadata))
            except grpc.RpcError as exc:
                error = KaraError.from_rpc_error(exc)
                attempt += 1
                if error.code not in RETRYABLE or attempt >= self.retry.attempts:
                    error.attempts = attempt
                    raise error from None
                time.sleep(self.retry.delay(attempt - 1))
                continue
            assert isinstance(response, response_type)
            return response, replayed

    # --- sessions ---

    def book(
        self,
        client_id: str,
        professional_id: str,
        starts_at: datetime,
        request_id: str | None = None,
        programme_id: str = "",
    ) -> pb.Session:
        """Holds one of the client's credits of `programme_id` ("" = default) for the session."""
        return self._call(
            self.sessions.BookSession,
            pb.BookSessionRequest(
                client_id=client_id,
                professional_id=professional_id,
                starts_at=timestamp(starts_at),
                request_id=request_id or new_request_id(),
                programme_id=programme_id,
            ),
            pb.Session,
        )

    def mark_no_show(self, session_id: str, request_id: str | None = None) -> pb.MarkNoShowResponse:
        request = pb.MarkNoShowRequest(session_id=session_id, request_id=request_id or new_request_id())
        return self._call(self.sessions.MarkNoShow, request, pb.MarkNoShowResponse)

    def waive_charge(
        self, session_id: str, reason: str, request_id: str | None = None
    ) -> pb.WaiveChargeResponse:
        request = pb.WaiveChargeRequest(
            session_id=session_id, reason=reason, request_id=request_id or new_request_id()
        )
        return self._call(self.sessions.WaiveCharge, request, pb.WaiveChargeResponse)

    def get_session(self, session_id: str) -> pb.Session:
        return self._call(self.sessions.GetSession, pb.GetSessionRequest(session_id=session_id), pb.Session)

    def list_sessions(
        self,
        professional_id: str = "",
        client_id: str = "",
        state: str | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> pb.ListSessionsResponse:
        return self._call(
            self.sessions.ListSessions,
            pb.ListSessionsRequest(
                professional_id=professional_id,
                client_id=client_id,
                state=SESSION_STATES[state] if state else pb.SESSION_STATE_UNSPECIFIED,
                page_size=page_size,
                page_token=page_token,
            ),
            pb.ListSessionsResponse,
        )

    @staticmethod
    def _cancel_request(
        session_id: str,
        cancelled_by: str,
        charge_client: bool,
        notified_at: datetime | None,
        reason: str,
        request_id: str,
    ) -> pb.CancelSessionRequest:
        request = pb.CancelSessionRequest(
            session_id=session_id,
            cancelled_by=PARTIES[cancelled_by],
            charge_client=charge_client,
            reason=reason,
            request_id=request_id,
        )
        if notified_at is not None:
            request.notified_at.CopyFrom(timestamp(notified_at))
        return request

    def cancel(
        self,
        session_id: str,
        cancelled_by: str,
        *,
        charge_client: bool = False,
        notified_at: datetime | None = None,
        reason: str = "",
        request_id: str | None = None,
    ) -> pb.CancelSessionResponse:
        return self.cancel_replayed(
            session_id,
            cancelled_by,
            charge_client=charge_client,
            notified_at=notified_at,
            reason=reason,
            request_id=request_id,
        )[0]

    def cancel_replayed(
        self,
        session_id: str,
        cancelled_by: str,
        *,
        charge_client: bool = False,
        notified_at: datetime | None = None,
        reason: str = "",
        request_id: str | None = None,
    ) -> tuple[pb.CancelSessionResponse, bool]:
        """As `cancel`, and whether the answer is the first result of an earlier call with the
        same request_id (the server's `kara-replayed` trailer): nothing was changed this time."""
        request = self._cancel_request(
            session_id, cancelled_by, charge_client, notified_at, reason, request_id or new_request_id()
        )
        return self._call_replayed(self.sessions.CancelSession, request, pb.CancelSessionResponse)

    def preview(
        self,
        session_id: str,
        cancelled_by: str,
        *,
        charge_client: bool = False,
        notified_at: datetime | None = None,
        reason: str = "",
    ) -> pb.PreviewCancellationResponse:
        request = self._cancel_request(session_id, cancelled_by, charge_client, notified_at, reason, "")
        return self._call(self.sessions.PreviewCancellation, request, pb.PreviewCancellationResponse)

    @staticmethod
    def _reschedule_request(
        session_id: str,
        new_starts_at: datetime,
        rescheduled_by: str,
        charge_client: bool,
        notified_at: datetime | None,
        reason: str,
        request_id: str,
    ) -> pb.RescheduleSessionRequest:
        request = pb.RescheduleSessionRequest(
            session_id=session_id,
            new_starts_at=timestamp(new_starts_at),
            rescheduled_by=PARTIES[rescheduled_by],
            charge_client=charge_client,
            reason=reason,
            request_id=request_id,
        )
        if notified_at is not None:
            request.notified_at.CopyFrom(timestamp(notified_at))
        return request

    def reschedule(
        self,
        session_id: str,
        new_starts_at: datetime,
        rescheduled_by: str,
        *,
        charge_client: bool = False,
        notified_at: datetime | None = None,
        reason: str = "",
        request_id: str | None = None,
    ) -> pb.RescheduleSessionResponse:
        """Moves the session to `new_starts_at`. The response's `session` is the session at its new
        time; `charged` is set when the move was charged (the old session, CANCELLED_PAID)."""
        request = self._reschedule_request(
            session_id,
            new_starts_at,
            rescheduled_by,
            charge_client,
            notified_at,
            reason,
            request_id or new_request_id(),
        )
        return self._call(self.sessions.RescheduleSession, request, pb.RescheduleSessionResponse)

    def preview_reschedule(
        self,
        session_id: str,
        new_starts_at: datetime,
        rescheduled_by: str,
        *,
        charge_client: bool = False,
        notified_at: datetime | None = None,
        reason: str = "",
    ) -> pb.PreviewRescheduleResponse:
        request = self._reschedule_request(
            session_id, new_starts_at, rescheduled_by, charge_client, notified_at, reason, ""
        )
        return self._call(self.sessions.PreviewReschedule, request, pb.PreviewRescheduleResponse)

    def complete(self, session_id: str, request_id: str | None = None) -> pb.Session:
        return self._call(
            self.sessions.CompleteSession,
            pb.CompleteSessionRequest(session_id=session_id, request_id=request_id or new_request_id()),
            pb.Session,
        )

    def get_payment(self, session_id: str) -> pb.Payment:
        return self._call(self.sessions.GetPayment, pb.GetPaymentRequest(session_id=session_id), pb.Payment)

    def list_payments(
        self, professional_id: str, section: str, page_size: int = 0, page_token: str = ""
    ) -> pb.ListPaymentsResponse:
        return self._call(
            self.sessions.ListPayments,
            pb.ListPaymentsRequest(
                professional_id=professional_id,
                section=SECTIONS[section],
                page_size=page_size,
                page_token=page_token,
            ),
            pb.ListPaymentsResponse,
        )

    # --- credits ---

    def grant_credits(
        self,
        client_id: str,
        credits: int,
        request_id: str | None = None,
        programme_id: str = "",
        expires_at: datetime | None = None,
    ) -> cpb.CreditAccount:
        """`expires_at`: when the credits expire (None: never)."""
        request = cpb.GrantCreditsRequest(
            client_id=client_id,
            credits=credits,
            request_id=request_id or new_request_id(),
            programme_id=programme_id,
        )
        if expires_at is not None:
            request.expire_time.CopyFrom(timestamp(expires_at))
        return self._call(self.credits.GrantCredits, request, cpb.CreditAccount)

    def get_credit_account(
        self, client_id: str, page_size: int = 0, page_token: str = "", programme_id: str = ""
    ) -> cpb.CreditAccount:
        request = cpb.GetCreditAccountRequest(
            client_id=client_id, page_size=page_size, page_token=page_token, programme_id=programme_id
        )
        return self._call(self.credits.GetCreditAccount, request, cpb.CreditAccount)

    # --- programmes ---

    def create_programme(
        self,
        programme_id: str,
        display_name: str,
        notice_window: timedelta,
        *,
        professional_may_charge_late: bool = True,
        no_show_takes_credit: bool = True,
        late_reschedule: str = "charge",
        cancellation_grace: timedelta = timedelta(0),
        client_late_cancel: str = "charge",
        max_reschedules: int = 0,
        free_late_cancellations: int = 0,
        forgiveness_period: timedelta | None = None,
        settle_unmarked_after: timedelta = timedelta(0),
        unmarked_outcome: str = "completed",
        request_id: str | None = None,
    ) -> ppb.Programme:
        """`late_reschedule`: charge, free or refused (see LateReschedule); `client_late_cancel`:
        charge or contact-professional (see ClientLateCancel); `max_reschedules` 0: no limit;
        `forgiveness_period` None: the server's default (365 days); `settle_unmarked_after` 0:
        never; `unmarked_outcome`: completed or no-show (see UnmarkedOutcome)."""
        programme = ppb.Programme()
        _write_programme(
            programme,
            {
                "display_name": display_name,
                "notice_window": notice_window,
                "professional_may_charge_late": professional_may_charge_late,
                "no_show_takes_credit": no_show_takes_credit,
                "late_reschedule": late_reschedule,
                "cancellation_grace": cancellation_grace,
                "client_late_cancel": client_late_cancel,
                "max_reschedules": max_reschedules,
                "free_late_cancellations": free_late_cancellations,
                "forgiveness_period": forgiveness_period,
                "settle_unmarked_after": settle_unmarked_after,
                "unmarked_outcome": unmarked_outcome,
            },
        )
        request = ppb.CreateProgrammeRequest(
            programme=programme, programme_id=programme_id, request_id=request_id or new_request_id()
        )
        return self._call(self.programmes.CreateProgramme, request, ppb.Programme)

    def get_programme(self, programme_id: str) -> ppb.Programme:
        request = ppb.GetProgrammeRequest(programme_id=programme_id)
        return self._call(self.programmes.GetProgramme, request, ppb.Programme)

    def get_programme_usage(self, programme_id: str, start: datetime, end: datetime) -> ppb.ProgrammeUsage:
        """What happened under the programme in [start, end) (a sponsor's: whole months)."""
        request = ppb.GetProgrammeUsageRequest(
            programme_id=programme_id, start_time=timestamp(start), end_time=timestamp(end)
        )
        return self._call(self.programmes.GetProgrammeUsage, request, ppb.ProgrammeUsage)

    def simulate_terms(
        self, programme_id: str, start: datetime, end: datetime, **terms: object
    ) -> ppb.SimulateTermsResponse:
        """What the programme's terms changed as `terms` say (named and typed as for
        update_programme) would have decided of [start, end). Changes nothing. Its deadline is
        SIMULATION_TIMEOUT unless the client's is longer: a year of a large programme's decisions
        takes longer to replay than a call usually takes (BENCHMARKS.md)."""
        proposed = ppb.ProgrammeTerms()
        paths = _write_programme(proposed, terms)
        if not paths:
            raise ValueError("give at least one term to try")
        request = ppb.SimulateTermsRequest(
            programme_id=programme_id,
            start_time=timestamp(start),
            end_time=timestamp(end),
            terms=proposed,
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        )
        timeout = max(self.timeout, SIMULATION_TIMEOUT)
        return self._call(self.programmes.SimulateTerms, request, ppb.SimulateTermsResponse, timeout)

    def list_programmes(self, page_size: int = 0, page_token: str = "") -> ppb.ListProgrammesResponse:
        request = ppb.ListProgrammesRequest(page_size=page_size, page_token=page_token)
        return self._call(self.programmes.ListProgrammes, request, ppb.ListProgrammesResponse)

    def update_programme(
        self,
        programme_id: str,
        *,
        display_name: str | None = None,
        notice_window: timedelta | None = None,
        professional_may_charge_late: bool | None = None,
        no_show_takes_credit: bool | None = None,
        late_reschedule: str | None = None,
        cancellation_grace: timedelta | None = None,
        client_late_cancel: str | None = None,
        max_reschedules: int | None = None,
        free_late_cancellations: int | None = None,
        forgiveness_period: timedelta | None = None,
        settle_unmarked_after: timedelta | None = None,
        unmarked_outcome: str | None = None,
        request_id: str | None = None,
        etag: str = "",
    ) -> ppb.Programme:
        """Changes the fields given (not None); sessions already booked keep their terms. With
        `etag` (a Programme's), only if no other change came since that version."""
        programme = ppb.Programme(programme_id=programme_id, etag=etag)
        paths = _write_programme(
            programme,
            {
                "display_name": display_name,
                "notice_window": notice_window,
                "professional_may_charge_late": professional_may_charge_late,
                "no_show_takes_credit": no_show_takes_credit,
                "late_reschedule": late_reschedule,
                "cancellation_grace": cancellation_grace,
                "client_late_cancel": client_late_cancel,
                "max_reschedules": max_reschedules,
                "free_late_cancellations": free_late_cancellations,
                "forgiveness_period": forgiveness_period,
                "settle_unmarked_after": settle_unmarked_after,
                "unmarked_outcome": unmarked_outcome,
            },
        )
        request = ppb.UpdateProgrammeRequest(
            programme=programme,
            update_mask=field_mask_pb2.FieldMask(paths=paths),
            request_id=request_id or new_request_id(),
        )
        return self._call(self.programmes.UpdateProgramme, request, ppb.Programme)

    # --- invoices ---

    def create_invoice(
        self,
        professional_id: str,
        session_ids: Sequence[str] = (),
        *,
        up_to: datetime | None = None,
        request_id: str | None = None,
    ) -> ipb.Invoice:
        """A DRAFT invoice of the given paid sessions, or (up_to) of every uninvoiced paid session
        of the professional starting at or before that time."""
        request = ipb.CreateInvoiceRequest(
            professional_id=professional_id,
            session_ids=list(session_ids),
            request_id=request_id or new_request_id(),
        )
        if up_to is not None:
            request.up_to.CopyFrom(timestamp(up_to))
        return self._call(self.invoices.CreateInvoice, request, ipb.Invoice)

    def get_invoice(self, invoice_id: str) -> ipb.Invoice:
        return self._call(self.invoices.GetInvoice, ipb.GetInvoiceRequest(invoice_id=invoice_id), ipb.Invoice)

    def list_invoices(
        self, professional_id: str, state: str | None = None, page_size: int = 0, page_token: str = ""
    ) -> ipb.ListInvoicesResponse:
        return self._call(
            self.invoices.ListInvoices,
            ipb.ListInvoicesRequest(
                professional_id=professional_id,
                state=INVOICE_STATES[state] if state else ipb.INVOICE_STATE_UNSPECIFIED,
                page_size=page_size,
                page_token=page_token,
            ),
            ipb.ListInvoicesResponse,
        )

    def add_to_invoice(
        self, invoice_id: str, session_ids: Sequence[str], request_id: str | None = None
    ) -> ipb.Invoice:
        request = ipb.AddToInvoiceRequest(
            invoice_id=invoice_id, session_ids=list(session_ids), request_id=request_id or new_request_id()
        )
        return self._call(self.invoices.AddToInvoice, request, ipb.Invoice)

    def remove_from_invoice(
        self, invoice_id: str, session_ids: Sequence[str], request_id: str | None = None
    ) -> ipb.Invoice:
        request = ipb.RemoveFromInvoiceRequest(
            invoice_id=invoice_id, session_ids=list(session_ids), request_id=request_id or new_request_id()
        )
        return self._call(self.invoices.RemoveFromInvoice, request, ipb.Invoice)

    def submit_invoice(self, invoice_id: str, request_id: str | None = None) -> ipb.Invoice:
        request = ipb.SubmitInvoiceRequest(invoice_id=invoice_id, request_id=request_id or new_request_id())
        return self._call(self.invoices.SubmitInvoice, request, ipb.Invoice)

    # --- events ---

    def list_events(self, after: str = "", types: Sequence[str] = (), page_size: int = 0) -> list[epb.Event]:
        """One page of events after the cursor `after` ("" = the oldest kept), oldest first."""
        request = epb.ListEventsRequest(after=after, page_size=page_size, types=types)
        return list(self._call(self.feed.ListEvents, request, epb.ListEventsResponse).events)

    def events(
        self,
        after: str = "",
        types: Sequence[str] = (),
        *,
        follow: bool = False,
        on_outage: Callable[[KaraError | None], None] = lambda error: None,
    ) -> Iterator[epb.Event]:
        """Every event after the cursor `after`, oldest first, each exactly once.

        Without `follow`, the events there are now, then the iterator ends. With `follow`, then
        each new event as it commits, for as long as you iterate: a stream that drops (the
        server restarts, the network blips) is reopened with backoff from the cursor of the last
        event received. Store `event.cursor` once you have handled an event and pass it as
        `after` when your process starts again. A cursor older than the server keeps raises
        KaraError OUT_OF_RANGE (resynchronise from the current state). While following,
        `on_outage` is told of the error that began an outage, and None once the server
        answers again, once each."""
        if not follow:
            yield from self._pages(after, types)
            return
        cursor = after
        failures = 0
        down = False
        while True:
            if not down and self._silent_for(FOLLOW_ANSWER_SECONDS):
                # Neither refused nor answered (a host that drops packets, a server still
                # starting): said now, not when the connection attempt gives up.
                down = True
                silent = f"no answer within {FOLLOW_ANSWER_SECONDS:.0f} s"
                on_outage(KaraError(grpc.StatusCode.UNAVAILABLE, silent))
            stream = self.feed.StreamEvents(
                epb.StreamEventsRequest(after=cursor, types=types), metadata=with_trace(self.metadata)
            )
            try:
                for event in stream:
                    failures = 0
                    if down:
                        down = False
                        on_outage(None)
                    yield event
                    cursor = event.cursor
            except grpc.RpcError as exc:
                error = KaraError.from_rpc_error(exc)
                if error.code not in STREAM_RETRYABLE:
                    raise error from None
                if not down:
                    down = True
                    on_outage(error)
            finally:
                stream.cancel()
            pause = self.retry.delay(min(failures, 16))
            failures += 1
            if down and error.code is grpc.StatusCode.UNAVAILABLE:
                # Back as soon as the server is: its stream may then stay quiet for long.
                try:
                    grpc.channel_ready_future(self.channel).result(timeout=pause)
                except grpc.FutureTimeoutError:
                    continue
                down = False
                on_outage(None)
            else:
                time.sleep(pause)

    def _silent_for(self, seconds: float) -> bool:
        """Whether a connection attempt to the server neither succeeds nor fails within
        `seconds` (a refused one fails at once, and the stream then says so itself)."""
        settled = threading.Event()
        outcomes = (
            grpc.ChannelConnectivity.READY,
            grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            grpc.ChannelConnectivity.SHUTDOWN,
        )

        def watch(state: grpc.ChannelConnectivity) -> None:
            if state in outcomes:
                settled.set()

        self.channel.subscribe(watch, try_to_connect=True)
        try:
            return not settled.wait(seconds)
        finally:
            self.channel.unsubscribe(watch)

    def _pages(self, after: str, types: Sequence[str]) -> Iterator[epb.Event]:
        cursor = after
        while True:
            page = self.list_events(cursor, types, page_size=1000)
            yield from page
            if not page:
                return
            cursor = page[-1].cursor


__all__ = ["NO_RETRY", "TLS", "KaraError", "RetryPolicy", "SessionsClient"]
