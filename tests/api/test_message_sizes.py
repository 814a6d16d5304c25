"""No response of any RPC outgrows --max-message-bytes (issue 33), with records and pages filled
to their documented maxima: 20 moves per session, 1,000-character reasons (4 bytes a character
in UTF-8), page_size 1000. A page is cut by size and hands on the token that resumes after its
last item; a change whose record would not fit is refused before it commits.

Before: a session moved 257 times outgrew a message; its 258th move was made and answered
RESOURCE_EXHAUSTED, and from then on GetSession, ListSessions, ListEvents, StreamEvents and the
relay all failed on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import grpc
import pytest
from kara.sessions.v1 import events_pb2 as epb
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import NO_RETRY, KaraError, SessionsClient
from kara_sessions_server.domain.policy import MAX_MOVES_PER_SESSION
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start

from ..support.clock import FakeClock
from ..support.database import assert_ledger_balances, db_snapshot

# A documented maximum of free text, in the widest characters there are.
LONGEST_REASON = "\U0001f600" * 1000
SESSIONS = 16


def _server(database_url: str, clock: FakeClock, max_message_bytes: int) -> RunningServer:
    return start(
        Settings(listen="127.0.0.1:0", database_url=database_url, max_message_bytes=max_message_bytes),
        clock=clock,
    )


@pytest.fixture
def full(database_url: str, clock: FakeClock) -> Iterator[tuple[RunningServer, SessionsClient]]:
    running = _server(database_url, clock, 1024 * 1024)
    try:
        # The client accepts more than the server may send: a response over the limit shows.
        with SessionsClient(f"127.0.0.1:{running.port}", retry=NO_RETRY, timeout=60) as kara:
            yield running, kara
    finally:
        running.stop(grace=1)


def _pages(call: Callable[[str], Any], items: Callable[[Any], list[Any]], limit: int) -> list[Any]:
    """Every item of a list, page by page, each response within `limit` bytes."""
    seen: list[Any] = []
    token = ""
    while True:
        page = call(token)
        assert page.ByteSize() <= limit
        seen += items(page)
        token = page.next_page_token
        if not token:
            return seen


def test_records_and_pages_at_their_maxima_fit_in_a_message(
    full: tuple[RunningServer, SessionsClient], clock: FakeClock
) -> None:
    running, kara = full
    limit = 1024 * 1024
    kara.grant_credits("client-1", SESSIONS)
    ids = []
    for n in range(SESSIONS):
        session_id = kara.book("client-1", "pro-1", clock.now() + timedelta(days=10, hours=n)).session_id
        for move in range(MAX_MOVES_PER_SESSION):
            to = clock.now() + timedelta(days=12 + move, hours=n)
            kara.reschedule(session_id, to, "professional", reason=LONGEST_REASON)
        ids.append(session_id)
    # The 21st move is refused, before anything changes.
    before = db_snapshot(running)
    with pytest.raises(KaraError) as refused:
        kara.reschedule(ids[0], clock.now() + timedelta(days=40), "client", reason=LONGEST_REASON)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.reason == "RESCHEDULE_LIMIT_REACHED"
    assert db_snapshot(running) == before
    with pytest.raises(KaraError) as predicted:
        kara.preview_reschedule(ids[0], clock.now() + timedelta(days=40), "client")
    assert predicted.value.reason == "RESCHEDULE_LIMIT_REACHED"
    # The fullest record still cancels, and its response fits.
    cancelled = kara.cancel(ids[-1], "professional", reason=LONGEST_REASON)
    assert len(cancelled.session.moves) == MAX_MOVES_PER_SESSION
    assert cancelled.ByteSize() <= limit
    assert kara.get_session(ids[0]).ByteSize() <= limit

    # Together they are several messages' worth: every list is cut by size, and nothing is lost.
    listed = _pages(
        lambda token: kara.list_sessions(professional_id="pro-1", page_size=1000, page_token=token),
        lambda page: list(page.sessions),
        limit,
    )
    assert sorted(s.session_id for s in listed) == sorted(ids)
    unpaid = _pages(
        lambda token: kara.list_payments("pro-1", "unpaid", page_size=1000, page_token=token),
        lambda page: list(page.payments),
        limit,
    )
    assert len(unpaid) == SESSIONS
    events: list[epb.Event] = []
    while True:
        page = kara.list_events(events[-1].cursor if events else "", page_size=1000)
        assert sum(e.ByteSize() + 6 for e in page) <= limit
        if not page:
            break
        assert len(page) < 1000, "the page was cut by size, not by count"
        events += page
    assert len(events) == 1 + SESSIONS * (1 + MAX_MOVES_PER_SESSION) + 1
    streamed = []
    for event in kara.feed.StreamEvents(epb.StreamEventsRequest(), timeout=30):
        assert event.ByteSize() <= limit
        streamed.append(event.event_id)
        if len(streamed) == len(events):
            break
    assert streamed == [e.event_id for e in events]
    assert_ledger_balances(running)


def test_a_change_whose_record_would_not_fit_is_refused_before_it_commits(
    database_url: str, clock: FakeClock
) -> None:
    """With a small --max-message-bytes, a record can outgrow a message before its caps do: the
    change is refused, nothing of it is made, and everything else still answers."""
    limit = 16 * 1024
    running = _server(database_url, clock, limit)
    try:
        with SessionsClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as kara:
            kara.grant_credits("client-1", 3)
            session_id = kara.book("client-1", "pro-1", clock.now() + timedelta(days=10)).session_id
            moved = 0
            before = db_snapshot(running)
            with pytest.raises(KaraError) as refused:
                for moved in range(MAX_MOVES_PER_SESSION):
                    to = clock.now() + timedelta(days=12 + moved)
                    kara.reschedule(session_id, to, "professional", reason=LONGEST_REASON)
                    before = db_snapshot(running)
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert refused.value.reason == "RECORD_TOO_LARGE"
            assert "--max-message-bytes" in refused.value.message
            assert db_snapshot(running) == before, "a refused change made nothing"
            assert 0 < moved < MAX_MOVES_PER_SESSION
            assert kara.get_session(session_id).ByteSize() <= limit
            for _ in range(2):
                kara.book("client-1", "pro-1", clock.now() + timedelta(days=3))
            sessions = _pages(
                lambda token: kara.list_sessions(professional_id="pro-1", page_size=1000, page_token=token),
                lambda page: list(page.sessions),
                limit,
            )
            assert len(sessions) == 3
            events: list[epb.Event] = []
            while page := kara.list_events(events[-1].cursor if events else "", page_size=1000):
                assert sum(e.ByteSize() + 6 for e in page) <= limit
                events += page
            assert len(events) == 1 + 1 + moved + 2  # the grant, the bookings, the moves made
            assert kara.cancel(session_id, "client").session.state == pb.SESSION_STATE_CANCELLED_VOIDED
            # A ledger of more entries than a message holds pages by size too.
            for n in range(150):
                kara.grant_credits("client-2", 1, request_id=f"grant-{n}-" + "r" * 100)
            entries = _pages(
                lambda token: kara.get_credit_account("client-2", page_size=1000, page_token=token),
                lambda page: list(page.entries),
                limit,
            )
            assert len({e.entry_id for e in entries}) == 150
        assert_ledger_balances(running)
    finally:
        running.stop(grace=1)
