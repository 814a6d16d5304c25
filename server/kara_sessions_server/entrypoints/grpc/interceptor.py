"""Everything every RPC goes through, in one place: deadline, authentication, mapping errors to
statuses, metrics and the log line. The servicers only parse, call a service and convert."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.rpc import code_pb2

from kara_sessions_server.adapters import faults
from kara_sessions_server.domain.errors import DomainError, InvalidRequest, Unauthenticated
from kara_sessions_server.domain.principal import UNAUTHENTICATED_SERVICE, Principal
from kara_sessions_server.entrypoints import logs
from kara_sessions_server.entrypoints.grpc.disk_full import DiskFull
from kara_sessions_server.entrypoints.grpc.metrics import Metrics
from kara_sessions_server.entrypoints.grpc.status import (
    domain_status,
    full_status,
    incident_status,
    new_incident,
    permanent_status,
    status,
)
from kara_sessions_server.entrypoints.grpc.tokens import TokenTable
from kara_sessions_server.service_layer import authz
from kara_sessions_server.service_layer.call_context import CURRENT, Call, CallGone, DeadlineExceeded

log = logging.getLogger("kara_sessions_server.rpc")

# Trailing metadata on a mutation's answer when it replays a request_id's first result.
REPLAYED_TRAILER = "kara-replayed"

_CALLER: ContextVar[Principal] = ContextVar("caller")

Behaviour = Callable[[Any, grpc.ServicerContext], Any]

if TYPE_CHECKING:  # grpc-stubs makes it generic; grpcio's class is not subscriptable at runtime
    _ServerInterceptor = grpc.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.ServerInterceptor


def caller() -> Principal:
    """The authenticated principal of the RPC this thread is serving."""
    return _CALLER.get()


class Authenticator:
    """`authorization: Bearer <token>` metadata → Principal. With no token table (development
    on loopback only; see server.Settings.check_exposure) every caller is a trusted service."""

    def __init__(self, tokens: TokenTable | None):
        self.tokens = tokens

    def authenticate(self, context: grpc.ServicerContext) -> Principal:
        if self.tokens is None:
            return UNAUTHENTICATED_SERVICE
        metadata = context.invocation_metadata()  # only now: building it costs every call
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if not isinstance(header, str):
            raise Unauthenticated("no credentials: send the metadata `authorization: Bearer <token>`")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the authorization metadata must be `Bearer <token>`")
        principal = self.tokens.principal_for(token.strip())
        if principal is None:
            raise Unauthenticated("the bearer token is not valid (unknown or revoked)")
        return principal


class CallInterceptor(_ServerInterceptor):
    """Wraps the unary handlers of `protected` services with auth and error mapping, and every
    unary handler (health included) with metrics. Wrapped handlers are built once per method."""

    def __init__(
        self,
        authenticator: Authenticator,
        metrics: Metrics,
        protected: frozenset[str],
        stopping: threading.Event | None = None,
    ):
        self.authenticator = authenticator
        self.metrics = metrics
        self.protected = protected
        # Set when the server starts shutting down (calls it cancels then got UNAVAILABLE).
        self.stopping = stopping or threading.Event()
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self.disk = DiskFull(metrics)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is None:
            handler = continuation(handler_call_details)
            if handler is None:
                return None  # unknown method (not cached: callers choose its name)
            if handler.unary_unary is not None:
                wrapped = grpc.unary_unary_rpc_method_handler(
                    self._wrap(method, handler.unary_unary),
                    request_deserializer=_tolerant(handler.request_deserializer),
                    response_serializer=handler.response_serializer,
                )
            elif handler.unary_stream is not None and self._is_protected(method):
                wrapped = grpc.unary_stream_rpc_method_handler(
                    self._wrap_stream(method, handler.unary_stream),
                    request_deserializer=_tolerant(handler.request_deserializer),
                    response_serializer=handler.response_serializer,
                )
            else:
                return handler  # health's Watch, reflection: not ours to authenticate
            self._handlers[method] = wrapped
        return wrapped

    def _is_protected(self, method: str) -> bool:
        return method.lstrip("/").rpartition("/")[0] in self.protected

    def _wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        name = method.rpartition("/")[2]
        if not self._is_protected(method):
            return self._observed(name, behaviour)

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            state = _CallState()
            try:
                return self._run(name, behaviour, request, context, state)
            except Exception as exc:
                self._abort(exc, name, context, state, request)
            finally:
                self._record(name, context, started, state, request)

        return call

    def _wrap_stream(self, method: str, behaviour: Behaviour) -> Behaviour:
        """A server-streaming call: as `_wrap`, for the whole stream. A failure after some
        messages ends the stream with its status; a caller that hung up is logged CANCELLED."""
        name = method.rpartition("/")[2]

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = time.perf_counter()
            state = _CallState()
            try:
                # The servicer reads the caller before it returns its iterator, so the caller
                # variable need not outlive this frame (a generator may be closed elsewhere).
                yield from self._run(name, behaviour, request, context, state)
            except Exception as exc:
                self._abort(exc, name, context, state, request)
            finally:
                self._record(name, context, started, state, request)

        return stream

    def _run(
        self, name: str, behaviour: Behaviour, request: Any, context: grpc.ServicerContext, state: _CallState
    ) -> Any:
        if isinstance(request, Undecodable):
            raise request.refusal()
        # A call waits for a worker in the executor's queue (workers.py): one whose deadline
        # passed meanwhile is not run.
        deadline = call_deadline(context)
        if deadline is not None and deadline <= time.monotonic():
            abort(context, status(code_pb2.DEADLINE_EXCEEDED, "the deadline passed before the call started"))
        state.principal = self.authenticator.authenticate(context)
        authz.check_method(state.principal, name)
        token = _CALLER.set(state.principal)
        serving = Call(deadline, context.is_active)
        call = CURRENT.set(serving)
        try:
            response = behaviour(request, context)
            if serving.replayed:
                # As Stripe's Idempotent-Replayed header: the first result of this request_id.
                context.set_trailing_metadata(((REPLAYED_TRAILER, "true"),))
            return response
        finally:
            CURRENT.reset(call)
            _CALLER.reset(token)

    def _abort(
        self, exc: Exception, name: str, context: grpc.ServicerContext, state: _CallState, request: Any
    ) -> NoReturn:
        if isinstance(exc, DomainError):
            self.metrics.refusal(name, exc.reason)
            abort(context, domain_status(exc))
        if _code_name(context) != "OK":
            raise exc  # context.abort() was called: the status is already set
        state.incident = new_incident()
        abort(context, self._failure(exc, name, state.incident, _is_mutation(name, request)))
        raise exc  # not reached: abort_with_status raises

    def _failure(self, exc: Exception, name: str, incident: str, mutation: bool) -> grpc.Status:
        # A mutation's retry must keep its request_id (then it is never applied twice); a read's
        # retry is just a retry.
        retry = "retry with the same request_id: it is never applied twice" if mutation else "retry"
        if isinstance(exc, DeadlineExceeded):
            log.info("%s: %s", name, exc, extra={"incident": incident})
            advice = f"{retry}, with a longer deadline if this repeats"
            return incident_status(
                code_pb2.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", str(exc), incident, advice
            )
        if isinstance(exc, CallGone):
            log.info("%s: %s", name, exc, extra={"incident": incident})
            return incident_status(code_pb2.CANCELLED, "CANCELLED", str(exc), incident, retry)
        fault = faults.classify(exc)
        if fault is None:
            log.error("%s failed (incident %s)", name, incident, exc_info=exc, extra={"incident": incident})
            advice = "a fault in the server, not in the request: report the incident id" + (
                "; if you retry, keep the request_id: it is never applied twice" if mutation else ""
            )
            return incident_status(code_pb2.INTERNAL, "INTERNAL", "internal error", incident, advice)
        self.metrics.database_error(fault.kind, fault.transient)
        if fault.reason == faults.FULL:
            self.disk.full(name, fault.what, incident)
            return full_status(fault.reason, fault.what, incident, retry)
        if fault.transient:
            log.warning(
                "%s: %s (incident %s)", name, fault.what, incident, exc_info=exc, extra={"incident": incident}
            )
            code = code_pb2.ABORTED if fault.reason == faults.CONFLICT else code_pb2.UNAVAILABLE
            return incident_status(code, fault.reason, fault.what, incident, retry)
        log.error(
            "%s: %s (incident %s): an operator must fix the database",
            name,
            fault.what,
            incident,
            exc_info=exc,
            extra={"incident": incident},
        )
        return permanent_status(fault.reason, fault.what, incident)

    def _record(
        self, name: str, context: grpc.ServicerContext, started: float, state: _CallState, request: Any
    ) -> None:
        seconds = time.perf_counter() - started
        code = _code_name(context)
        if code == "OK" and not context.is_active():
            code = self._what_the_caller_got(context)
        self.metrics.observe_rpc(name, code, seconds)
        if code == "OK" and self.disk.since is not None and _is_mutation(name, request):
            self.disk.cleared(name)
        logs.access(
            log,
            f"{name} {code}",
            {
                "method": name,
                "code": code,
                "duration_ms": round(seconds * 1000, 3),
                "principal": str(state.principal) if state.principal else "",
                "session_id": getattr(request, "session_id", ""),
                "invoice_id": getattr(request, "invoice_id", ""),
                "request_id": getattr(request, "request_id", ""),
                "peer": context.peer(),
                "incident": state.incident,
            },
        )

    def _what_the_caller_got(self, context: grpc.ServicerContext) -> str:
        """The status of a call that ended before its handler did: its deadline passed, the
        server cancelled it while shutting down, or the caller hung up."""
        deadline = call_deadline(context)
        if deadline is not None and deadline <= time.monotonic():
            return "DEADLINE_EXCEEDED"
        return "UNAVAILABLE" if self.stopping.is_set() else "CANCELLED"

    def _observed(self, name: str, behaviour: Behaviour) -> Behaviour:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                if isinstance(request, Undecodable):
                    abort(context, domain_status(request.refusal()))
                return behaviour(request, context)
            finally:
                self.metrics.observe_rpc(name, _code_name(context), time.perf_counter() - started)

        return call


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request whose bytes are not its method's message. grpcio would answer INTERNAL and log
    an ERROR with a traceback for each one, so any caller could fill the log; the handler gets
    this instead and refuses it as the caller's mistake."""

    error: str

    def refusal(self) -> InvalidRequest:
        return InvalidRequest.single(
            "request",
            f"the request's bytes are not this method's protobuf message ({self.error}): "
            "serialise the request message the method's .proto names",
            reason="MALFORMED_REQUEST",
        )


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def read(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, and whatever a generated parser may raise
            return Undecodable(type(exc).__name__)

    return read


@dataclass
class _CallState:
    principal: Principal | None = None
    incident: str = ""


def _is_mutation(name: str, request: Any) -> bool:
    """Every mutation takes a request_id; a preview takes one too, and changes nothing."""
    return hasattr(request, "request_id") and not name.startswith("Preview")


def call_deadline(context: grpc.ServicerContext) -> float | None:
    """The call's deadline on time.monotonic()'s clock, or None when the caller set none. The
    one reading of grpcio's `time_remaining()`: a call without a deadline (grpcurl's, Go's,
    Java's and Node's default) reports about 9.2e18 seconds, not None, and a wait that long
    overflows every timed wait in the standard library."""
    remaining = context.time_remaining()
    if remaining is None or remaining >= _NO_DEADLINE:
        return None
    return time.monotonic() + remaining


# Anything at least this far off is no deadline: threading's longest wait, 292 years. A later
# deadline than that would also overflow the waits, and means the same to a caller.
_NO_DEADLINE = threading.TIMEOUT_MAX


def abort(context: grpc.ServicerContext, failed: grpc.Status) -> NoReturn:
    """Ends the call with `failed`, its rich details included. The code and details are also
    set one by one first, for a wrapping context that only watches those (OpenTelemetry's,
    whose span would otherwise say OK)."""
    context.set_code(failed.code)
    context.set_details(failed.details)
    context.abort_with_status(failed)
    raise AssertionError("abort_with_status returned")  # it raises; this tells mypy so


def _code_name(context: grpc.ServicerContext) -> str:
    # ServicerContext.code() exists since grpcio 1.38; grpc-stubs predates it.
    code = context.code()  # type: ignore[attr-defined]
    return code.name if isinstance(code, grpc.StatusCode) else "OK"
