"""A programme's usage and what other terms would have done (issue 37), through the real gRPC
server on SQLite and PostgreSQL.

A service sees exact counts over any period; the programme's sponsor (sponsor:PROGRAMME_ID)
sees whole months, each count protected month by month (1..k-1 suppressed, the rest rounded
down to a multiple of k), and nothing else of the service. A simulation replays the period's
recorded decisions under other terms and writes nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from kara.sessions.v1 import programmes_pb2 as ppb

from kara_sessions_client.client import KaraError, SessionsClient
from kara_sessions_server.adapters.storage import LedgerEntryRow
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start
from kara_sessions_server.entrypoints.grpc.tokens import TokenTable

from ..support.booking import new_programme
from ..support.clock import FakeClock
from ..support.database import db_snapshot
from ..support.foreign import api_methods, make_world, outcome, raw_call, valid_request
from ..support.processes import run_cli
from ..support.refusals import INVALID, refuse
from ..support.tokens import write_tokens

WINDOW = timedelta(hours=24)
JAN, FEB, MAR, APR = (datetime(2027, m, 1, tzinfo=UTC) for m in (1, 2, 3, 4))
COUNTS = [f.name for f in ppb.ProgrammeUsage.DESCRIPTOR.fields if f.message_type is ppb.Count.DESCRIPTOR]


def values(usage: ppb.ProgrammeUsage) -> dict[str, tuple[int, bool]]:
    return {name: (getattr(usage, name).value, getattr(usage, name).suppressed) for name in COUNTS}


def exact(usage: ppb.ProgrammeUsage) -> dict[str, int]:
    shown = values(usage)
    assert not any(suppressed for _, suppressed in shown.values())
    return {name: value for name, (value, _) in shown.items() if value}


def history(kara: SessionsClient, server: RunningServer, clock: FakeClock) -> str:
    """A January under a programme that forgives one late cancellation a client, gives a grace of
    an hour after booking and settles unmarked sessions after 12 h: one of almost everything."""
    clock.set(JAN + timedelta(days=3, hours=9))
    p = new_programme(
        kara,
        WINDOW,
        free_late_cancellations=1,
        cancellation_grace=timedelta(hours=1),
        settle_unmarked_after=timedelta(hours=12),
    )
    for client, credits in (("a", 10), ("b", 10), ("c", 2)):
        kara.grant_credits(client, credits, programme_id=p)
    kara.grant_credits("d", 3, programme_id=p, expires_at=clock.now() + timedelta(days=1))

    def book(client: str, starts_in: timedelta) -> str:
        return str(kara.book(client, "pro-1", clock.now() + starts_in, programme_id=p).session_id)

    kara.cancel(book("a", timedelta(hours=48)), "client")  # with notice
    clock.advance(timedelta(hours=2))  # past the grace of what follows
    s2, s3 = book("a", timedelta(hours=3)), book("a", timedelta(hours=3, minutes=5))
    s4, s5 = book("b", timedelta(hours=5)), book("b", timedelta(hours=5, minutes=5))
    s7 = book("c", timedelta(hours=6))
    clock.advance(timedelta(hours=1, minutes=5))
    kara.cancel(s2, "client")  # late, a's one forgiven
    kara.cancel(s3, "client")  # late, charged
    kara.cancel(s4, "professional", charge_client=True)  # the box ticked, b's one forgiven
    kara.cancel(s5, "professional")  # the professional's own: not charged
    kara.cancel(book("b", timedelta(hours=2)), "client")  # within the grace
    kara.reschedule(s7, clock.now() + timedelta(days=2), "client")  # late: charged, booked again
    s8, s9, _s10 = (book(c, timedelta(hours=1)) for c in ("a", "b", "b"))
    kara.waive_charge(s3, "goodwill")
    clock.advance(timedelta(hours=2))
    kara.mark_no_show(s8)  # a's forgiveness is used: charged
    kara.complete(s9)
    clock.advance(timedelta(days=1))
    server.settler.run_once()  # s10 completed by the server; d's lot expires
    return p


EXPECTED = {
    "sessions_booked": 11,
    "sessions_completed": 2,
    "cancelled_with_notice": 1,
    "cancelled_late_charged": 1,
    "cancelled_late_not_charged": 4,
    "no_shows_charged": 1,
    "charges_waived": 1,
    "late_moves_charged": 1,
    "sessions_settled_automatically": 1,
    "credits_granted": 25,
    "credits_taken": 5,
    "credits_returned": 6,
    "credits_expired": 3,
    "distinct_clients": 3,
}


def test_usage_counts_the_history_the_test_made_and_agrees_with_the_ledger(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    p = history(kara, server, clock)
    usage = kara.get_programme_usage(p, JAN, FEB)
    assert (usage.programme_id, usage.min_count) == (p, 1)
    assert exact(usage) == EXPECTED
    # The credits are the ledger's entries of the period, kind by kind.
    with server.storage.bound(), server.unit_of_work(write=False):
        entries = list(LedgerEntryRow.select().where(LedgerEntryRow.programme_id == p))
    by_kind = {k: sum(e.credits for e in entries if e.kind in kinds) for k, kinds in (
        ("credits_granted", {"GRANT"}), ("credits_taken", {"TAKE"}),
        ("credits_returned", {"RETURN", "REFUND"}), ("credits_expired", {"EXPIRE"}))}  # fmt: skip
    assert by_kind == {k: EXPECTED[k] for k in by_kind}
    # Nothing before or after it; a period ending before the waiver leaves it out.
    assert exact(kara.get_programme_usage(p, FEB, MAR)) == {}
    assert exact(kara.get_programme_usage(p, JAN - timedelta(days=31), JAN)) == {}
    # The waiver at 12:05 on the 4th, the no-show two hours later.
    morning = exact(kara.get_programme_usage(p, JAN, JAN + timedelta(days=3, hours=13)))
    assert morning["charges_waived"] == 1 and "no_shows_charged" not in morning


def test_a_simulation_under_todays_terms_is_the_report_and_writes_nothing(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    p = history(kara, server, clock)
    before, events = db_snapshot(server), len(kara.list_events(page_size=1000))
    same = kara.simulate_terms(p, JAN, FEB, notice_window=WINDOW)
    assert same.current == same.proposed == kara.get_programme_usage(p, JAN, FEB)
    assert (same.decisions_changed.value, same.refused.value) == (0, 0)
    assert db_snapshot(server) == before and len(kara.list_events(page_size=1000)) == events


def test_other_terms_change_exactly_the_decisions_they_decide_otherwise(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    p = history(kara, server, clock)
    current = exact(kara.get_programme_usage(p, JAN, FEB))

    def proposed(**terms: object) -> tuple[dict[str, int], int, int]:
        done = kara.simulate_terms(p, JAN, FEB, **terms)
        assert exact(done.current) == current
        return exact(done.proposed), done.decisions_changed.value, done.refused.value

    def moved(changes: dict[str, int]) -> dict[str, int]:
        return {
            k: v
            for k, v in ({**current, **{k: current.get(k, 0) + d for k, d in changes.items()}}).items()
            if v
        }

    # No forgiveness: a's and b's forgiven cancellations are charged; a's no-show then was not the
    # second charge but is charged all the same.
    assert proposed(free_late_cancellations=0) == (
        moved({"cancelled_late_charged": 2, "cancelled_late_not_charged": -2, "credits_taken": 2,
               "credits_returned": -2}), 2, 0)  # fmt: skip
    # Three forgiven each: a's second late cancellation (s3) and a's no-show (s8) are forgiven too.
    assert proposed(free_late_cancellations=3) == (
        moved({"cancelled_late_charged": -1, "cancelled_late_not_charged": 1, "no_shows_charged": -1,
               "no_shows_not_charged": 1, "credits_taken": -2, "credits_returned": 2}), 2, 0)  # fmt: skip
    # A client's late cancellation must go through the professional: the client's own two (s2,
    # s3) would have been refused (the grace one still passes), so a's free one is left for a's
    # no-show (s8), forgiven instead of charged: replayed in time order.
    assert proposed(client_late_cancel="contact-professional") == (
        moved({"cancelled_late_charged": -1, "cancelled_late_not_charged": -1, "no_shows_charged": -1,
               "no_shows_not_charged": 1, "credits_taken": -2}), 3, 2)  # fmt: skip
    # Late moves free: c's move is moved in place, nothing taken.
    assert proposed(late_reschedule="free") == (
        moved({"late_moves_charged": -1, "credits_taken": -1}), 1, 0)  # fmt: skip
    # Unmarked sessions never settled: s10 would still wait to be marked.
    assert proposed(settle_unmarked_after=timedelta(0)) == (
        moved({"sessions_completed": -1, "sessions_settled_automatically": -1, "credits_taken": -1}),
        1,
        1,
    )
    # A window of 3 h: the professional's cancellations (3 h 55 min and 4 h ahead) had notice, so
    # the ticked box is refused and the other is with notice; c's move (4 h 55 min ahead) is moved in place.
    assert proposed(notice_window=timedelta(hours=3)) == (
        moved({"cancelled_late_not_charged": -2, "cancelled_with_notice": 1, "late_moves_charged": -1,
               "credits_taken": -1, "credits_returned": -1}), 3, 1)  # fmt: skip


# --- the sponsor ---------------------------------------------------------------------------------

SPONSOR_K = 5


@dataclass
class Sponsored:
    server: RunningServer
    tokens: dict[str, str]
    as_: Callable[[str], SessionsClient]

    def __call__(self, principal: str) -> SessionsClient:
        return self.as_(principal)


@pytest.fixture
def sponsored(database_url: str, clock: FakeClock, tmp_path: Path) -> Iterator[Sponsored]:
    """A server that authenticates (k = 5); `sponsored(principal)` calls as a service, a sponsor, ..."""
    principals = ("service:hub", "sponsor:acme", "sponsor:other", "client:c-0", "professional:pro-1")
    tokens = write_tokens(tmp_path / "tokens.toml", principals)
    running = start(
        Settings(
            listen="127.0.0.1:0",
            database_url=database_url,
            tokens=TokenTable.load(tmp_path / "tokens.toml"),
            report_min_count=SPONSOR_K,
        ),
        clock=clock,
    )
    clients: list[SessionsClient] = []

    def as_(principal: str) -> SessionsClient:
        client = SessionsClient(f"127.0.0.1:{running.port}", token=tokens[principal])
        clients.append(client)
        return client

    try:
        yield Sponsored(running, tokens, as_)
    finally:
        for client in clients:
            client.close()
        running.stop(grace=1)


def _bookings(kara: SessionsClient, clock: FakeClock, per_month: dict[datetime, int]) -> None:
    """Each month, that many bookings, each by a client of its own."""
    kara.create_programme("acme", "Acme Ltd", WINDOW)
    for month, n in per_month.items():
        clock.set(month + timedelta(days=2))
        for i in range(n):
            client = f"c-{month.month}-{i}"
            kara.grant_credits(client, 1, programme_id="acme")
            kara.book(client, "pro-1", clock.now() + timedelta(days=3), programme_id="acme")


def test_a_sponsor_sees_small_counts_suppressed_and_cannot_recover_them_by_differencing(
    sponsored: Sponsored, clock: FakeClock
) -> None:
    service, sponsor = sponsored("service:hub"), sponsored("sponsor:acme")
    _bookings(service, clock, {JAN: SPONSOR_K - 1, FEB: SPONSOR_K, MAR: SPONSOR_K + 2})

    def booked(
        who: SessionsClient, start: datetime, end: datetime
    ) -> tuple[tuple[int, bool], tuple[int, bool]]:
        usage = values(who.get_programme_usage("acme", start, end))
        return usage["sessions_booked"], usage["distinct_clients"]

    # The service: exact.
    assert booked(service, JAN, FEB) == ((4, False), (4, False))
    assert booked(service, JAN, APR) == ((16, False), (16, False))
    # The sponsor: k-1 suppressed, k shown, k+2 rounded down to k.
    assert booked(sponsor, JAN, FEB) == ((0, True), (0, True))
    assert booked(sponsor, FEB, MAR) == ((5, False), (5, False))
    assert booked(sponsor, MAR, APR) == ((5, False), (5, False))
    # Every overlapping period: its months' protected figures, summed; distinct clients rounded.
    assert booked(sponsor, JAN, MAR) == ((5, True), (5, False))
    assert booked(sponsor, JAN, APR) == ((10, True), (15, False))
    assert booked(sponsor, FEB, APR) == ((10, False), (10, False))
    # So January's 4 is in no difference: Jan-Mar minus Feb-Mar, Jan-Apr minus Feb-Apr, Jan-Mar
    # minus Feb: each is 0 or a multiple of 5, never 4.
    figures = {(s, e): booked(sponsor, s, e) for s in (JAN, FEB, MAR) for e in (FEB, MAR, APR) if s < e}
    differences = {abs(a[i][0] - b[i][0]) for a in figures.values() for b in figures.values() for i in (0, 1)}
    assert all(d % SPONSOR_K == 0 for d in differences), differences


def test_a_sponsors_period_is_whole_months_and_at_most_two_years(
    sponsored: Sponsored, clock: FakeClock
) -> None:
    sponsored("service:hub").create_programme("acme", "Acme Ltd", WINDOW)
    sponsor = sponsored("sponsor:acme")
    server: RunningServer = sponsored.server
    refused = refuse(server, lambda: sponsor.get_programme_usage("acme", JAN + timedelta(hours=1), FEB),
                     INVALID, "REPORT_PERIOD_NOT_MONTHS")  # fmt: skip
    assert [f for f, _ in refused.field_violations] == ["start_time"]
    refuse(server, lambda: sponsor.get_programme_usage("acme", JAN, JAN.replace(year=2029, month=2)),
           INVALID, "REPORT_PERIOD_TOO_LONG")  # fmt: skip
    refuse(server, lambda: sponsor.get_programme_usage("acme", FEB, JAN), INVALID, None)
    assert sponsor.get_programme_usage("acme", JAN, JAN.replace(year=2029)).min_count == SPONSOR_K


def test_a_sponsors_simulation_is_protected_alike(sponsored: Sponsored, clock: FakeClock) -> None:
    service, sponsor = sponsored("service:hub"), sponsored("sponsor:acme")
    _bookings(service, clock, {JAN: 7})
    clock.set(JAN + timedelta(days=3, hours=12))  # each starts in 36 h: with notice, late for 48 h
    sessions = service.list_sessions(professional_id="pro-1").sessions
    for i, s in enumerate(sessions):
        service.cancel(s.session_id, "client" if i < 3 else "professional")
    done = sponsor.simulate_terms("acme", JAN, FEB, notice_window=timedelta(hours=48))
    exact_done = service.simulate_terms("acme", JAN, FEB, notice_window=timedelta(hours=48))
    assert exact_done.decisions_changed.value == 7
    assert values(exact_done.proposed)["cancelled_late_charged"] == (3, False)
    assert (done.decisions_changed.value, done.decisions_changed.suppressed) == (5, False)
    assert values(done.current)["cancelled_with_notice"] == (5, False)
    assert values(done.proposed)["cancelled_late_charged"] == (0, True)
    assert values(done.proposed)["cancelled_late_not_charged"] == (0, True)


def test_a_sponsor_may_read_its_programme_and_its_report_and_nothing_else(
    sponsored: Sponsored, clock: FakeClock
) -> None:
    service, sponsor = sponsored("service:hub"), sponsored("sponsor:acme")
    server: RunningServer = sponsored.server
    service.create_programme("acme", "Acme Ltd", WINDOW)
    service.create_programme("other", "Other Ltd", WINDOW)
    assert sponsor.get_programme("acme").display_name == "Acme Ltd"
    sponsor.get_programme_usage("acme", JAN, FEB)
    sponsor.simulate_terms("acme", JAN, FEB, free_late_cancellations=2)
    denied = grpc.StatusCode.PERMISSION_DENIED
    for call in (
        lambda: sponsor.get_programme("other"),
        lambda: sponsor.get_programme_usage("other", JAN, FEB),
        lambda: sponsor.simulate_terms("other", JAN, FEB, free_late_cancellations=2),
        lambda: sponsored("client:c-0").get_programme_usage("acme", JAN, FEB),
        lambda: sponsored("professional:pro-1").simulate_terms("acme", JAN, FEB, free_late_cancellations=1),
    ):
        refuse(server, call, denied, "PERMISSION_DENIED")
    # Every other RPC, as a caller no one here wrote sends it.
    world = make_world(service, clock, spare_credits=2)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    token = sponsored.tokens["sponsor:acme"]
    allowed = {"GetProgramme", "GetProgrammeUsage", "SimulateTerms"}
    before = db_snapshot(server)
    for method in api_methods():
        if method.name in allowed:
            continue
        call = raw_call(channel, method)
        request = valid_request(method, world)
        got = outcome(lambda r, c=call: c(r, metadata=(("authorization", f"Bearer {token}"),)), request,
                      method.server_streaming)  # fmt: skip
        assert got == denied, (method.name, got)
    assert db_snapshot(server) == before
    channel.close()
    with pytest.raises(KaraError):
        sponsor.list_programmes()


def test_the_command_line_shows_usage_and_a_simulation_side_by_side(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    import json

    from rich.console import Console

    from kara_sessions_client import render

    p = history(kara, server, clock)
    at = ("--target", f"127.0.0.1:{server.port}")
    period = ("--from", JAN.isoformat(), "--to", FEB.isoformat())
    usage = run_cli(*at, "--json", "programme", "usage", p, *period)
    assert usage.returncode == 0, usage.stderr
    assert json.loads(usage.stdout)["cancelled_late_not_charged"] == {"value": 4, "suppressed": False}
    simulated = run_cli(*at, "--json", "programme", "simulate", p, *period, "--free-late-cancellations", "0")
    assert simulated.returncode == 0, simulated.stderr
    shown = json.loads(simulated.stdout)
    assert (shown["current"]["cancelled_late_charged"], shown["proposed"]["cancelled_late_charged"]) == (
        {"value": 1, "suppressed": False},
        {"value": 3, "suppressed": False},
    )
    assert shown["decisions_changed"] == {"value": 2, "suppressed": False}
    nothing = run_cli(*at, "programme", "simulate", p, *period)
    assert nothing.returncode == 2 and "give at least one terms option" in nothing.stderr
    # On a terminal: one row per count, the current and proposed figures side by side.
    console = Console(force_terminal=True, width=100, record=True)
    render.show(kara.simulate_terms(p, JAN, FEB, free_late_cancellations=0), as_json=False, console=console)
    text = console.export_text()
    assert "current" in text and "proposed" in text and "change" in text
    row = next(line for line in text.splitlines() if "cancelled late charged" in line)
    assert [cell.strip() for cell in row.split("│")[1:-1]] == ["cancelled late charged", "1", "3", "+2"], row


def test_a_period_at_the_edge_of_time_is_answered_not_a_fault(kara: SessionsClient) -> None:
    """A simulation looks back a forgiveness period before its start: from the year 1, there is
    nothing before."""
    first = datetime(1, 1, 1, tzinfo=UTC)
    done = kara.simulate_terms("default", first, first + timedelta(days=31), free_late_cancellations=1)
    assert done.decisions_changed.value == 0
    last = datetime(9999, 12, 1, tzinfo=UTC)
    assert kara.get_programme_usage("default", last, last + timedelta(days=30)).sessions_booked.value == 0
