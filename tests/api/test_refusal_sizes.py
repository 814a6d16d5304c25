"""A refusal that quotes the request still reaches the caller (issue 33): gRPC clients accept
16 KiB of trailers by default (and may refuse more than 8 KiB), so a message, ErrorInfo and
BadRequest that echoed a 20 KB field in full came back as RESOURCE_EXHAUSTED "received
metadata size exceeds hard limit", with no reason at all. Plain stubs, as a foreign caller's."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from kara.sessions.v1 import events_pb2, events_pb2_grpc, programmes_pb2, programmes_pb2_grpc

from kara_sessions_server.entrypoints.grpc.server import RunningServer

# What the whole refusal may take on the wire (message, details, their encodings): far under
# the 8 KiB soft limit above which grpc-core clients start refusing metadata.
TRAILER_BUDGET = 6.5 * 1024
HUGE = "x" * 20_000


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as open_channel:
        yield open_channel


def _refusal(call: Callable[[], object]) -> tuple[grpc.RpcError, error_details_pb2.ErrorInfo]:
    with pytest.raises(grpc.RpcError) as refused:
        result = call()
        if not isinstance(result, events_pb2.ListEventsResponse | programmes_pb2.Programme):
            list(result)  # type: ignore[call-overload]
    error = refused.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    trailers = error.trailing_metadata()
    size = sum(len(key) + len(value) for key, value in trailers)
    assert size <= TRAILER_BUDGET, f"{size} bytes of trailers"
    assert len(error.details().encode()) <= 1024
    status = rpc_status.from_call(error)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert all(len(value) <= 160 for value in info.metadata.values())
    return error, info


@pytest.mark.parametrize(
    "types",
    [[HUGE], [f"unknown.type.{i}" for i in range(1000)], ["\x1b[2J" + "é" * 10_000]],
    ids=["one-20kb-type", "1000-unknown-types", "escapes-and-multibyte"],
)
def test_an_oversized_types_filter_is_refused_with_its_reason(
    channel: grpc.Channel, types: list[str]
) -> None:
    stub = events_pb2_grpc.EventServiceStub(channel)
    for call in (
        lambda: stub.ListEvents(events_pb2.ListEventsRequest(types=types)),
        lambda: stub.StreamEvents(events_pb2.StreamEventsRequest(types=types)),
    ):
        error, info = _refusal(call)
        assert info.reason, error.details()
        assert "\x1b" not in error.details(), "the quoted prefix is escaped"


def test_an_oversized_update_mask_path_is_refused_with_its_reason(channel: grpc.Channel) -> None:
    stub = programmes_pb2_grpc.ProgrammeServiceStub(channel)
    request = programmes_pb2.UpdateProgrammeRequest(
        programme=programmes_pb2.Programme(programme_id="default"),
        update_mask=field_mask_pb2.FieldMask(paths=[HUGE, *[f"p{i}" for i in range(500)]]),
    )
    error, info = _refusal(lambda: stub.UpdateProgramme(request))
    assert info.reason, error.details()


def test_no_refusal_can_outgrow_the_budget_whatever_it_quotes() -> None:
    """The worst a refusal can carry: many violations and metadata values, each quoting 20 KB of
    multibyte text and control characters; what goes on the wire stays within the budget."""
    from kara_sessions_server.domain.errors import FieldViolation, InvalidRequest, PreconditionFailed
    from kara_sessions_server.domain.errors import PreconditionViolation as Violation
    from kara_sessions_server.entrypoints.grpc.status import domain_status

    quoted = "\x1b%é€😀" * 4000
    many = {f"key{i}": quoted for i in range(50)}
    refusals = [
        InvalidRequest([FieldViolation(quoted, quoted) for _ in range(1000)], metadata=many),
        PreconditionFailed(quoted, metadata=many),
    ]
    refusals[1].violations = tuple(Violation("T", quoted, quoted) for _ in range(1000))
    for refusal in refusals:
        status = domain_status(refusal)
        wire_message = sum(1 if " " <= c <= "~" and c != "%" else 3 * len(c.encode()) for c in status.details)
        details = dict(status.trailing_metadata)["grpc-status-details-bin"]
        assert wire_message <= 1024
        assert wire_message + len(details) * 4 / 3 <= TRAILER_BUDGET, (wire_message, len(details))
        assert "\x1b" not in status.details
