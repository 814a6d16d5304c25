"""Protobuf <-> domain conversion, and validation of request fields that needs no database."""

from __future__ import annotations

import dataclasses
import enum
import re
import typing
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from kara.sessions.v1 import credits_pb2 as cpb
from kara.sessions.v1 import events_pb2 as epb
from kara.sessions.v1 import invoices_pb2 as ipb
from kara.sessions.v1 import programmes_pb2 as ppb
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_server.domain.decisions import Decision, DecisionRule, decision_of
from kara_sessions_server.domain.errors import FieldViolation, InvalidRequest
from kara_sessions_server.domain.feed import FeedEvent, SessionChanged
from kara_sessions_server.domain.model import (
    Cancellation,
    CancellationOutcome,
    CreditAccount,
    CreditLot,
    Invoice,
    InvoiceLine,
    InvoiceState,
    LedgerEntry,
    LedgerKind,
    Move,
    PaidReason,
    Party,
    Payment,
    PaymentSection,
    PaymentState,
    RescheduleOutcome,
    Session,
    SessionState,
    Waiver,
)
from kara_sessions_server.domain.programme import DEFAULT_PROGRAMME_ID, Programme, Terms
from kara_sessions_server.domain.usage import Count, Report
from kara_sessions_server.service_layer.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE

E = TypeVar("E")
D = TypeVar("D", bound=enum.Enum)
V = TypeVar("V", bound=int)

MAX_ID_LENGTH = 128
MAX_REASON_LENGTH = 1000
MAX_GRANT = 10_000
# Printable ASCII without spaces: ids from other systems pass, stray whitespace does not.
_ID = re.compile(rf"[!-~]{{1,{MAX_ID_LENGTH}}}")
# google.protobuf.Duration's own range: about 10,000 years either way.
_MAX_DURATION_SECONDS = 315_576_000_000
# C0 controls but tab and newline, DEL, and C1 controls (U+009B is CSI on some terminals).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def numbers_by_name(domain: type[D], values: Any) -> dict[D, int]:
    """Each value of a domain enum to the protobuf value of the same name in `values` (an
    EnumDescriptor): the proto's are its type's prefix (AIP-126, as its zero value spells it)
    then the domain's name. Built at import: a value missing on either side stops the server
    from starting, never a call."""
    prefix = values.values[0].name.removesuffix("UNSPECIFIED")
    return {member: values.values_by_name[prefix + member.name].number for member in domain}


def _by_name(domain: type[D], values: type[V]) -> dict[D, V]:
    """numbers_by_name for a generated enum type, typed by it."""
    wrapper: Any = values  # protobuf's EnumTypeWrapper
    numbers: Any = numbers_by_name(domain, wrapper.DESCRIPTOR)
    return numbers  # type: ignore[no-any-return]


def _back(to_pb: dict[D, V]) -> dict[int, D]:
    return {number: member for member, number in to_pb.items()}


SESSION_STATE_TO_PB = _by_name(SessionState, pb.SessionState)
DECISION_RULE_TO_PB = _by_name(DecisionRule, pb.DecisionRule)
SESSION_STATE_FROM_PB = _back(SESSION_STATE_TO_PB)
PARTY_TO_PB = _by_name(Party, pb.Party)
PARTY_FROM_PB = _back(PARTY_TO_PB)
PAYMENT_STATE_TO_PB = _by_name(PaymentState, pb.PaymentState)
SECTION_TO_PB = _by_name(PaymentSection, pb.PaymentSection)
SECTION_FROM_PB = _back(SECTION_TO_PB)
PAID_REASON_TO_PB = _by_name(PaidReason, pb.PaidReason)
INVOICE_STATE_TO_PB = _by_name(InvoiceState, ipb.InvoiceState)
INVOICE_STATE_FROM_PB = _back(INVOICE_STATE_TO_PB)
LEDGER_KIND_TO_PB = _by_name(LedgerKind, cpb.LedgerEntryKind)


class RequestReader:
    """Collects every field violation of a request, so a caller can fix them all at once."""

    def __init__(self, request: Message):
        self.request = request
        self.violations: list[FieldViolation] = []

    def fail(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field, description))

    def _read(self, field: str, message: Message | None, name: str) -> tuple[str, str]:
        """`message.field` (the request's by default), and the name violations give it."""
        value: str = getattr(self.request if message is None else message, field)
        return value, name or field

    def id(self, field: str, *, required: bool = True, message: Message | None = None, name: str = "") -> str:
        """An id (`message.field`, the request's by default; `name` for violations)."""
        value, name = self._read(field, message, name)
        if not value:
            if required:
                self.fail(name, "is required")
        elif not _ID.fullmatch(value):
            self.fail(name, f"must be 1-{MAX_ID_LENGTH} printable ASCII characters without spaces")
        return value

    def programme_id(self, field: str = "programme_id") -> str:
        """An optional programme id; empty means the default programme."""
        return self.id(field, required=False) or DEFAULT_PROGRAMME_ID

    def duration(
        self, message: Message, field: str, name: str, default: timedelta | None = None
    ) -> timedelta | None:
        """`message.field` (a google.protobuf.Duration) as a timedelta; `name` for violations.
        Required unless there is a `default` for it unset."""
        if not message.HasField(field):
            if default is None:
                self.fail(name, "is required")
            return default
        value: Duration = getattr(message, field)
        valid = (
            -_MAX_DURATION_SECONDS <= value.seconds <= _MAX_DURATION_SECONDS
            and -999_999_999 <= value.nanos <= 999_999_999
            and not (value.seconds > 0 > value.nanos or value.seconds < 0 < value.nanos)
        )
        if not valid:
            self.fail(name, "is not a valid duration (at most 10,000 years, nanos of the same sign)")
            return None
        return value.ToTimedelta()

    def ids(self, field: str, max_count: int) -> tuple[str, ...]:
        """A repeated id field: 1..max_count distinct, well-formed ids."""
        values: tuple[str, ...] = tuple(getattr(self.request, field))
        if not values:
            self.fail(field, "give at least one id")
        elif len(values) > max_count:
            self.fail(field, f"must hold at most {max_count} ids (got {len(values)})")
        for index, value in enumerate(values):
            if not _ID.fullmatch(value):
                self.fail(f"{field}[{index}]", f"must be 1-{MAX_ID_LENGTH} printable ASCII characters")
        repeated = sorted(v for v, n in Counter(values).items() if n > 1)
        if repeated:
            self.fail(field, f"lists {', '.join(repeated[:3])} more than once")
        return values

    def request_id(self) -> str:
        return self.id("request_id")

    def page_size(self, default: int = DEFAULT_PAGE_SIZE) -> int:
        """The request's page_size (0: `default`), at most MAX_PAGE_SIZE (AIP-158)."""
        requested: int = self.request.page_size  # type: ignore[attr-defined]
        if requested < 0:
            self.fail("page_size", "must not be negative")
        elif requested > MAX_PAGE_SIZE:
            self.fail("page_size", f"must be at most {MAX_PAGE_SIZE}")
        return requested or default

    def text(self, field: str, max_length: int, *, message: Message | None = None, name: str = "") -> str:
        """Free text a person will read (`message.field`, the request's by default; `name` for
        violations): at most `max_length` characters, and no control characters but tab and
        newline. Those would move a reader's cursor, clear their screen or retitle their window
        when shown in a terminal, and PostgreSQL refuses a NUL in text outright."""
        value, name = self._read(field, message, name)
        if len(value) > max_length:
            self.fail(name, f"must be at most {max_length} characters (got {len(value)})")
        control = _CONTROL.search(value)
        if control is not None:
            self.fail(
                name,
                f"must not contain control characters (found U+{ord(control.group()):04X} at "
                f"position {control.start()}); tab and newline are allowed",
            )
        return value

    def timestamp(self, field: str, *, required: bool) -> datetime | None:
        if not self.request.HasField(field):
            if required:
                self.fail(field, "is required")
            return None
        ts: Timestamp = getattr(self.request, field)
        try:
            return ts.ToDatetime(tzinfo=UTC)
        except (ValueError, OverflowError):
            self.fail(field, "is not a valid timestamp (years 0001-9999, nanos 0-999999999)")
            return None

    def enum(
        self,
        field: str,
        mapping: dict[int, E],
        *,
        required: bool,
        message: Message | None = None,
        name: str = "",
    ) -> E | None:
        holder = self.request if message is None else message
        value: int = getattr(holder, field)
        field = name or field
        if value in mapping:
            return mapping[value]
        if value == 0 and not required:
            return None
        # The values this field takes, by the names a caller writes (the zero value stands for
        # a default where it is accepted, and is not offered).
        kind = holder.DESCRIPTOR.fields_by_name[field.rsplit(".", 1)[-1]].enum_type
        assert kind is not None
        allowed = ", ".join(kind.values_by_number[number].name for number in sorted(mapping) if number)
        self.fail(field, f"must be one of {allowed}" + (" (it is required)" if value == 0 else ""))
        return None

    def done(self) -> None:
        if self.violations:
            raise InvalidRequest(self.violations)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def timestamp(value: datetime) -> Timestamp:
    """The Timestamp that `Timestamp.FromDatetime` makes of an aware datetime (the domain has no
    other), by arithmetic: 0.8 us against FromDatetime's 2.2 (its trip through calendar.timegm),
    and a CancelSession response carries up to eight."""
    made = Timestamp()
    _set_time(made, value)
    return made


def _set_micros(field: Timestamp | Duration, total: int) -> None:
    """A Timestamp or Duration of `total` microseconds, written into a message's own field: no
    message made and copied. Zero is set all the same, as a copied one would be."""
    seconds, micros = divmod(total, 1_000_000)
    if seconds or micros:
        field.seconds = seconds
        field.nanos = micros * 1000
    else:
        field.SetInParent()


def _set_time(field: Timestamp, value: datetime) -> None:
    _set_micros(field, (value - _EPOCH) // _MICROSECOND)


def _set_duration(field: Duration, value: timedelta) -> None:
    """The domain's durations are never negative."""
    _set_micros(field, value // _MICROSECOND)


def fill_cancellation(msg: pb.Cancellation, c: Cancellation) -> None:
    msg.SetInParent()
    msg.cancelled_by = PARTY_TO_PB[c.cancelled_by]
    _set_time(msg.cancelled_at, c.cancelled_at)
    _set_time(msg.notified_at, c.notified_at)
    msg.notice_seconds = int(c.notice.total_seconds())
    msg.late = c.late
    msg.charge_client = c.charge_client
    msg.reason = c.reason
    msg.within_grace = c.within_grace
    msg.forgiven = c.forgiven


def cancellation_pb(c: Cancellation) -> pb.Cancellation:
    msg = pb.Cancellation()
    fill_cancellation(msg, c)
    return msg


def move_pb(m: Move) -> pb.Move:
    return pb.Move(
        moved_at=timestamp(m.moved_at),
        from_starts_at=timestamp(m.from_starts_at),
        to_starts_at=timestamp(m.to_starts_at),
        moved_by=PARTY_TO_PB[m.moved_by],
        notified_at=timestamp(m.notified_at),
        notice_seconds=int(m.notice.total_seconds()),
        late=m.late,
        within_grace=m.within_grace,
        reason=m.reason,
    )


def fill_session(msg: pb.Session, s: Session) -> None:
    """Writes `s` into `msg` (a response's own field, say): the same bytes as building each
    part and copying it in, for fewer objects made (BENCHMARKS.md)."""
    msg.SetInParent()
    msg.session_id = s.session_id
    msg.client_id = s.client_id
    msg.professional_id = s.professional_id
    _set_time(msg.starts_at, s.starts_at)
    msg.state = SESSION_STATE_TO_PB[s.state]
    _set_time(msg.booked_at, s.booked_at)
    _set_time(msg.updated_at, s.updated_at)
    msg.credits = s.credits
    if s.cancellation is not None:
        fill_cancellation(msg.cancellation, s.cancellation)
    if s.completed_at is not None:
        _set_time(msg.completed_at, s.completed_at)
    msg.programme_id = s.programme_id
    fill_terms(msg.terms, s.terms)
    if s.no_show_at is not None:
        _set_time(msg.no_show_at, s.no_show_at)
    if s.waiver is not None:
        fill_waiver(msg.waiver, s.waiver)
    if s.moves:
        msg.moves.extend(move_pb(m) for m in s.moves)
    msg.rescheduled_from = s.rescheduled_from
    msg.rescheduled_to = s.rescheduled_to
    msg.no_show_forgiven = s.no_show_forgiven
    msg.settled_automatically = s.settled_automatically
    if s.credit_expires_at is not None:
        _set_time(msg.credit_expire_time, s.credit_expires_at)
    decision = decision_of(s)
    if decision is not None:
        fill_decision(msg.decision, decision)


def fill_decision(msg: pb.Decision, d: Decision) -> None:
    msg.SetInParent()
    msg.rule = DECISION_RULE_TO_PB[d.rule]
    if d.notice is not None:
        _set_duration(msg.notice, d.notice)
    _set_duration(msg.notice_window, d.notice_window)
    msg.grace_applied = d.grace_applied
    msg.forgiveness_used = d.forgiveness_used
    msg.forgiveness_allowed = d.forgiveness_allowed
    msg.programme_id = d.programme_id
    msg.terms_version = d.terms_version
    msg.explanation = d.explanation


def decision_pb(d: Decision) -> pb.Decision:
    msg = pb.Decision()
    fill_decision(msg, d)
    return msg


def session_pb(s: Session) -> pb.Session:
    msg = pb.Session()
    fill_session(msg, s)
    return msg


def duration(value: timedelta) -> Duration:
    d = Duration()
    d.FromTimedelta(value)
    return d


def _term_fields() -> tuple[tuple[str, Any, object, dict[Any, int] | None], ...]:
    """Each field of Terms: its name, type, default (MISSING: required) and, for an enum, the
    protobuf number of each value, drawn from the dataclass and the messages' descriptor once.
    ProgrammeTerms and Programme name the terms' fields alike; the servicers read them by it."""
    hints = typing.get_type_hints(Terms)
    found = []
    for f in dataclasses.fields(Terms):
        kind, numbers = hints[f.name], None
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            values = ppb.ProgrammeTerms.DESCRIPTOR.fields_by_name[f.name].enum_type
            assert values is not None
            numbers = numbers_by_name(kind, values)
        found.append((f.name, kind, f.default, numbers))
    return tuple(found)


TERM_FIELDS = _term_fields()


# ProgrammeTerms messages by the terms they hold: a service has a handful of versions of terms,
# and every session and payment carries one, so a page of payments copies the same few (a copy
# in C, against a field by field fill in Python: issue 35). Bounded: past it, terms are filled.
_TERMS_MESSAGES: dict[Terms, ppb.ProgrammeTerms] = {}
_TERMS_MESSAGES_KEPT = 1024


def fill_terms(msg: ppb.ProgrammeTerms | ppb.Programme, t: Terms) -> None:
    """Writes `t` into `msg`: a session's or payment's terms, or a programme's own fields."""
    if isinstance(msg, ppb.ProgrammeTerms):
        built = _TERMS_MESSAGES.get(t)
        if built is None:
            built = ppb.ProgrammeTerms()
            _fill_terms(built, t)
            if len(_TERMS_MESSAGES) < _TERMS_MESSAGES_KEPT:
                _TERMS_MESSAGES[t] = built
        msg.CopyFrom(built)
        return
    _fill_terms(msg, t)


def _fill_terms(msg: ppb.ProgrammeTerms | ppb.Programme, t: Terms) -> None:
    msg.SetInParent()
    for name, kind, _, numbers in TERM_FIELDS:
        value = getattr(t, name)
        if kind is timedelta:
            _set_duration(getattr(msg, name), value)
        else:
            setattr(msg, name, value if numbers is None else numbers[value])


def terms_pb(t: Terms) -> ppb.ProgrammeTerms:
    msg = ppb.ProgrammeTerms()
    fill_terms(msg, t)
    return msg


def fill_waiver(msg: pb.Waiver, w: Waiver) -> None:
    msg.SetInParent()
    _set_time(msg.waived_at, w.waived_at)
    msg.waived_by = w.waived_by
    msg.reason = w.reason


def waiver_pb(w: Waiver) -> pb.Waiver:
    msg = pb.Waiver()
    fill_waiver(msg, w)
    return msg


def programme_pb(p: Programme) -> ppb.Programme:
    msg = ppb.Programme(
        programme_id=p.programme_id,
        display_name=p.display_name,
        create_time=timestamp(p.created_at),
        update_time=timestamp(p.updated_at),
        etag=p.etag,
    )
    fill_terms(msg, p.terms)
    return msg


def fill_payment(msg: pb.Payment, p: Payment) -> None:
    """Writes `p` into `msg`, as fill_session does a session."""
    msg.SetInParent()
    msg.session_id = p.session_id
    msg.client_id = p.client_id
    msg.professional_id = p.professional_id
    _set_time(msg.session_starts_at, p.session_starts_at)
    msg.state = PAYMENT_STATE_TO_PB[p.state]
    msg.section = SECTION_TO_PB[p.section]
    msg.credits = p.credits
    _set_time(msg.updated_at, p.updated_at)
    msg.invoice_id = p.invoice_id
    if p.paid_reason is not None:
        msg.paid_reason = PAID_REASON_TO_PB[p.paid_reason]
    if p.cancellation is not None:
        fill_cancellation(msg.cancellation, p.cancellation)
    msg.programme_id = p.programme_id
    fill_terms(msg.terms, p.terms)
    if p.waiver is not None:
        fill_waiver(msg.waiver, p.waiver)
    msg.no_show_forgiven = p.no_show_forgiven


def payment_pb(p: Payment) -> pb.Payment:
    msg = pb.Payment()
    fill_payment(msg, p)
    return msg


def preview_pb(o: CancellationOutcome) -> pb.PreviewCancellationResponse:
    return pb.PreviewCancellationResponse(
        decision=_decision_or_none(decision_of(o.after)),
        session_state=SESSION_STATE_TO_PB[o.session_state],
        payment_state=PAYMENT_STATE_TO_PB[o.payment_state],
        payment_section=SECTION_TO_PB[o.payment_state.section],
        late=o.cancellation.late,
        notice_seconds=int(o.cancellation.notice.total_seconds()),
        credits_returned=o.credits_returned,
        credits_taken=o.credits_taken,
        within_grace=o.cancellation.within_grace,
        forgiven=o.cancellation.forgiven,
        forgiveness_used=o.forgiveness.used,
        forgiveness_allowed=o.forgiveness.allowed,
    )


def _decision_or_none(d: Decision | None) -> pb.Decision | None:
    return None if d is None else decision_pb(d)


def reschedule_preview_pb(o: RescheduleOutcome) -> pb.PreviewRescheduleResponse:
    return pb.PreviewRescheduleResponse(
        decision=_decision_or_none(o.decision),
        outcome=pb.RESCHEDULE_OUTCOME_CHARGED if o.charged else pb.RESCHEDULE_OUTCOME_MOVED,
        late=o.move.late,
        notice_seconds=int(o.move.notice.total_seconds()),
        within_grace=o.move.within_grace,
        credits_taken=o.credits_taken,
        credits_held=o.credits_held,
    )


def usage_pb(report: Report, programme_id: str, start: datetime, end: datetime) -> ppb.ProgrammeUsage:
    msg = ppb.ProgrammeUsage(programme_id=programme_id, min_count=report.min_count)
    _set_time(msg.start_time, start)
    _set_time(msg.end_time, end)
    for name, count in report.counts.items():
        getattr(msg, name).CopyFrom(count_pb(count))
    return msg


def count_pb(count: Count) -> ppb.Count:
    return ppb.Count(value=count.value, suppressed=count.suppressed)


def account_pb(a: CreditAccount) -> cpb.CreditAccount:
    return cpb.CreditAccount(
        client_id=a.client_id,
        available=a.available,
        held=a.held,
        used=a.used,
        entries=[ledger_entry_pb(e) for e in a.entries],
        next_page_token=a.next_page_token,
        programme_id=a.programme_id,
        expired=a.expired,
        lots=[credit_lot_pb(lot) for lot in a.lots],
    )


def credit_lot_pb(lot: CreditLot) -> cpb.CreditLot:
    msg = cpb.CreditLot(
        granted=lot.granted, available=lot.available, held=lot.held, used=lot.used, expired=lot.expired
    )
    if lot.expires_at is not None:
        _set_time(msg.expire_time, lot.expires_at)
    return msg


def ledger_entry_pb(e: LedgerEntry) -> cpb.LedgerEntry:
    return cpb.LedgerEntry(
        entry_id=e.entry_id,
        kind=LEDGER_KIND_TO_PB[e.kind],
        credits=e.credits,
        session_id=e.session_id or "",
        request_id=e.request_id,
        created_at=timestamp(e.created_at),
        expire_time=None if e.expires_at is None else timestamp(e.expires_at),
    )


def invoice_line_pb(line: InvoiceLine) -> ipb.InvoiceLine:
    return ipb.InvoiceLine(
        session_id=line.session_id,
        client_id=line.client_id,
        session_starts_at=timestamp(line.session_starts_at),
        paid_reason=PAID_REASON_TO_PB[line.paid_reason],
        credits=line.credits,
        added_at=timestamp(line.added_at),
    )


def invoice_pb(i: Invoice) -> ipb.Invoice:
    msg = ipb.Invoice(
        invoice_id=i.invoice_id,
        professional_id=i.professional_id,
        state=INVOICE_STATE_TO_PB[i.state],
        lines=[invoice_line_pb(line) for line in i.lines],
        line_count=i.line_count,
        total_credits=i.total_credits,
        created_at=timestamp(i.created_at),
        updated_at=timestamp(i.updated_at),
    )
    if i.submitted_at is not None:
        msg.submitted_at.CopyFrom(timestamp(i.submitted_at))
    return msg


def event_pb(e: FeedEvent) -> epb.Event:
    msg = epb.Event(
        event_id=e.event_id, cursor=e.cursor, type=e.type.value, subject=e.subject, time=timestamp(e.time)
    )
    if isinstance(e.data, SessionChanged):
        fill_session(msg.session_changed.session, e.data.session)
        fill_payment(msg.session_changed.payment, e.data.payment)
        if e.data.charged is not None and e.data.charged_payment is not None:
            fill_session(msg.session_changed.charged, e.data.charged)
            fill_payment(msg.session_changed.charged_payment, e.data.charged_payment)
    elif isinstance(e.data, CreditAccount):
        msg.credit_account.CopyFrom(account_pb(e.data))
    elif isinstance(e.data, Programme):
        msg.programme.CopyFrom(programme_pb(e.data))
    else:
        msg.invoice.CopyFrom(invoice_pb(e.data))
    return msg
