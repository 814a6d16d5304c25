"""The one place where exceptions become gRPC statuses. No traceback ever reaches a caller."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from kara_sessions_server.domain.errors import (
    AlreadyExists,
    CursorExpired,
    DomainError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    Unauthenticated,
)
from kara_sessions_server.entrypoints.grpc import convert

ERROR_DOMAIN = "sessions.kara"

# A status travels in the trailers, which gRPC clients cap (grpc-core: 8 KiB soft, 16 KiB hard,
# by default): a refusal that quoted a 20 KB field in full never reached its caller. What any
# status says is cut to these, so message, ErrorInfo and BadRequest together stay under 6.5 KiB.
MESSAGE_WIRE_BYTES = 1024  # as sent: grpc-message percent-encodes all but printable ASCII
NAME_BYTES = 160  # a violation's field or subject, a metadata value
DESCRIPTION_BYTES = 256  # a violation's description
VIOLATIONS_BYTES = 1536  # all of them: the first are kept (the message says how many there were)
MAX_METADATA = 6


def bounded(text: str, limit: int, wire: bool = False) -> str:
    """`text` with anything unprintable escaped, cut to `limit` UTF-8 bytes (counted as
    percent-encoded when `wire`) and marked where it was cut."""
    if text.isascii() and text.isprintable() and len(text) <= limit and not (wire and "%" in text):
        return text
    shown: list[str] = []  # one escaped part per character of text
    size, cut, room = 0, 0, limit - 40  # 40: the marker
    for c in text:
        part = c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
        size += sum(_cost(p, wire) for p in part)
        if size <= room:
            cut = len(shown) + 1
        if size > limit:
            return "".join(shown[:cut]) + f"... ({len(text) - cut} more characters)"
        shown.append(part)
    return "".join(shown)


def _cost(c: str, wire: bool) -> int:
    if wire and not (" " <= c <= "~" and c != "%"):
        return 3 * len(c.encode())
    return len(c.encode())


def status(code: int, message: str, *details: Any) -> grpc.Status:
    message = bounded(message, MESSAGE_WIRE_BYTES, wire=True)
    packed = []
    for detail in details:
        any_msg = any_pb2.Any()
        any_msg.Pack(detail)
        packed.append(any_msg)
    result: grpc.Status = rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))
    return result


def error_info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    kept = {key: bounded(value, NAME_BYTES) for key, value in list(metadata.items())[:MAX_METADATA]}
    return error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=kept)


def domain_status(error: DomainError) -> grpc.Status:
    info = error_info(error.reason, **error.metadata)
    if isinstance(error, InvalidRequest):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                for field, description in _first((v.field, v.description) for v in error.violations)
            ]
        )
        return status(code_pb2.INVALID_ARGUMENT, error.message, info, bad_request)
    if isinstance(error, AlreadyExists):
        return status(code_pb2.ALREADY_EXISTS, error.message, info)
    if isinstance(error, CursorExpired):
        return status(code_pb2.OUT_OF_RANGE, error.message, info)
    if isinstance(error, NotFound):
        return status(code_pb2.NOT_FOUND, error.message, info)
    if isinstance(error, Unauthenticated):
        return status(code_pb2.UNAUTHENTICATED, error.message, info)
    if isinstance(error, PermissionDenied):
        return status(code_pb2.PERMISSION_DENIED, error.message, info)
    # PreconditionFailed, and any other refusal: the request is fine but the state forbids it.
    if isinstance(error, PreconditionFailed) and error.violations:
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=v.type, subject=subject, description=description
                )
                for v, (subject, description) in zip(
                    error.violations,
                    _first((v.subject, v.description) for v in error.violations),
                    strict=False,
                )
            ]
        )
        return status(code_pb2.FAILED_PRECONDITION, error.message, info, failure)
    # A refusal of the policy's carries the decision behind it, as a preview's answer does.
    decided = () if error.decision is None else (convert.decision_pb(error.decision),)
    return status(code_pb2.FAILED_PRECONDITION, error.message, info, *decided)


def _first(violations: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each violation's name and description, bounded; the first that fit VIOLATIONS_BYTES
    (at least one)."""
    kept: list[tuple[str, str]] = []
    size = 0
    for name, description in violations:
        pair = (bounded(name, NAME_BYTES), bounded(description, DESCRIPTION_BYTES))
        size += len(pair[0].encode()) + len(pair[1].encode())
        if kept and size > VIOLATIONS_BYTES:
            break
        kept.append(pair)
    return kept


def new_incident() -> str:
    return uuid.uuid4().hex[:12]


def incident_status(code: int, reason: str, what: str, incident: str, advice: str) -> grpc.Status:
    """What a caller learns of a failure: a short message, what to do, and an id to find the
    traceback by."""
    return status(code, f"{what} (incident {incident}); {advice}", error_info(reason, incident=incident))


def full_status(reason: str, what: str, incident: str, retry: str) -> grpc.Status:
    """The database's disk is full: nothing was applied; the same call succeeds once an
    operator frees space, with no restart."""
    message = f"{what} (incident {incident}); the request was not applied: {retry} once space is freed"
    return status(code_pb2.RESOURCE_EXHAUSTED, message, error_info(reason, incident=incident))


def permanent_status(reason: str, what: str, incident: str) -> grpc.Status:
    """A database fault no retry will cure: the caller learns the reason; an operator fixes it."""
    message = (
        f"{what} (incident {incident}); the request was not applied, and retrying will not help "
        "until an operator fixes the database"
    )
    return status(code_pb2.INTERNAL, message, error_info(reason, incident=incident))
