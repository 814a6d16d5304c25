"""Requests a caller can send on purpose, each of which was once answered INTERNAL (issue 23):
they are refused as the caller's mistake, with the field named, and change nothing."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status

from kara_sessions_client.client import KaraError, SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer

from ..support.booking import book
from ..support.clock import FakeClock
from ..support.database import db_snapshot
from ..support.foreign import api_methods, raw_bytes_call
from ..support.refusals import INVALID, PRECONDITION, refuse

HOSTILE_TEXT = [
    "a NUL \x00 in the middle",
    "\x1b[2J\x1b[1;31mURGENT: call now\x1b]0;owned\x07",
    "carriage\rreturn",
    "C1 CSI \x9b31m",
    "DEL \x7f",
]


def violation_fields(exc: KaraError) -> list[str]:
    return [name for name, _ in exc.field_violations]


@pytest.mark.parametrize("text", HOSTILE_TEXT, ids=["nul", "escape", "cr", "c1", "del"])
def test_control_characters_in_free_text_are_refused_on_both_databases(
    server: RunningServer, kara: SessionsClient, clock: FakeClock, text: str
) -> None:
    """PostgreSQL answered a NUL with INTERNAL DATABASE_ERROR while SQLite stored it; an escape
    sequence reached the professional's terminal."""
    booked = book(kara, clock, timedelta(days=3))
    paid = book(kara, clock, timedelta(hours=2), client_id="client-2")
    kara.cancel(paid, "client")
    calls: dict[str, Callable[[], Any]] = {
        "reason": lambda: kara.cancel(booked, "client", reason=text),
        "reason ": lambda: kara.waive_charge(paid, text),
        "programme.display_name": lambda: kara.create_programme("odd", text, timedelta(hours=24)),
        "programme.display_name ": lambda: kara.update_programme("default", display_name=text),
    }
    for field, call in calls.items():
        refused = refuse(server, call, INVALID, None)
        assert violation_fields(refused) == [field.strip()], refused
        assert "control characters" in refused.message


def test_tab_and_newline_are_free_text(kara: SessionsClient, clock: FakeClock) -> None:
    booked = book(kara, clock, timedelta(days=3))
    reason = "The client wrote:\n\tplease move it\n"
    assert kara.cancel(booked, "client", reason=reason).session.cancellation.reason == reason


def _token(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def _forged(real: str) -> list[str]:
    """Tokens a caller can make from a real one: its query digest with other keys."""
    data = json.loads(base64.urlsafe_b64decode(real + "=" * (-len(real) % 4)))
    digest = data["q"]
    keys: list[object] = [
        [],
        # A well-formed position where the list's key is one integer (the ledger's): it only
        # moves where that caller's own list resumes, so it stands.
        *([] if [type(k) for k in data["k"]] == [int] else [[1]]),
        [None, "x"],
        ["x", "y"],
        ["id", 5],
        [10**30, "x"],
        [True, "x"],
        [1, "a\x00b"],
        [1, "x" * 10_000],
        {"a": 1},
        [1.5, "x"],
    ]
    return [_token({"q": digest, "k": key}) for key in keys] + [_token([1]), _token(None), "!!!", "e30"]


LISTS: dict[str, Callable[[SessionsClient, str], Any]] = {
    "ListSessions": lambda c, t: c.list_sessions("pro-1", "", None, 1, t),
    "ListPayments": lambda c, t: c.list_payments("pro-1", "unpaid", 1, t),
    "GetCreditAccount": lambda c, t: c.get_credit_account("client-1", 1, t),
    "ListProgrammes": lambda c, t: c.list_programmes(1, t),
    "ListInvoices": lambda c, t: c.list_invoices("pro-1", None, 1, t),
}


@pytest.mark.parametrize("rpc", sorted(LISTS))
def test_a_page_token_not_made_by_the_list_is_refused(
    server: RunningServer, kara: SessionsClient, clock: FakeClock, rpc: str
) -> None:
    """The tokens are unsigned base64 JSON: keys of another shape reached the SQL as IndexError,
    TypeError, ValueError or OverflowError, each an INTERNAL."""
    kara.grant_credits("client-1", 4)
    for hours in (30, 31, 32):
        kara.book("client-1", "pro-1", clock.now() + timedelta(hours=hours))
    kara.create_programme("second", "Second", timedelta(hours=24))
    list_call = LISTS[rpc]
    if rpc == "ListInvoices":
        for _ in range(2):
            paid = book(kara, clock, timedelta(hours=2), client_id="client-1", grant=1)
            kara.cancel(paid, "client")
            kara.create_invoice("pro-1", [paid])
    real = list_call(kara, "").next_page_token
    assert real, "the list needs a second page for this test"
    list_call(kara, real)  # the real token works
    for forged in _forged(real):
        refused = refuse(server, lambda f=forged: list_call(kara, f), INVALID, None)  # type: ignore[misc]
        assert violation_fields(refused) == ["page_token"], forged
        assert "not a page token of this list" in refused.message


@pytest.mark.parametrize(
    "cursor",
    ["0.9999999999999999999", "9223372036854775808.0", " 1.1", "+1.1", "1_000.1", "01.1", "1.1\n", "1..1"],
)
def test_only_a_canonical_event_cursor_is_accepted(
    server: RunningServer, kara: SessionsClient, cursor: str
) -> None:
    """On SQLite the first two reached the driver as an int too large for it (INTERNAL)."""
    after = base64.urlsafe_b64encode(cursor.encode()).decode().rstrip("=")
    refused = refuse(server, lambda: kara.list_events(after=after), INVALID, None)
    assert violation_fields(refused) == ["after"]
    with pytest.raises(KaraError) as streamed:
        next(iter(kara.events(after=after, follow=True)))  # StreamEvents
    assert streamed.value.code == INVALID


def _every_method() -> list[MethodDescriptor]:
    return [*api_methods(), health_pb2.DESCRIPTOR.services_by_name["Health"].methods_by_name["Check"]]


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.mark.parametrize("method", _every_method(), ids=lambda m: m.name)
def test_undecodable_bytes_are_invalid_argument_with_an_access_line(
    channel: grpc.Channel, method: MethodDescriptor, caplog: pytest.LogCaptureFixture
) -> None:
    """grpcio answered INTERNAL "Exception deserializing request!" and logged an ERROR with a
    traceback, and no access line: anyone could fill the log with ERRORs."""
    caplog.set_level(logging.INFO)
    call = raw_bytes_call(channel, method)
    with pytest.raises(grpc.RpcError) as failed:
        result = call(b"\xff\xff\xff\xff", timeout=10)
        if method.server_streaming:
            next(iter(result))  # type: ignore[call-overload]
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failed.value
    assert "protobuf message" in (failed.value.details() or "")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    if method.containing_service.full_name.startswith("kara."):
        details = rpc_status.from_call(failed.value)
        assert details is not None
        bad = error_details_pb2.BadRequest()
        assert any(d.Unpack(bad) for d in details.details)
        access = [r for r in caplog.records if r.name == "kara_sessions_server.rpc"]
        assert [r.getMessage() for r in access] == [f"{method.name} INVALID_ARGUMENT"]


def test_concurrent_updates_without_an_etag_all_apply(kara: SessionsClient) -> None:
    """48 concurrent UpdateProgramme calls without a version gave 12 OK and 36 FAILED_PRECONDITION
    on PostgreSQL: a caller who asserted no version (AIP-154) had their change refused."""
    names = [f"Name {n}" for n in range(48)]
    with futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda name: kara.update_programme("default", display_name=name), names))
    versions = sorted(int(p.etag.removeprefix("v")) for p in results)
    assert versions == list(range(versions[0], versions[0] + 48)), "each update applied to the one before"
    assert kara.get_programme("default").display_name in names


def test_an_update_with_a_stale_etag_is_refused_and_changes_nothing(
    server: RunningServer, kara: SessionsClient
) -> None:
    seen = kara.get_programme("default")
    assert seen.etag
    changed = kara.update_programme("default", display_name="First", etag=seen.etag)
    assert changed.etag != seen.etag
    refused = refuse(
        server,
        lambda: kara.update_programme("default", display_name="Second", etag=seen.etag),
        PRECONDITION,
        "ETAG_MISMATCH",
    )
    assert refused.metadata["etag"] == changed.etag
    assert kara.get_programme("default").display_name == "First"


@pytest.mark.parametrize(
    ("ahead", "booked"),
    [
        (timedelta(days=730), True),
        (timedelta(days=730, seconds=1), False),
        (timedelta(days=2_900_000), False),
    ],
    ids=["730d", "730d+1s", "year-9999"],
)
def test_bookings_stop_at_the_horizon(
    server: RunningServer, kara: SessionsClient, clock: FakeClock, ahead: timedelta, booked: bool
) -> None:
    kara.grant_credits("client-1", 1)
    starts_at = clock.now() + ahead
    if booked:
        assert kara.book("client-1", "pro-1", starts_at).session_id
        return
    refused = refuse(
        server, lambda: kara.book("client-1", "pro-1", starts_at), INVALID, "STARTS_AT_BEYOND_HORIZON"
    )
    assert "730 days" in refused.message


def test_reflection_v1_is_served_beside_v1alpha(channel: grpc.Channel) -> None:
    """grpcurl and Postman ask grpc.reflection.v1 first; only v1alpha was served."""
    for version in ("v1", "v1alpha"):
        info = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        replies = list(info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"kara.sessions.v1.SessionService", "grpc.reflection.v1.ServerReflection"} <= names, version


@pytest.mark.parametrize("seconds", [10**15, -(2**63), 315_576_000_001])
def test_a_duration_beyond_protobufs_range_is_invalid_argument(
    server: RunningServer, channel: grpc.Channel, seconds: int
) -> None:
    """Found by the generated requests: Duration.ToTimedelta() overflowed (INTERNAL)."""
    from kara.sessions.v1 import programmes_pb2, programmes_pb2_grpc

    stub = programmes_pb2_grpc.ProgrammeServiceStub(channel)
    request = programmes_pb2.CreateProgrammeRequest(
        programme_id="huge",
        programme=programmes_pb2.Programme(display_name="Huge", notice_window={"seconds": seconds}),
        request_id="r-huge",
    )
    before = db_snapshot(server)
    with pytest.raises(grpc.RpcError) as refused:
        stub.CreateProgramme(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "programme.notice_window" in (refused.value.details() or "")
    assert db_snapshot(server) == before


@pytest.mark.parametrize("programme_id", ["a\x00b", "with space", "x" * 129])
def test_the_programme_to_update_is_a_well_formed_id(
    server: RunningServer, kara: SessionsClient, programme_id: str
) -> None:
    """Found by the generated requests: UpdateProgramme checked only that programme.programme_id
    was set, so a NUL reached PostgreSQL (INTERNAL)."""
    refused = refuse(server, lambda: kara.update_programme(programme_id, display_name="X"), INVALID, None)
    assert violation_fields(refused) == ["programme.programme_id"]
