"""Domain errors. Each carries a stable machine-readable reason; the gRPC layer maps the
error class to a status code in one place (entrypoints/grpc/status.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kara_sessions_server.domain.decisions import Decision


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """Base class: a request the service refuses. Nothing has been changed when it is raised."""

    reason: str = "REFUSED"
    # A refusal of the policy's that a preview predicts: the decision behind it (decisions.py).
    decision: Decision | None = None

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})

    def decided(self, decision: Decision) -> DomainError:
        """This refusal, carrying the decision behind it."""
        self.decision = decision
        return self


class InvalidRequest(DomainError):
    """The request itself is malformed or contradicts the policy's input rules."""

    reason = "INVALID_REQUEST"

    def __init__(
        self,
        violations: list[FieldViolation],
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ):
        message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = violations

    @classmethod
    def single(cls, field: str, description: str, *, reason: str | None = None) -> InvalidRequest:
        return cls([FieldViolation(field, description)], reason=reason)


class NotFound(DomainError):
    reason = "NOT_FOUND"


@dataclass(frozen=True, slots=True)
class PreconditionViolation:
    """One thing in the current state that stops the request (google.rpc.PreconditionFailure):
    `type` is a reason such as SESSION_NOT_PAID, `subject` what it is about (sessions/ID)."""

    type: str
    subject: str
    description: str


class PreconditionFailed(DomainError):
    """The request is well formed but the current state (or the policy) forbids it."""

    violations: tuple[PreconditionViolation, ...] = ()


class Conflict(PreconditionFailed):
    """A concurrent request changed the row first; the caller lost the race."""

    reason = "CONCURRENT_MODIFICATION"


class InsufficientCredits(PreconditionFailed):
    reason = "INSUFFICIENT_CREDITS"


class NothingToExpire(PreconditionFailed):
    """A lot the expiry sweep found due had nothing left available when it came to it (another
    replica expired it first): the server's own, never a caller's."""

    reason = "NOTHING_TO_EXPIRE"


class CreditsExpireBeforeSession(PreconditionFailed):
    """The client has credits, but none valid at the session's start (issue 36)."""

    reason = "CREDITS_EXPIRE_BEFORE_SESSION"


class ChargeNotAllowedWithNotice(PreconditionFailed):
    reason = "CHARGE_NOT_ALLOWED_WITH_NOTICE"


class SessionNotBooked(PreconditionFailed):
    reason = "SESSION_NOT_BOOKED"


class SessionAlreadyStarted(PreconditionFailed):
    reason = "SESSION_ALREADY_STARTED"


class SessionNotStarted(PreconditionFailed):
    reason = "SESSION_NOT_STARTED"


class InvoiceNotDraft(PreconditionFailed):
    reason = "INVOICE_NOT_DRAFT"


class InvoiceEmpty(PreconditionFailed):
    reason = "INVOICE_EMPTY"


class NothingToInvoice(PreconditionFailed):
    reason = "NOTHING_TO_INVOICE"


class TooManySessions(PreconditionFailed):
    reason = "TOO_MANY_SESSIONS"


# A status and its details travel in trailing metadata, which gRPC clients cap at 8 KiB by
# default: the message describes the first few refused sessions, the details the first dozen.
_DESCRIBED = 3
_DETAILED = 12


class SessionsRefused(PreconditionFailed):
    """Sessions an invoice cannot take (or give back). The reason and metadata name the first;
    `violations` lists the first dozen and `refused_count` says how many there are."""

    def __init__(self, violations: list[PreconditionViolation], **metadata: str):
        first = violations[0]
        message = "; ".join(v.description for v in violations[:_DESCRIBED])
        if len(violations) > _DESCRIBED:
            message += f"; and {len(violations) - _DESCRIBED} more sessions"
        super().__init__(
            message,
            reason=first.type,
            metadata={
                "session_id": first.subject.removeprefix("sessions/"),
                "refused_count": str(len(violations)),
                **metadata,
            },
        )
        self.violations = tuple(violations[:_DETAILED])


class RequestIdReused(InvalidRequest):
    reason = "REQUEST_ID_REUSED"


class Unauthenticated(DomainError):
    """No credentials, or credentials the server does not know."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    """The caller is known but may not do this (or may not know whether the target exists)."""

    reason = "PERMISSION_DENIED"


class CursorExpired(DomainError):
    """An event cursor older than the events the server still keeps: the consumer must
    resynchronise from the current state instead of silently missing events."""

    reason = "CURSOR_EXPIRED"


class ChargeNotAllowedByProgramme(PreconditionFailed):
    """The session's programme does not let a professional charge a late cancellation."""

    reason = "CHARGE_NOT_ALLOWED_BY_PROGRAMME"


class RescheduleLimitReached(PreconditionFailed):
    """The session has been moved as often as a session may be (policy.MAX_MOVES_PER_SESSION)."""

    reason = "RESCHEDULE_LIMIT_REACHED"


class RecordTooLarge(PreconditionFailed):
    """The change would make a record (its event, its response) larger than a message may be."""

    reason = "RECORD_TOO_LARGE"


class LateRescheduleNotAllowed(PreconditionFailed):
    """The session's programme refuses a client's late move (its late_reschedule is REFUSED)."""

    reason = "LATE_RESCHEDULE_NOT_ALLOWED"


class LateCancelContactProfessional(PreconditionFailed):
    """The session's programme refuses a client's own late cancellation (client_late_cancel is
    CONTACT_PROFESSIONAL): the professional cancels it, and decides with the charge box."""

    reason = "LATE_CANCEL_CONTACT_PROFESSIONAL"


class NotWaivable(PreconditionFailed):
    """Only a taken credit of a late cancellation or a no-show can be waived, once."""

    reason = "NOT_WAIVABLE"


class OnInvoice(PreconditionFailed):
    """The session is on an invoice: take it off the draft first (a submitted one is final)."""

    reason = "ON_INVOICE"


class AlreadyExists(DomainError):
    reason = "ALREADY_EXISTS"
