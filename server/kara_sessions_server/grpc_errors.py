"""The one place where exceptions become gRPC statuses. No traceback ever reaches a caller."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import peewee as pw
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from .errors import DomainError, InvalidRequest, NotFound

log = logging.getLogger(__name__)

ERROR_DOMAIN = "sessions.kara"

F = TypeVar("F", bound=Callable[..., Any])


def _status(code: int, message: str, *details: Any) -> grpc.Status:
    packed = []
    for detail in details:
        any_msg = any_pb2.Any()
        any_msg.Pack(detail)
        packed.append(any_msg)
    status: grpc.Status = rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))
    return status


def domain_status(error: DomainError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    if isinstance(error, InvalidRequest):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        return _status(code_pb2.INVALID_ARGUMENT, error.message, info, bad_request)
    if isinstance(error, NotFound):
        return _status(code_pb2.NOT_FOUND, error.message, info)
    # PreconditionFailed, and any other refusal: the request is fine but the state forbids it.
    return _status(code_pb2.FAILED_PRECONDITION, error.message, info)


def _abort_incident(context: grpc.ServicerContext, method: str, code: int, reason: str, what: str) -> None:
    """Logs the traceback under an incident id and gives the caller only the id."""
    incident = uuid.uuid4().hex[:12]
    log.exception("%s in %s (incident %s)", what, method, incident)
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata={"incident": incident})
    message = f"{what} (incident {incident}); retry with the same request_id, it is never applied twice"
    context.abort_with_status(_status(code, message, info))


def handle_errors(method: F) -> F:
    """Wraps a servicer method: domain errors become their status; anything else is logged
    with its traceback here and reaches the caller only as a short message with an incident id."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except DomainError as exc:
            context.abort_with_status(domain_status(exc))
        except pw.OperationalError:
            _abort_incident(
                context,
                method.__name__,
                code_pb2.UNAVAILABLE,
                "DATABASE_UNAVAILABLE",
                "the database is unavailable or busy",
            )
        except Exception:
            _abort_incident(context, method.__name__, code_pb2.INTERNAL, "INTERNAL", "internal error")

    return wrapper  # type: ignore[return-value]
