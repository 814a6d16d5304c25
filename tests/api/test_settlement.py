"""Sessions nobody marked, settled by the server (issue 36's settle_unmarked_after and
unmarked_outcome), through real servers on SQLite and PostgreSQL with a clock the test moves.

A session still BOOKED its programme's settle_unmarked_after past its start is completed (the
credit taken) or marked a no-show (its terms and forgiveness decide the credit) by a background
sweep on every replica; exactly one settles it, as the principal service:kara-sessions, with
the event a professional's marking would have made and `settled_automatically` on the session.
The default (0) never settles: a session waits to be marked, as the article leaves it."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from kara.sessions.v1 import programmes_pb2 as ppb
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import SessionsClient
from kara_sessions_server.adapters.storage import AuditRow
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start
from kara_sessions_server.entrypoints.maintenance import SETTLED_UNMARKED

from ..support.booking import new_programme
from ..support.clock import FakeClock
from ..support.concurrency import race
from ..support.database import assert_ledger_balances, db_snapshot
from ..support.processes import run_cli
from ..support.refusals import INVALID, refuse

WINDOW = timedelta(hours=24)
AFTER = timedelta(hours=48)
COMPLETED = "kara.sessions.v1.session.completed"
NO_SHOW = "kara.sessions.v1.session.no_show"


def programme(kara: SessionsClient, **terms: object) -> str:
    return new_programme(kara, WINDOW, **terms)


def booked(kara: SessionsClient, clock: FakeClock, programme_id: str, n: int = 1) -> tuple[str, list[str]]:
    """A client with n sessions under the programme, the first starting in two hours."""
    client_id = f"c-{uuid.uuid4().hex[:10]}"
    kara.grant_credits(client_id, n, programme_id=programme_id)
    starts = [clock.now() + timedelta(hours=2, minutes=i) for i in range(n)]
    return client_id, [
        kara.book(client_id, "pro-1", at, programme_id=programme_id).session_id for at in starts
    ]


def balance(kara: SessionsClient, client_id: str, programme_id: str) -> tuple[int, int, int]:
    account = kara.get_credit_account(client_id, programme_id=programme_id)
    return account.available, account.held, account.used


def test_an_unmarked_session_is_completed_once_its_time_has_passed_and_only_then(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    programme_id = programme(kara, settle_unmarked_after=AFTER)
    client_id, [session_id] = booked(kara, clock, programme_id)
    clock.advance(timedelta(hours=2) + AFTER - timedelta(seconds=1))
    before = db_snapshot(server)
    assert server.settler.run_once()[SETTLED_UNMARKED] == 0
    assert db_snapshot(server) == before, "a sweep with nothing due changed something"
    clock.advance(timedelta(seconds=1))
    assert server.settler.run_once()[SETTLED_UNMARKED] == 1
    session = kara.get_session(session_id)
    assert session.state == pb.SESSION_STATE_COMPLETED and session.settled_automatically
    payment = kara.get_payment(session_id)
    assert payment.state == pb.PAYMENT_STATE_PAID and payment.paid_reason == pb.PAID_REASON_COMPLETED
    assert balance(kara, client_id, programme_id) == (0, 0, 1)
    [event] = kara.list_events(types=[COMPLETED])
    assert event.subject == session_id and event.session_changed.session.settled_automatically
    with server.storage.bound(), server.unit_of_work(write=False):
        audit = AuditRow.get(AuditRow.session_id == session_id, AuditRow.action == "COMPLETE")
    assert (audit.principal, audit.actor) == ("service:kara-sessions", "SYSTEM")
    settled = server.metrics.registry.get_sample_value(
        "kara_settled_automatically_total", {"state": "COMPLETED"}
    )
    assert settled == 1
    # Settled once: the next sweep finds nothing, and changes nothing.
    after = db_snapshot(server)
    assert server.settler.run_once()[SETTLED_UNMARKED] == 0
    assert db_snapshot(server) == after
    assert_ledger_balances(server)


@pytest.mark.parametrize(
    ("no_show_takes_credit", "free", "expected"),
    [
        (True, 0, [(pb.PAYMENT_STATE_PAID, False), (pb.PAYMENT_STATE_PAID, False)]),
        (True, 1, [(pb.PAYMENT_STATE_VOIDED, True), (pb.PAYMENT_STATE_PAID, False)]),
        (False, 1, [(pb.PAYMENT_STATE_VOIDED, False), (pb.PAYMENT_STATE_VOIDED, False)]),
    ],
    ids=["no-shows charged", "the first forgiven", "no-shows not charged"],
)
def test_an_unmarked_session_settled_as_a_no_show_follows_the_no_show_terms(
    kara: SessionsClient,
    server: RunningServer,
    clock: FakeClock,
    no_show_takes_credit: bool,
    free: int,
    expected: list[tuple[int, bool]],
) -> None:
    programme_id = programme(
        kara,
        settle_unmarked_after=AFTER,
        unmarked_outcome="no-show",
        no_show_takes_credit=no_show_takes_credit,
        free_late_cancellations=free,
    )
    _, sessions = booked(kara, clock, programme_id, 2)
    clock.advance(timedelta(hours=3) + AFTER)
    assert server.settler.run_once()[SETTLED_UNMARKED] == 2
    for session_id, (state, forgiven) in zip(sessions, expected, strict=True):
        session = kara.get_session(session_id)
        assert session.state == pb.SESSION_STATE_NO_SHOW and session.settled_automatically
        assert (kara.get_payment(session_id).state, session.no_show_forgiven) == (state, forgiven)
    assert [e.subject for e in kara.list_events(types=[NO_SHOW])] == sessions
    assert_ledger_balances(server)


def test_a_session_marked_cancelled_or_under_default_terms_is_left_as_it_is(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    settling = programme(kara, settle_unmarked_after=AFTER, unmarked_outcome="no-show")
    _, [marked, cancelled, settled] = booked(kara, clock, settling, 3)
    kara.cancel(cancelled, "professional")
    _, [default_terms] = booked(kara, clock, programme(kara))
    kara.update_programme(settling, settle_unmarked_after=timedelta(0))
    _, [booked_after_change] = booked(kara, clock, settling)
    clock.advance(timedelta(hours=3))
    kara.complete(marked)
    clock.advance(timedelta(days=60))
    assert server.settler.run_once()[SETTLED_UNMARKED] == 1
    states = {
        s: kara.get_session(s) for s in (marked, cancelled, settled, default_terms, booked_after_change)
    }
    assert not states[marked].settled_automatically and states[marked].state == pb.SESSION_STATE_COMPLETED
    assert states[cancelled].state == pb.SESSION_STATE_CANCELLED_VOIDED
    # Booked while the programme settled: it keeps the terms it was promised.
    assert states[settled].state == pb.SESSION_STATE_NO_SHOW and states[settled].settled_automatically
    assert states[default_terms].state == pb.SESSION_STATE_BOOKED
    assert states[booked_after_change].state == pb.SESSION_STATE_BOOKED


def test_two_replicas_sweeping_at_once_settle_each_session_exactly_once(
    kara: SessionsClient, server: RunningServer, second_replica: RunningServer, clock: FakeClock
) -> None:
    programme_id = programme(kara, settle_unmarked_after=AFTER)
    client_id, sessions = booked(kara, clock, programme_id, 12)
    clock.advance(timedelta(hours=3) + AFTER)
    replicas = [server, second_replica]
    settled = race(4, lambda i: replicas[i % 2].settler.run_once()[SETTLED_UNMARKED])
    # Each replica counts what it settled or found settled by the other: every session, at
    # least once between them; the feed says exactly once.
    assert sum(settled) >= 12
    events = kara.list_events(types=[COMPLETED])
    assert sorted(e.subject for e in events) == sorted(sessions)
    assert balance(kara, client_id, programme_id) == (0, 0, 12)
    assert_ledger_balances(server)


def test_the_background_sweep_settles_on_its_own(database_url: str, clock: FakeClock) -> None:
    running = start(
        Settings(listen="127.0.0.1:0", database_url=database_url, settle_interval_seconds=0.1), clock=clock
    )
    try:
        with SessionsClient(f"127.0.0.1:{running.port}") as kara:
            programme_id = programme(kara, settle_unmarked_after=timedelta(hours=1))
            _, [session_id] = booked(kara, clock, programme_id)
            clock.advance(timedelta(hours=3, minutes=1))
            deadline = time.monotonic() + 20
            while kara.get_session(session_id).state == pb.SESSION_STATE_BOOKED:
                assert time.monotonic() < deadline, "the sweep never came"
                time.sleep(0.05)
            assert kara.get_session(session_id).settled_automatically
    finally:
        running.stop(grace=1)


@pytest.mark.parametrize(
    "after", [timedelta(minutes=30), timedelta(days=60, seconds=1), timedelta(hours=-2)], ids=str
)
def test_settle_unmarked_after_out_of_range_is_refused(
    kara: SessionsClient, server: RunningServer, after: timedelta
) -> None:
    refused = refuse(
        server,
        lambda: kara.create_programme(
            f"p-{uuid.uuid4().hex[:8]}", "Bad", WINDOW, settle_unmarked_after=after
        ),
        INVALID,
        None,
    )
    assert [f for f, _ in refused.field_violations] == ["programme.settle_unmarked_after"]
    shown = kara.get_programme(programme(kara, settle_unmarked_after=timedelta(days=60)))
    assert shown.settle_unmarked_after.ToTimedelta() == timedelta(days=60)
    assert shown.unmarked_outcome == ppb.UNMARKED_OUTCOME_COMPLETED


def test_the_command_line_sets_settlement_terms(server: RunningServer) -> None:
    import json
    import subprocess

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("--target", f"127.0.0.1:{server.port}", *args)

    made = cli("--json", "programme", "create", "settles", "--name", "Settles",
               "--settle-unmarked-after-hours", "48", "--unmarked-outcome", "no-show")  # fmt: skip
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert (created["settle_unmarked_after"], created["unmarked_outcome"]) == (
        48 * 3600,
        "UNMARKED_OUTCOME_NO_SHOW",
    )
    never = cli("--json", "programme", "update", "settles", "--settle-unmarked-after-hours", "0")
    assert never.returncode == 0, never.stderr
    assert json.loads(never.stdout)["settle_unmarked_after"] == 0
    too_soon = cli("programme", "update", "settles", "--settle-unmarked-after-hours", "0.5")
    assert too_soon.returncode == 2 and "0 or" in too_soon.stderr


def test_a_sweep_whose_every_item_is_refused_ends_the_round() -> None:
    """A batch the sweep could do nothing with (each one refused, say a record too large to
    store) would be the same batch again: the round ends, and the next tries again."""
    from kara_sessions_server.domain.errors import RecordTooLarge
    from kara_sessions_server.entrypoints.maintenance import Settler

    asked: list[int] = []

    def due(limit: int) -> list[str]:
        asked.append(limit)
        return [f"s-{n}" for n in range(limit)]

    def refuse_all(item: str) -> None:
        raise RecordTooLarge(f"{item} is too large", metadata={})

    assert Settler(60, {"stuck": (due, refuse_all)}).run_once() == {"stuck": 0}
    assert asked == [Settler.BATCH]
