"""Every refusal: its status code, its ErrorInfo reason, and proof that nothing changed."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from kara.sessions.v1 import credits_pb2 as cpb
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer

from ..support.booking import book
from ..support.clock import FakeClock
from ..support.refusals import INVALID, NOT_FOUND, PRECONDITION, refuse


@pytest.fixture
def booked(kara: SessionsClient, clock: FakeClock) -> str:
    return book(kara, clock, starts_in=timedelta(days=3), grant=2)


def test_client_cannot_tick_the_charge_box(
    kara: SessionsClient, server: RunningServer, booked: str, clock: FakeClock
) -> None:
    clock.advance(timedelta(days=3) - timedelta(hours=2))
    err = refuse(
        server, lambda: kara.cancel(booked, "client", charge_client=True), INVALID, "CLIENT_CANNOT_CHARGE"
    )
    assert [f for f, _ in err.field_violations] == ["charge_client"]


def test_only_a_professional_sets_notified_at(
    kara: SessionsClient, server: RunningServer, booked: str, clock: FakeClock
) -> None:
    refuse(
        server,
        lambda: kara.cancel(booked, "client", notified_at=clock.now()),
        INVALID,
        "NOTIFIED_AT_NOT_ALLOWED",
    )


def test_charging_with_enough_notice_is_refused(
    kara: SessionsClient, server: RunningServer, booked: str
) -> None:
    err = refuse(
        server,
        lambda: kara.cancel(booked, "professional", charge_client=True),
        PRECONDITION,
        "CHARGE_NOT_ALLOWED_WITH_NOTICE",
    )
    assert err.metadata["session_id"] == booked
    assert int(err.metadata["notice_seconds"]) == 3 * 24 * 3600


@pytest.mark.parametrize("first", ["client", "professional"])
def test_a_cancelled_session_cannot_be_cancelled_or_completed_again(
    kara: SessionsClient, server: RunningServer, booked: str, clock: FakeClock, first: str
) -> None:
    kara.cancel(booked, first)
    refuse(server, lambda: kara.cancel(booked, "client"), PRECONDITION, "SESSION_NOT_BOOKED")
    refuse(
        server,
        lambda: kara.cancel(booked, "professional", charge_client=False),
        PRECONDITION,
        "SESSION_NOT_BOOKED",
    )
    clock.advance(timedelta(days=4))
    refuse(server, lambda: kara.complete(booked), PRECONDITION, "SESSION_NOT_BOOKED")


def test_a_completed_session_cannot_be_cancelled(
    kara: SessionsClient, server: RunningServer, booked: str, clock: FakeClock
) -> None:
    clock.advance(timedelta(days=3, minutes=50))
    kara.complete(booked)
    refuse(
        server,
        lambda: kara.cancel(booked, "professional", notified_at=clock.now() - timedelta(days=3, minutes=1)),
        PRECONDITION,
        "SESSION_NOT_BOOKED",
    )


def test_booking_without_credit(kara: SessionsClient, server: RunningServer, clock: FakeClock) -> None:
    refuse(
        server,
        lambda: kara.book("nobody", "pro-1", clock.now() + timedelta(days=1)),
        PRECONDITION,
        "INSUFFICIENT_CREDITS",
    )
    kara.grant_credits("one-credit", 1)
    kara.book("one-credit", "pro-1", clock.now() + timedelta(days=1))
    refuse(
        server,
        lambda: kara.book("one-credit", "pro-1", clock.now() + timedelta(days=2)),
        PRECONDITION,
        "INSUFFICIENT_CREDITS",
    )


@pytest.mark.parametrize("offset", [timedelta(0), -timedelta(seconds=1)], ids=["now", "past"])
def test_booking_must_start_in_the_future(
    kara: SessionsClient, server: RunningServer, clock: FakeClock, offset: timedelta
) -> None:
    kara.grant_credits("c", 1)
    refuse(server, lambda: kara.book("c", "p", clock.now() + offset), INVALID, "STARTS_AT_NOT_IN_FUTURE")


def test_unknown_session(kara: SessionsClient, server: RunningServer) -> None:
    for call in (
        lambda: kara.cancel("no-such-session", "client"),
        lambda: kara.preview("no-such-session", "client"),
        lambda: kara.complete("no-such-session"),
        lambda: kara.get_session("no-such-session"),
        lambda: kara.get_payment("no-such-session"),
    ):
        refuse(server, call, NOT_FOUND, None)
    refuse(server, lambda: kara.get_credit_account("nobody"), NOT_FOUND, None)


def test_malformed_requests_list_every_violation(kara: SessionsClient, server: RunningServer) -> None:
    stub = kara.sessions
    cases: list[tuple[Any, Any, set[str]]] = [
        (
            stub.BookSession,
            pb.BookSessionRequest(),
            {"client_id", "professional_id", "starts_at", "request_id"},
        ),
        (
            stub.BookSession,
            pb.BookSessionRequest(
                client_id="has space",
                professional_id="x" * 129,
                starts_at=Timestamp(seconds=1, nanos=-1),
                request_id="r",
            ),
            {"client_id", "professional_id", "starts_at"},
        ),
        (stub.CancelSession, pb.CancelSessionRequest(session_id="s", request_id="r"), {"cancelled_by"}),
        (
            stub.CancelSession,
            pb.CancelSessionRequest(session_id="s", cancelled_by=pb.PARTY_CLIENT),
            {"request_id"},
        ),
        (
            stub.CancelSession,
            pb.CancelSessionRequest(session_id="s", cancelled_by=7, reason="x" * 1001, request_id="r"),
            {"cancelled_by", "reason"},
        ),
        (stub.ListSessions, pb.ListSessionsRequest(), {"professional_id"}),
        (stub.ListSessions, pb.ListSessionsRequest(professional_id="p", page_size=-1), {"page_size"}),
        (stub.ListSessions, pb.ListSessionsRequest(professional_id="p", page_size=1001), {"page_size"}),
        (
            stub.ListSessions,
            pb.ListSessionsRequest(professional_id="p", page_token="garbage!"),
            {"page_token"},
        ),
        (stub.ListPayments, pb.ListPaymentsRequest(professional_id="p"), {"section"}),
        (
            kara.credits.GrantCredits,
            cpb.GrantCreditsRequest(client_id="c", credits=0, request_id="r"),
            {"credits"},
        ),
    ]
    for method, request, fields in cases:
        err = refuse(server, lambda m=method, r=request: kara._call(m, r, object), INVALID, None)
        assert {f for f, _ in err.field_violations} == fields, (request, err)


def test_page_token_from_another_query_is_refused(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    for n in range(3):
        book(kara, clock, starts_in=timedelta(days=n + 1))
    token = kara.list_sessions(professional_id="pro-1", page_size=1).next_page_token
    assert token
    refuse(
        server,
        lambda: kara.list_sessions(professional_id="pro-2", page_size=1, page_token=token),
        INVALID,
        None,
    )
