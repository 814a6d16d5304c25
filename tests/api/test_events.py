"""EventService: exactly one event per committed change, in commit order, resumable from a
cursor, live on a stream, scoped to each principal, pruned after the retention period."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from kara.sessions.v1 import events_pb2 as epb
from kara.sessions.v1 import events_pb2_grpc
from kara.sessions.v1 import invoices_pb2 as ipb
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import KaraError, SessionsClient
from kara_sessions_server.domain.feed import Change
from kara_sessions_server.domain.model import CreditAccount
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start
from kara_sessions_server.service_layer import snapshots
from kara_sessions_server.service_layer.repositories import RequestRecord, decode_cursor

from ..support.booking import book
from ..support.clock import FakeClock
from ..support.database import db_snapshot
from ..support.refusals import INVALID, PRECONDITION, refuse
from ..support.tokens import secured_server

T = "kara.sessions.v1."


def kinds(events: list[epb.Event]) -> list[str]:
    return [e.type.removeprefix(T) for e in events]


def test_each_committed_change_tells_the_feed_once_with_its_state(
    kara: SessionsClient, clock: FakeClock, server: RunningServer
) -> None:
    kara.grant_credits("client-1", 3)
    late = kara.book("client-1", "pro-1", clock.now() + timedelta(hours=5)).session_id
    kara.cancel(late, "professional", charge_client=True, reason="client emailed late")
    early = kara.book("client-1", "pro-1", clock.now() + timedelta(days=3)).session_id
    kara.cancel(early, "client")
    held = kara.book("client-1", "pro-1", clock.now() + timedelta(hours=1)).session_id
    clock.advance(timedelta(hours=2))
    kara.complete(held)
    invoice = kara.create_invoice("pro-1", [late]).invoice_id
    kara.add_to_invoice(invoice, [held])
    kara.submit_invoice(invoice)

    events = kara.list_events()
    assert kinds(events) == [
        "credits.granted",
        "session.booked",
        "session.cancelled",
        "session.booked",
        "session.cancelled",
        "session.booked",
        "session.completed",
        "invoice.created",
        "invoice.changed",
        "invoice.submitted",
    ]
    assert len({e.event_id for e in events}) == len(events)
    assert [e.subject for e in events] == [
        "client-1",
        late,
        late,
        early,
        early,
        held,
        held,
        invoice,
        invoice,
        invoice,
    ]
    granted = events[0].credit_account
    assert (granted.client_id, granted.available, granted.held, granted.used) == ("client-1", 3, 0, 0)

    charged = events[2].session_changed
    assert charged.session.state == pb.SESSION_STATE_CANCELLED_PAID
    assert (charged.payment.state, charged.payment.section) == (
        pb.PAYMENT_STATE_PAID,
        pb.PAYMENT_SECTION_PAID,
    )
    c = charged.session.cancellation
    assert (c.cancelled_by, c.late, c.charge_client, c.notice_seconds, c.reason) == (
        pb.PARTY_PROFESSIONAL,
        True,
        True,
        5 * 3600,
        "client emailed late",
    )
    assert charged.payment.paid_reason == pb.PAID_REASON_CHARGED_LATE_CANCELLATION
    voided = events[4].session_changed
    assert (voided.payment.state, voided.payment.section) == (
        pb.PAYMENT_STATE_VOIDED,
        pb.PAYMENT_SECTION_UNPAID,
    )
    assert voided.session.cancellation.late is False
    assert events[1].session_changed.payment.state == pb.PAYMENT_STATE_PENDING
    assert events[6].session_changed.session.state == pb.SESSION_STATE_COMPLETED
    assert [len(e.invoice.lines) for e in events[7:]] == [1, 2, 2]
    assert events[9].invoice.state == ipb.INVOICE_STATE_SUBMITTED
    assert events[2].time.ToDatetime() < events[6].time.ToDatetime()


def test_refusals_rollbacks_and_replays_tell_nothing(
    kara: SessionsClient, clock: FakeClock, server: RunningServer
) -> None:
    session_id = book(kara, clock, timedelta(days=3), grant=2)
    first = kara.cancel(session_id, "client", request_id="cancel-1")
    other = book(kara, clock, timedelta(hours=3), grant=0)
    kara.cancel(other, "client")
    invoice = kara.create_invoice("pro-1", [other]).invoice_id
    before = kara.list_events()

    # A replay: the first answer, no second event.
    assert kara.cancel(session_id, "client", request_id="cancel-1") == first
    # Refused before anything was written.
    refuse(
        server, lambda: kara.cancel(session_id, "client", charge_client=True), INVALID, "CLIENT_CANNOT_CHARGE"
    )
    # Refused after reading: the transaction rolls back.
    refuse(server, lambda: kara.cancel(session_id, "client"), PRECONDITION, "SESSION_NOT_BOOKED")
    # Refused after the invoice row went in: the whole transaction, event included, rolls back.
    refuse(server, lambda: kara.create_invoice("pro-1", [other]), PRECONDITION, "SESSION_ALREADY_INVOICED")
    refuse(server, lambda: kara.add_to_invoice(invoice, [other]), PRECONDITION, "SESSION_ALREADY_INVOICED")
    assert kara.list_events() == before


def test_a_consumer_resumes_exactly_after_its_cursor(kara: SessionsClient, clock: FakeClock) -> None:
    for n in range(7):
        book(kara, clock, timedelta(days=2), client_id=f"client-{n}")
    everything = kara.list_events()
    assert len(everything) == 14
    seen: list[epb.Event] = []
    cursor = ""
    while page := kara.list_events(cursor, page_size=3):
        assert len(page) <= 3
        seen += page
        cursor = page[-1].cursor
    assert seen == everything
    for n, event in enumerate(everything):
        assert kara.list_events(event.cursor) == everything[n + 1 :]
    assert list(kara.events(everything[4].cursor)) == everything[5:]
    only = kara.list_events(types=[T + "credits.granted"])
    assert [e.subject for e in only] == [f"client-{n}" for n in range(7)]


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"after": "not-a-cursor"}, "after"),
        ({"after": "x" * 201}, "after"),
        ({"types": ["session.cancelled"]}, "types[0]"),
        ({"page_size": -1}, "page_size"),
        ({"page_size": 1001}, "page_size"),
    ],
)
def test_malformed_requests_name_the_field(
    kara: SessionsClient, request_kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        kara.feed.ListEvents(epb.ListEventsRequest(**request_kwargs), timeout=5)  # type: ignore[arg-type]
    refused = KaraError.from_rpc_error(raised.value)
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in refused.field_violations] == [field]


def test_an_expired_cursor_is_out_of_range_never_a_silent_skip(
    kara: SessionsClient, clock: FakeClock, server: RunningServer
) -> None:
    for n in range(3):
        book(kara, clock, timedelta(days=2), client_id=f"client-{n}")
    old = kara.list_events()
    clock.advance(timedelta(days=30, seconds=1))
    book(kara, clock, timedelta(days=2), client_id="client-new")
    assert server.events.prune() == len(old)
    assert server.events.prune() == 0

    with pytest.raises(KaraError) as expired:
        kara.list_events(old[2].cursor)
    assert (expired.value.code, expired.value.reason) == (grpc.StatusCode.OUT_OF_RANGE, "CURSOR_EXPIRED")
    assert "resynchronise" in expired.value.message
    # The newest pruned event's cursor has missed nothing; nor has a fresh start.
    kept = kara.list_events(old[-1].cursor)
    assert kinds(kept) == ["credits.granted", "session.booked"]
    assert kara.list_events() == kept
    with pytest.raises(KaraError) as streamed:
        next(kara.events(old[0].cursor, follow=True))
    assert streamed.value.code == grpc.StatusCode.OUT_OF_RANGE


def test_the_server_prunes_old_events_in_the_background(tmp_path: Path, clock: FakeClock) -> None:
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=f"sqlite:///{tmp_path / 'k.db'}",
        event_retention=timedelta(days=1),
        # An event's row is its change's request_id record, kept as long as that too.
        request_id_retention=timedelta(days=1),
        event_prune_seconds=0.05,
    )
    running = start(settings, clock=clock)
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            kara.grant_credits("client-1", 1)
            assert len(kara.list_events()) == 1
            clock.advance(timedelta(days=2))
            deadline = time.monotonic() + 5
            while kara.list_events() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert kara.list_events() == []
    finally:
        running.stop(grace=1)


def _follow(
    kara: SessionsClient, after: str = "", **kwargs: object
) -> tuple[list[epb.Event], threading.Thread]:
    received: list[epb.Event] = []

    def run() -> None:
        try:
            for event in kara.events(after, follow=True, **kwargs):  # type: ignore[arg-type]
                received.append(event)
        except Exception:  # the channel closes at the end of the test
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return received, thread


def _wait_for(condition: Callable[[], bool], seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_stream_sends_the_backlog_then_each_commit_as_it_happens(
    server: RunningServer, clock: FakeClock
) -> None:
    target = f"127.0.0.1:{server.port}"
    with SessionsClient(target) as kara, SessionsClient(target) as listener:
        first = book(kara, clock, timedelta(days=2))
        received, _ = _follow(listener, types=[T + "session.cancelled", T + "session.booked"])
        _wait_for(lambda: len(received) == 1)
        started = time.monotonic()
        kara.cancel(first, "client")
        _wait_for(lambda: len(received) == 2, seconds=1)
        assert time.monotonic() - started < 1
        assert kinds(received) == ["session.booked", "session.cancelled"]
        assert received == kara.list_events(types=[T + "session.cancelled", T + "session.booked"])


def test_streams_are_bounded_and_end_cleanly_when_the_server_stops(tmp_path: Path, clock: FakeClock) -> None:
    running = start(
        Settings(
            listen="127.0.0.1:0",
            database_url=f"sqlite:///{tmp_path / 'k.db'}",
            max_workers=4,
            max_event_streams=1,
        ),
        clock=clock,
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = events_pb2_grpc.EventServiceStub(channel)
    try:
        open_stream = stub.StreamEvents(epb.StreamEventsRequest())
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            kara.grant_credits("client-1", 1)
            assert next(open_stream).type == T + "credits.granted"
            with pytest.raises(grpc.RpcError) as refused:
                next(stub.StreamEvents(epb.StreamEventsRequest()))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-event-streams" in (refused.value.details() or "")
        stopped = time.monotonic()
        running.stop(grace=10)
        assert time.monotonic() - stopped < 3, "an open stream held the drain"
        assert list(open_stream) == []  # ended with OK, not an error
        assert open_stream.code() == grpc.StatusCode.OK
    finally:
        channel.close()
        running.stop(grace=0)


def test_open_streams_take_no_worker_from_other_calls(tmp_path: Path, clock: FakeClock) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    running = start(
        Settings(listen="127.0.0.1:0", database_url=url, max_workers=1, max_event_streams=2), clock=clock
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = events_pb2_grpc.EventServiceStub(channel)
    try:
        streams = [stub.StreamEvents(epb.StreamEventsRequest()) for _ in range(2)]
        with SessionsClient(f"127.0.0.1:{running.port}", timeout=5) as kara:
            kara.grant_credits("client-1", 1)  # the one worker is free while both streams are open
            assert [next(s).type for s in streams] == [T + "credits.granted"] * 2
            assert kara.get_credit_account("client-1").available == 1
    finally:
        channel.close()
        running.stop(grace=1)


# --- who reads what -------------------------------------------------------------------------

PRINCIPALS = ("service:bus", "professional:pro-1", "client:cl-1", "client:cl-2")


@pytest.fixture
def secured(database_url: str, clock: FakeClock, tmp_path: Path) -> Iterator[Callable[[str], SessionsClient]]:
    with secured_server(database_url, clock, tmp_path, PRINCIPALS) as as_:
        yield as_


def test_each_principal_reads_only_its_own_events(
    secured: Callable[[str], SessionsClient], clock: FakeClock
) -> None:
    svc = secured("service:bus")
    svc.grant_credits("cl-1", 2)
    svc.grant_credits("cl-2", 2)
    mine = svc.book("cl-1", "pro-1", clock.now() + timedelta(hours=3)).session_id
    theirs = svc.book("cl-2", "pro-2", clock.now() + timedelta(hours=3)).session_id
    svc.cancel(mine, "client")
    svc.cancel(theirs, "client")
    invoice = svc.create_invoice("pro-1", [mine]).invoice_id
    svc.create_invoice("pro-2", [theirs])

    assert len(svc.list_events()) == 8
    pro = secured("professional:pro-1").list_events()
    assert [(k, e.subject) for k, e in zip(kinds(pro), pro, strict=True)] == [
        ("session.booked", mine),
        ("session.cancelled", mine),
        ("invoice.created", invoice),
    ]
    client = secured("client:cl-1").list_events()
    assert [(k, e.subject) for k, e in zip(kinds(client), client, strict=True)] == [
        ("credits.granted", "cl-1"),
        ("session.booked", mine),
        ("session.cancelled", mine),
    ]
    other_client = secured("client:cl-2")
    assert {e.subject for e in other_client.list_events()} == {"cl-2", theirs}
    received, _ = _follow(secured("professional:pro-1"))
    _wait_for(lambda: len(received) == 3)
    svc.grant_credits("cl-1", 1)
    svc.book("cl-2", "pro-2", clock.now() + timedelta(hours=3))
    later = svc.book("cl-1", "pro-1", clock.now() + timedelta(hours=3)).session_id
    _wait_for(lambda: len(received) == 4)
    assert received[3].subject == later
    for call in (lambda c: c.list_events(), lambda c: next(c.events(follow=True))):
        with pytest.raises(KaraError) as anonymous:
            call(secured("anonymous"))
        assert anonymous.value.code == grpc.StatusCode.UNAUTHENTICATED


# --- commit order on PostgreSQL ---------------------------------------------------------------


@pytest.mark.postgres
def test_a_transaction_that_commits_late_is_never_skipped(postgres_database: str, clock: FakeClock) -> None:
    """The classic outbox bug: transaction A appends first (lower position) but commits after
    transaction B. A reader that took B's position as its cursor would never see A."""
    from ..support.database import reset_postgres

    reset_postgres(postgres_database)
    running = start(Settings(listen="127.0.0.1:0", database_url=postgres_database), clock=clock)
    appended, release, committed = threading.Event(), threading.Event(), threading.Event()

    def late_transaction() -> None:
        with running.unit_of_work() as uow:
            account = CreditAccount("late-client", 1, 0, 0)
            request = RequestRecord("late-request", "GrantCredits", "-")
            data = snapshots.dump_account(account)
            uow.events.append(Change.of_account(account), data, clock.now(), request)
            appended.set()
            release.wait(10)
            uow.commit()
        committed.set()

    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            kara.grant_credits("early", 1)
            start_cursor = kara.list_events()[-1].cursor
            thread = threading.Thread(target=late_transaction)
            thread.start()
            assert appended.wait(10)
            session_id = kara.book("early", "pro-1", clock.now() + timedelta(days=1)).session_id  # B commits
            # B is committed, but A, older, is still open: the feed stops before both.
            assert kara.list_events(start_cursor) == []
            release.set()
            assert committed.wait(10)
            thread.join()
            after = kara.list_events(start_cursor)
            assert [(e.type.removeprefix(T), e.subject) for e in after] == [
                ("credits.granted", "late-client"),
                ("session.booked", session_id),
            ]
            cursors = [decode_cursor(e.cursor) for e in after]
            assert cursors[0] is not None and cursors[1] is not None
            assert cursors[0].position < cursors[1].position  # A took its position first
    finally:
        release.set()
        running.stop(grace=1)


def test_replays_of_the_feed_match_the_tables(
    kara: SessionsClient, clock: FakeClock, server: RunningServer
) -> None:
    """Every audit row of a session change and every grant has exactly one event, and no event
    lacks its change."""
    for n in range(4):
        session_id = book(kara, clock, timedelta(hours=30 - n * 4), client_id=f"client-{n % 2}")
        kara.cancel(session_id, "client" if n % 2 else "professional")
    assert_feed_matches_tables(kara, db_snapshot(server))


def assert_feed_matches_tables(kara: SessionsClient, tables: dict[str, list[dict[str, object]]]) -> None:
    changes = {
        "BOOK": "session.booked",
        "CANCEL": "session.cancelled",
        "COMPLETE": "session.completed",
        "NO_SHOW": "session.no_show",
        "WAIVE": "session.charge_waived",
    }
    expected = sorted(
        [(changes[str(row["action"])], str(row["session_id"])) for row in tables["audit_log"]]
        + [
            ("credits.granted", str(row["client_id"]))
            for row in tables["ledger_entries"]
            if row["kind"] == "GRANT"
        ]
    )
    events = [e for e in kara.events() if not e.type.startswith(T + "programme.")]
    assert sorted((e.type.removeprefix(T), e.subject) for e in events) == expected
    assert len({e.event_id for e in events}) == len(events)


def test_no_shows_waivers_and_programmes_tell_the_feed(
    kara: SessionsClient, clock: FakeClock, server: RunningServer
) -> None:
    kara.create_programme("eap", "EAP", timedelta(hours=48))
    kara.update_programme("eap", no_show_takes_credit=False)
    kara.grant_credits("client-1", 2)
    session_id = kara.book("client-1", "pro-1", clock.now() + timedelta(hours=1)).session_id
    clock.advance(timedelta(hours=2))
    kara.mark_no_show(session_id)
    kara.waive_charge(session_id, "goodwill")
    events = kara.list_events()
    assert kinds(events) == [
        "programme.created",
        "programme.updated",
        "credits.granted",
        "session.booked",
        "session.no_show",
        "session.charge_waived",
    ]
    assert events[1].programme.no_show_takes_credit is False
    no_show, waived = events[4].session_changed, events[5].session_changed
    assert (no_show.session.state, no_show.payment.state) == (pb.SESSION_STATE_NO_SHOW, pb.PAYMENT_STATE_PAID)
    assert waived.payment.state == pb.PAYMENT_STATE_VOIDED
    assert waived.payment.waiver.reason == "goodwill"
    assert_feed_matches_tables(kara, db_snapshot(server))
