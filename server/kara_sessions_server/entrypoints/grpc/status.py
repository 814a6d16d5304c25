"""The one place where exceptions become gRPC statuses. No traceback ever reaches a caller."""

from __future__ import annotations

import uuid
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

ERROR_DOMAIN = "sessions.kara"


def status(code: int, message: str, *details: Any) -> grpc.Status:
    packed = []
    for detail in details:
        any_msg = any_pb2.Any()
        any_msg.Pack(detail)
        packed.append(any_msg)
    result: grpc.Status = rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))
    return result


def error_info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)


def domain_status(error: DomainError) -> grpc.Status:
    info = error_info(error.reason, **error.metadata)
    if isinstance(error, InvalidRequest):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
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
                    type=v.type, subject=v.subject, description=v.description
                )
                for v in error.violations
            ]
        )
        return status(code_pb2.FAILED_PRECONDITION, error.message, info, failure)
    return status(code_pb2.FAILED_PRECONDITION, error.message, info)


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
