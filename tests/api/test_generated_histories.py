"""Generated histories: hypothesis drives a real server with random sequences of grants,
bookings, cancellations and reschedules by either party with and without the charge box and
notice, completions, no-shows, waivers, invoice actions, retries and request_id reuse, and
checks after every step that the server agrees with a model of the article:

Sessions are booked under two programmes: the default one (the article's terms) and a sponsor's
that sends a client's late cancellation to the professional, allows two moves in place and
forgives a client's first charge (a professional's charged late cancellation or a no-show) in
any two days, and has the server mark a session nobody marked a no-show twelve hours after its
start (issue 36's client_late_cancel, max_reschedules, free_late_cancellations,
forgiveness_period, settle_unmarked_after and unmarked_outcome).

- for each client and programme, available + held + used = granted, held = its booked
  sessions, used = its sessions whose credit is taken;
- every session's payment state and section follow from its state (and waiver), and the
  Payments tab lists it in that section, on the invoice the model says (at most one);
- a replay returns the first answer and changes nothing; a refusal changes nothing; a
  cancellation's preview foretells its outcome, forgiveness included;
- the feed holds exactly one event per committed change.

`make test` runs a few hundred steps on each database; set KARA_HYPOTHESIS_EXAMPLES (examples of
up to 30 steps each) for a longer run."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import NO_RETRY, KaraError, SessionsClient
from kara_sessions_server.adapters.storage import LedgerEntryRow
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start
from kara_sessions_server.entrypoints.maintenance import EXPIRED_LOTS, SETTLED_UNMARKED

from ..conftest import ALL_DATABASES, open_database
from ..support.clock import FakeClock
from ..support.database import assert_ledger_balances, db_snapshot

# make test: a fixed, reproducible set of histories (derandomized). With KARA_HYPOTHESIS_EXAMPLES,
# that many random ones, different on every run.
LONG_RUN = os.environ.get("KARA_HYPOTHESIS_EXAMPLES")
EXAMPLES = int(LONG_RUN or "15")
WINDOW = timedelta(hours=24)
PAID_STATES = {"CANCELLED_PAID", "NO_SHOW", "COMPLETED"}
# The sponsor's programme: the article's window, "contact your professional" for a client's late
# cancellation, at most two moves in place, one charge forgiven in any two days, a session nobody
# marked settled as a no-show twelve hours after its start.
FORGIVENESS_PERIOD = timedelta(days=2)
SETTLE_AFTER = timedelta(hours=12)
SPONSOR_TERMS = {
    "client_late_cancel": "contact-professional",
    "max_reschedules": 2,
    "free_late_cancellations": 1,
    "forgiveness_period": FORGIVENESS_PERIOD,
    "settle_unmarked_after": SETTLE_AFTER,
    "unmarked_outcome": "no-show",
}
SPONSOR_MOVES = 2


@pytest.fixture(params=ALL_DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """SQLite, PostgreSQL, and PostgreSQL behind PgBouncer in transaction mode (issue 33)."""
    return open_database(request, tmp_path)


@dataclass
class Booking:
    client: str
    pro: str
    starts: Any
    state: str = "BOOKED"
    waived: bool = False
    invoice: str = ""
    # 0: the default programme; 1: the sponsor's (SPONSOR_TERMS).
    programme: int = 0
    moves: int = 0
    # When its charge was forgiven (a cancellation's or a no-show's); None if it was not.
    forgiven_at: Any = None
    settled_automatically: bool = False
    # The expire time of the lot its credit was held from (None: never).
    lot: Any = None

    @property
    def paid(self) -> bool:
        return self.state in PAID_STATES and not self.waived and self.forgiven_at is None


# What each ledger move does to a lot's [granted, available, held, used, expired].
MOVES = {
    "HOLD": (0, -1, 1, 0, 0),
    "RETURN": (0, 1, -1, 0, 0),
    "TAKE": (0, 0, -1, 1, 0),
    "REFUND": (0, 1, 0, -1, 0),
}


@dataclass
class Model:
    # (client, programme) -> expire time (None: never) -> [granted, available, held, used, expired]
    lots: dict[tuple[str, int], dict[Any, list[int]]] = field(default_factory=dict)
    sessions: dict[str, Booking] = field(default_factory=dict)
    # invoice id -> (professional, state)
    invoices: dict[str, list[str]] = field(default_factory=dict)
    # Committed changes, each of which must have put one event in the feed.
    changes: int = 0

    def grant(self, client: str, programme: int, credits: int, expires: Any) -> None:
        lot = self.lots.setdefault((client, programme), {}).setdefault(expires, [0, 0, 0, 0, 0])
        lot[0] += credits
        lot[1] += credits

    def pick(self, client: str, programme: int, valid_at: Any, now: Any) -> tuple[Any, str | None]:
        """The lot a booking starting at `valid_at` holds from (the soonest to expire of those
        valid then), or the refusal: credits there but expiring first, or none at all."""

        def usable(at: Any) -> list[Any]:
            lots = self.lots.get((client, programme), {})
            return sorted(
                (e for e, b in lots.items() if b[1] >= 1 and (e is None or e > at)),
                key=lambda e: (e is None, e),
            )

        if valid := usable(valid_at):
            return valid[0], None
        return None, "CREDITS_EXPIRE_BEFORE_SESSION" if usable(now) else "INSUFFICIENT_CREDITS"

    def move(self, s: Booking, kind: str, now: Any) -> None:
        """A ledger move of `s`'s credit in its lot; one given back to a lot whose time has
        passed expires as it comes back."""
        lot = self.lots[s.client, s.programme][s.lot]
        for i, d in enumerate(MOVES[kind]):
            lot[i] += d
        if kind in ("RETURN", "REFUND") and s.lot is not None and s.lot <= now:
            lot[1] -= 1
            lot[4] += 1

    def expire_due(self, now: Any) -> int:
        """The sweep: each lot past its time with credits available expires them; how many lots."""
        due = [
            b for lots in self.lots.values() for e, b in lots.items() if e is not None and e <= now and b[1]
        ]
        for b in due:
            b[4] += b[1]
            b[1] = 0
        return len(due)

    def forgives(self, booking: Booking, now: Any) -> bool:
        """Whether a charge of `booking` now is forgiven: only the sponsor's forgives, one in
        FORGIVENESS_PERIOD per client."""
        if booking.programme != 1:
            return False
        return not any(
            s.forgiven_at is not None and s.forgiven_at >= now - FORGIVENESS_PERIOD
            for s in self.sessions.values()
            if (s.client, s.programme) == (booking.client, 1)
        )


class Histories(RuleBasedStateMachine):
    server: RunningServer
    clock: FakeClock

    def __init__(self) -> None:
        super().__init__()
        run = uuid.uuid4().hex[:8]
        self.clients = [f"{run}-client-{n}" for n in range(3)]
        self.pros = [f"{run}-pro-{n}" for n in range(2)]
        self.programmes = ["default", f"sponsor-{run}"]
        self.kara = SessionsClient(f"127.0.0.1:{self.server.port}", timeout=15, retry=NO_RETRY)
        # Every history starts a year after the last one's time, so it sees nothing of it and a
        # replay of it meets the same clock.
        self.clock.set(self.clock.now() + timedelta(days=365))
        self.model = Model()
        # The last mutation that went through: how to send it again, and what it answered.
        self.last: tuple[Callable[[], Any], Any] | None = None
        self.last_grant: tuple[str, str] | None = None
        # Earlier histories' sponsored sessions nobody marked are all due a year on: settled now,
        # before this history's own feed begins.
        self.server.settler.run_once()
        # The history's own period, for its programmes' reports: after that settlement.
        self.clock.advance(timedelta(seconds=1))
        self.report_start = self.clock.now()
        # The feed as the history found it: the events after this cursor are the history's own.
        self.feed_start = self._feed_end("")

    def _feed_end(self, after: str) -> str:
        while page := self.kara.list_events(after=after, page_size=1000):
            after = page[-1].cursor
        return after

    def teardown(self) -> None:
        try:
            self.a_simulation_under_the_terms_in_force_is_the_report()
        finally:
            self.kara.close()

    # --- helpers ---

    def _did(self, call: Callable[[str], Any]) -> Any:
        request_id = str(uuid.uuid4())
        result = call(request_id)
        self.last = (lambda: call(request_id), result)
        self.model.changes += 1
        return result

    def _refused(self, call: Callable[[], Any], reason: str) -> None:
        before = db_snapshot(self.server)
        with pytest.raises(KaraError) as refused:
            call()
        assert refused.value.reason == reason, refused.value
        assert db_snapshot(self.server) == before, f"a refusal ({reason}) changed the database"

    # --- rules ---

    @initialize()
    def open_accounts(self) -> None:
        self.kara.create_programme(self.programmes[1], "Sponsor", WINDOW, **SPONSOR_TERMS)  # type: ignore[arg-type]
        self.model.changes += 1
        for client_id in self.clients:
            for programme, programme_id in enumerate(self.programmes):
                self.kara.grant_credits(client_id, 3, programme_id=programme_id)
                self.model.grant(client_id, programme, 3, None)
                self.model.changes += 1

    @rule(
        client=st.integers(0, 2),
        credits=st.integers(1, 3),
        reuse=st.integers(0, 4),
        programme=st.integers(0, 1),
        expires_in_days=st.sampled_from([0, 0, 1, 3]),
    )
    def grant(self, client: int, credits: int, reuse: int, programme: int, expires_in_days: int) -> None:
        """Credits that never expire (0), or that expire in a day or three."""
        if reuse == 0 and self.last_grant is not None:
            # The same request_id for another request: refused, changing nothing.
            reused_client, request_id = self.last_grant
            again = lambda: self.kara.grant_credits(reused_client, credits + 3, request_id=request_id)  # noqa: E731
            return self._refused(again, "REQUEST_ID_REUSED")
        client_id, programme_id = self.clients[client], self.programmes[programme]
        request_id = str(uuid.uuid4())
        expires = self.clock.now() + timedelta(days=expires_in_days) if expires_in_days else None

        def call() -> Any:
            return self.kara.grant_credits(
                client_id, credits, request_id=request_id, programme_id=programme_id, expires_at=expires
            )

        result = call()
        self.model.grant(client_id, programme, credits, expires)
        self.model.changes += 1
        self.last = (call, result)
        self.last_grant = (client_id, request_id)
        return None

    @rule(
        client=st.integers(0, 2), pro=st.integers(0, 1), hours=st.integers(2, 48), programme=st.integers(0, 1)
    )
    def book(self, client: int, pro: int, hours: int, programme: int) -> None:
        client_id, pro_id, programme_id = self.clients[client], self.pros[pro], self.programmes[programme]
        starts = self.clock.now() + timedelta(hours=hours)

        def call(r: str | None = None) -> Any:
            return self.kara.book(client_id, pro_id, starts, programme_id=programme_id, request_id=r)

        lot, refusal = self.model.pick(client_id, programme, starts, self.clock.now())
        if refusal is not None:
            return self._refused(call, refusal)
        session = self._did(call)
        booking = Booking(client_id, pro_id, starts, programme=programme, lot=lot)
        self.model.sessions[session.session_id] = booking
        self.model.move(booking, "HOLD", self.clock.now())
        return None

    def _pick(self, data: st.DataObject, fits: Callable[[Booking], bool]) -> str | None:
        """A session for an action: mostly one the action fits (so it goes through), otherwise
        any (so the refusals are exercised too). The draws have a fixed shape and the sessions
        are taken in booking order, never by id (ids differ between replays of one history),
        so a replay of the same draws is the same history."""
        prefer_fitting = data.draw(st.integers(0, 3), label="fit") > 0
        index = data.draw(st.integers(0, 10_000), label="session")
        fitting = [i for i, s in self.model.sessions.items() if fits(s)]
        pool = fitting if fitting and prefer_fitting else list(self.model.sessions)
        return pool[index % len(pool)] if pool else None

    @precondition(lambda self: self._any("BOOKED"))
    @rule(data=st.data(), by=st.sampled_from(["client", "professional"]), charge=st.booleans())
    def cancel(self, data: st.DataObject, by: str, charge: bool) -> None:
        session = self._pick(data, lambda s: s.state == "BOOKED" and s.starts > self.clock.now())
        if session is not None:
            self._cancel(session, by, charge)

    @precondition(
        lambda self: any(s.programme == 1 and s.state == "BOOKED" for s in self.model.sessions.values())
    )
    @rule(no_show=st.booleans())
    def charge_the_next_sponsored_session(self, no_show: bool) -> None:
        """Brings the clock to the sponsor's next booked session (an hour before it, or its
        start) and charges it: the professional's late cancellation with the box ticked, or a
        no-show. So the histories reach forgiveness, and its limit, often."""
        session, s = min(
            ((i, s) for i, s in self.model.sessions.items() if s.programme == 1 and s.state == "BOOKED"),
            key=lambda pair: pair[1].starts,
        )
        when = s.starts if no_show else s.starts - timedelta(hours=1)
        if when > self.clock.now():
            self.clock.set(when)
        if no_show:
            self._session_time_comes(session, no_show=True)
        else:
            self._cancel(session, "professional", True)

    def _cancel(self, session: str, by: str, charge: bool) -> None:
        s = self.model.sessions[session]
        call = lambda r=None: self.kara.cancel(session, by, charge_client=charge, request_id=r)  # noqa: E731
        notice = s.starts - self.clock.now()
        late = notice < WINDOW
        if by == "client" and charge:
            return self._refused(call, "CLIENT_CANNOT_CHARGE")
        if s.state != "BOOKED":
            return self._refused(call, "SESSION_NOT_BOOKED")
        if notice <= timedelta(0):
            return self._refused(call, "SESSION_ALREADY_STARTED")
        if charge and not late:
            return self._refused(call, "CHARGE_NOT_ALLOWED_WITH_NOTICE")
        if by == "client" and late and s.programme == 1:
            return self._refused(call, "LATE_CANCEL_CONTACT_PROFESSIONAL")
        preview = self.kara.preview(session, by, charge_client=charge)
        result = self._did(call)
        charged = late and (by == "client" or charge)
        forgiven = charged and self.model.forgives(s, self.clock.now())
        s.state = "CANCELLED_PAID" if charged and not forgiven else "CANCELLED_VOIDED"
        self.model.move(s, "TAKE" if s.state == "CANCELLED_PAID" else "RETURN", self.clock.now())
        s.forgiven_at = self.clock.now() if forgiven else None
        assert pb.SessionState.Name(result.session.state) == f"SESSION_STATE_{s.state}"
        assert result.session.cancellation.forgiven == forgiven
        assert (preview.session_state, preview.forgiven) == (result.session.state, forgiven)
        # The decision: the preview's is the one the change records, on the rule the model expects.
        assert preview.decision == result.session.decision == self.kara.get_session(session).decision
        if forgiven:
            rule = "LATE_CANCELLATION_FORGIVEN"
        elif by == "client":
            rule = "CLIENT_LATE" if late else "CLIENT_WITH_NOTICE"
        else:
            rule = (
                f"PROFESSIONAL_LATE_{'' if charge else 'NOT_'}CHARGED" if late else "PROFESSIONAL_WITH_NOTICE"
            )
        assert pb.DecisionRule.Name(result.session.decision.rule) == f"DECISION_RULE_{rule}"
        assert result.session.decision.notice.ToTimedelta() == notice
        return None

    @precondition(lambda self: self._any("BOOKED"))
    @rule(
        data=st.data(),
        by=st.sampled_from(["client", "professional"]),
        charge=st.booleans(),
        hours=st.integers(1, 72),
    )
    def reschedule(self, data: st.DataObject, by: str, charge: bool, hours: int) -> None:
        """Under either programme: 24 hours, a late move charged (CHARGE), no grace; the
        sponsor's allows two moves in place."""
        session = self._pick(data, lambda s: s.state == "BOOKED" and s.starts > self.clock.now())
        if session is not None:
            self._reschedule(session, by, charge, hours)

    @precondition(
        lambda self: any(s.programme == 1 and s.state == "BOOKED" for s in self.model.sessions.values())
    )
    @rule(by=st.sampled_from(["client", "professional"]), hours=st.integers(1, 72))
    def move_the_most_moved_sponsored_session(self, by: str, hours: int) -> None:
        """Moves again the sponsor's session moved most (the first booked among equals), so the
        histories reach its cap on moves."""
        booked = [(i, s) for i, s in self.model.sessions.items() if s.programme == 1 and s.state == "BOOKED"]
        session = max(booked, key=lambda pair: pair[1].moves)[0]
        self._reschedule(session, by, False, hours)

    def _reschedule(self, session: str, by: str, charge: bool, hours: int) -> None:
        s = self.model.sessions[session]
        to = self.clock.now() + timedelta(hours=hours, minutes=7)
        call = lambda r=None: self.kara.reschedule(session, to, by, charge_client=charge, request_id=r)  # noqa: E731
        notice = s.starts - self.clock.now()
        late = notice < WINDOW
        charged = late and (by == "client" or charge)
        if by == "client" and charge:
            return self._refused(call, "CLIENT_CANNOT_CHARGE")
        if s.state != "BOOKED":
            return self._refused(call, "SESSION_NOT_BOOKED")
        if to == s.starts:
            return self._refused(call, "STARTS_AT_UNCHANGED")
        if s.programme == 1 and s.moves >= SPONSOR_MOVES:
            return self._refused(call, "RESCHEDULE_LIMIT_REACHED")
        if notice <= timedelta(0):
            return self._refused(call, "SESSION_ALREADY_STARTED")
        if charge and not late:
            return self._refused(call, "CHARGE_NOT_ALLOWED_WITH_NOTICE")
        if not charged and s.lot is not None and to >= s.lot:
            return self._refused(call, "CREDITS_EXPIRE_BEFORE_SESSION")
        lot, refusal = self.model.pick(s.client, s.programme, to, self.clock.now())
        if charged and refusal is not None:
            return self._refused(call, refusal)
        preview = self.kara.preview_reschedule(session, to, by, charge_client=charge)
        result = self._did(call)
        assert result.HasField("charged") == charged
        decided = result.charged if charged else result.session
        assert preview.decision == decided.decision == self.kara.get_session(session).decision
        rule = "LATE_MOVE_CHARGED" if charged else "MOVED_IN_PLACE"
        assert pb.DecisionRule.Name(decided.decision.rule) == f"DECISION_RULE_{rule}"
        if charged:
            s.state = "CANCELLED_PAID"
            assert result.charged.session_id == session and result.session.rescheduled_from == session
            replacement = Booking(s.client, s.pro, to, programme=s.programme, lot=lot)
            self.model.sessions[result.session.session_id] = replacement
            self.model.move(replacement, "HOLD", self.clock.now())
            self.model.move(s, "TAKE", self.clock.now())
        else:
            assert result.session.session_id == session
            s.starts = to
            s.moves += 1
        return None

    def _unmarked_due(self) -> list[str]:
        """The sponsor's sessions nobody marked whose time to be settled has come, in the order
        the server settles them (start, then id)."""
        now = self.clock.now()
        due = [
            (s.starts, i)
            for i, s in self.model.sessions.items()
            if s.programme == 1 and s.state == "BOOKED" and s.starts + SETTLE_AFTER <= now
        ]
        return [i for _, i in sorted(due)]

    @precondition(
        lambda self: any(s.programme == 1 and s.state == "BOOKED" for s in self.model.sessions.values())
    )
    @rule()
    def the_server_settles_unmarked_sessions(self) -> None:
        """Nobody marks the sponsor's next session: the clock comes to its time to be settled,
        and the sweep runs."""
        first = min(
            s.starts for s in self.model.sessions.values() if s.programme == 1 and s.state == "BOOKED"
        )
        if first + SETTLE_AFTER > self.clock.now():
            self.clock.set(first + SETTLE_AFTER)
        self._sweep()

    @precondition(
        lambda self: any(
            at is not None and b[1] for lots in self.model.lots.values() for at, b in lots.items()
        )
    )
    @rule()
    def credits_expire(self) -> None:
        """The clock comes to the time of the next lot with credits still available, and the
        sweep runs."""
        first = min(
            at for lots in self.model.lots.values() for at, b in lots.items() if at is not None and b[1]
        )
        if first > self.clock.now():
            self.clock.set(first)
        self._sweep()

    def _sweep(self) -> None:
        """What every replica does every --settle-interval-seconds (here, when the history says):
        each unmarked session due becomes a no-show, forgiven as a charge is; then each lot past
        its time expires the credits it still has available."""
        now = self.clock.now()
        due = self._unmarked_due()
        for session_id in due:
            s = self.model.sessions[session_id]
            s.state, s.settled_automatically = "NO_SHOW", True
            if self.model.forgives(s, now):
                s.forgiven_at = now
            self.model.move(s, "RETURN" if s.forgiven_at is not None else "TAKE", now)
        expired = self.model.expire_due(now)
        assert self.server.settler.run_once() == {SETTLED_UNMARKED: len(due), EXPIRED_LOTS: expired}
        self.model.changes += len(due) + expired
        for session_id in due:
            session = self.kara.get_session(session_id)
            forgiven = self.model.sessions[session_id].forgiven_at is not None
            assert session.settled_automatically and session.no_show_forgiven == forgiven

    @rule(hours=st.integers(1, 8))
    def time_passes(self, hours: int) -> None:
        self.clock.advance(timedelta(hours=hours))

    @precondition(lambda self: self._any("BOOKED"))
    @rule(data=st.data(), no_show=st.booleans())
    def session_time_comes(self, data: st.DataObject, no_show: bool) -> None:
        """The session took place (CompleteSession) or the client did not come (MarkNoShow)."""
        session = self._pick(data, lambda s: s.state == "BOOKED" and s.starts <= self.clock.now())
        if session is not None:
            self._session_time_comes(session, no_show)

    def _session_time_comes(self, session: str, no_show: bool) -> None:
        s = self.model.sessions[session]
        call = (
            (lambda r=None: self.kara.mark_no_show(session, r))
            if no_show
            else (lambda r=None: self.kara.complete(session, r))
        )
        if s.state != "BOOKED":
            self._refused(call, "SESSION_NOT_BOOKED")
        elif self.clock.now() < s.starts:
            self._refused(call, "SESSION_NOT_STARTED")
        else:
            result = self._did(call)
            s.state = "NO_SHOW" if no_show else "COMPLETED"
            if no_show:
                if self.model.forgives(s, self.clock.now()):
                    s.forgiven_at = self.clock.now()
                assert result.session.no_show_forgiven == (s.forgiven_at is not None)
            self.model.move(s, "RETURN" if s.forgiven_at is not None else "TAKE", self.clock.now())

    def _any(self, *states: str) -> bool:
        return any(s.state in states for s in self.model.sessions.values())

    # Preconditions keep the draws on rules that can do something now (their refusals included).
    @precondition(lambda self: self._any("CANCELLED_PAID", "NO_SHOW"))
    @rule(data=st.data())
    def waive(self, data: st.DataObject) -> None:
        session = self._pick(data, lambda s: s.state in ("CANCELLED_PAID", "NO_SHOW") and not s.waived)
        if session is None:
            return None
        s = self.model.sessions[session]
        call = lambda r=None: self.kara.waive_charge(session, "goodwill", r)  # noqa: E731
        if s.state not in ("CANCELLED_PAID", "NO_SHOW") or s.waived or s.forgiven_at is not None:
            self._refused(call, "NOT_WAIVABLE")
        elif s.invoice:
            self._refused(call, "ON_INVOICE")
        else:
            self._did(call)
            s.waived = True
            self.model.move(s, "REFUND", self.clock.now())

    @precondition(lambda self: any(s.paid for s in self.model.sessions.values()))
    @rule(data=st.data(), other_pro=st.integers(0, 5))
    def invoice(self, data: st.DataObject, other_pro: int) -> None:
        session = self._pick(data, lambda s: s.paid and not s.invoice)
        if session is None:
            return None
        s = self.model.sessions[session]
        # Mostly the session's own professional; sometimes the other one (refused).
        pro_id = s.pro if other_pro else next(p for p in self.pros if p != s.pro)
        call = lambda r=None: self.kara.create_invoice(pro_id, [session], request_id=r)  # noqa: E731
        if s.pro != pro_id:
            return self._refused(call, "SESSION_OF_ANOTHER_PROFESSIONAL")
        if not s.paid:
            return self._refused(call, "SESSION_NOT_PAID")
        if s.invoice:
            return self._refused(call, "SESSION_ALREADY_INVOICED")
        created = self._did(call)
        s.invoice = created.invoice_id
        self.model.invoices[created.invoice_id] = [pro_id, "DRAFT"]
        return None

    def _invoice(self, data: st.DataObject, state: str) -> str | None:
        """An invoice, by a draw of fixed shape: mostly one in `state`, otherwise any."""
        prefer = data.draw(st.integers(0, 3), label="fit") > 0
        index = data.draw(st.integers(0, 10_000), label="invoice")
        fitting = [i for i, (_, st_) in self.model.invoices.items() if st_ == state]
        pool = fitting if fitting and prefer else list(self.model.invoices)
        return pool[index % len(pool)] if pool else None

    @precondition(lambda self: bool(self.model.invoices))
    @rule(data=st.data())
    def take_off(self, data: st.DataObject) -> None:
        invoice = self._invoice(data, "DRAFT")
        session = self._pick(data, lambda s: s.invoice == invoice)
        if invoice is None or session is None:
            return
        s = self.model.sessions[session]
        call = lambda r=None: self.kara.remove_from_invoice(invoice, [session], r)  # noqa: E731
        if self.model.invoices[invoice][1] != "DRAFT":
            self._refused(call, "INVOICE_NOT_DRAFT")
        elif s.invoice != invoice:
            self._refused(call, "SESSION_NOT_ON_INVOICE")
        else:
            self._did(call)
            s.invoice = ""

    @precondition(lambda self: bool(self.model.invoices))
    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        invoice = self._invoice(data, "DRAFT")
        if invoice is None:
            return
        call = lambda r=None: self.kara.submit_invoice(invoice, r)  # noqa: E731
        lines = [s for s in self.model.sessions.values() if s.invoice == invoice]
        if self.model.invoices[invoice][1] != "DRAFT":
            self._refused(call, "INVOICE_NOT_DRAFT")
        elif not lines:
            self._refused(call, "INVOICE_EMPTY")
        else:
            self._did(call)
            self.model.invoices[invoice][1] = "SUBMITTED"

    @rule()
    def retry_the_last_request(self) -> None:
        if self.last is None:
            return
        again, first = self.last
        before = db_snapshot(self.server)
        assert again() == first, "a replay must return the first answer"
        assert db_snapshot(self.server) == before, "a replay changed the database"

    # --- invariants, after every step ---

    @invariant()
    def credits_are_conserved(self) -> None:
        """Each account and each of its lots as the model has them: available + held + used +
        expired = granted; held = its booked sessions, used = its sessions whose credit is taken."""
        for (client_id, programme), lots in self.model.lots.items():
            mine = [
                s for s in self.model.sessions.values() if (s.client, s.programme) == (client_id, programme)
            ]
            account = self.kara.get_credit_account(client_id, programme_id=self.programmes[programme])
            balances = [lots[at] for at in sorted(lots, key=lambda at: (at is None, at))]
            assert [
                [lot.granted, lot.available, lot.held, lot.used, lot.expired] for lot in account.lots
            ] == balances
            totals = [sum(b[i] for b in balances) for i in range(5)]
            assert [account.available, account.held, account.used, account.expired] == totals[1:]
            assert account.held == sum(1 for s in mine if s.state == "BOOKED")
            assert account.used == sum(1 for s in mine if s.paid)

    def a_simulation_under_the_terms_in_force_is_the_report(self) -> None:
        """Each programme's history replayed under its own terms decides everything as it was
        decided (forgiveness, in time order, included), and the report's credits are the ledger's.
        Once a history ends (teardown): every step's would cost make test half a minute."""
        end = self.clock.now() + timedelta(seconds=1)
        for programme in self.programmes:
            # Both programmes' window: the terms in force, named.
            same = self.kara.simulate_terms(programme, self.report_start, end, notice_window=WINDOW)
            assert (same.decisions_changed.value, same.refused.value) == (0, 0)
            assert same.proposed == same.current
            with self.server.storage.bound(), self.server.unit_of_work(write=False):
                entries = list(
                    LedgerEntryRow.select().where(
                        LedgerEntryRow.programme_id == programme,
                        LedgerEntryRow.created_at >= self.report_start,
                    )
                )
            for count, kinds in (
                ("credits_granted", {"GRANT"}),
                ("credits_taken", {"TAKE"}),
                ("credits_returned", {"RETURN", "REFUND"}),
                ("credits_expired", {"EXPIRE"}),
            ):
                ledger = sum(e.credits for e in entries if e.kind in kinds)
                assert getattr(same.current, count).value == ledger, (programme, count)

    @invariant()
    def one_event_per_committed_change(self) -> None:
        events = 0
        after = self.feed_start
        while page := self.kara.list_events(after=after, page_size=1000):
            events += len(page)
            after = page[-1].cursor
        assert events == self.model.changes

    @invariant()
    def payments_follow_sessions(self) -> None:
        listed: dict[str, pb.Payment] = {}
        for pro_id in self.pros:
            for section in ("unpaid", "paid"):
                for payment in self.kara.list_payments(pro_id, section, page_size=1000).payments:
                    assert payment.session_id not in listed, "a session listed twice"
                    listed[payment.session_id] = payment
        assert set(listed) == set(self.model.sessions)
        for session_id, s in self.model.sessions.items():
            payment = listed[session_id]
            expected = "PENDING" if s.state == "BOOKED" else ("PAID" if s.paid else "VOIDED")
            assert pb.PaymentState.Name(payment.state) == f"PAYMENT_STATE_{expected}", (session_id, s)
            section = "PAID" if expected == "PAID" else "UNPAID"
            assert pb.PaymentSection.Name(payment.section) == f"PAYMENT_SECTION_{section}"
            assert payment.invoice_id == s.invoice
            # A move in place moves the Payments tab's row with it.
            assert payment.session_starts_at.ToDatetime().replace(tzinfo=s.starts.tzinfo) == s.starts
            assert payment.HasField("waiver") == s.waived
            assert payment.no_show_forgiven == (s.forgiven_at is not None and s.state == "NO_SHOW")


@pytest.fixture
def quiet_server(database_url: str, clock: FakeClock) -> Iterator[RunningServer]:
    """A server that prunes and settles nothing on its own while a history runs: each history
    moves the clock a year on, and a background prune or settlement between a refusal's two
    snapshots would look like a change."""
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=database_url,
        event_prune_seconds=24 * 3600,
        # The histories settle unmarked sessions when they say (the_server_settles_unmarked_sessions).
        settle_interval_seconds=3600,
    )
    running = start(settings, clock=clock)
    yield running
    running.stop(grace=1)


def test_generated_histories_keep_every_invariant(
    quiet_server: RunningServer, clock: FakeClock, request: pytest.FixtureRequest
) -> None:
    server = quiet_server
    # Behind PgBouncer the histories are the first half of PostgreSQL's own (they are
    # derandomized): what a pooler can break shows within them, and make test keeps its time.
    behind_a_pooler = request.node.callspec.params.get("database_url") == "pgbouncer"
    Histories.server = server
    Histories.clock = clock
    run_state_machine_as_test(
        Histories,
        settings=settings(
            max_examples=EXAMPLES // 2 if behind_a_pooler and not LONG_RUN else EXAMPLES,
            stateful_step_count=40,
            deadline=None,
            database=None,
            derandomize=not LONG_RUN,
            # make test reports a failing history as found; a long run also shrinks it.
            phases=list(Phase) if LONG_RUN else [Phase.explicit, Phase.reuse, Phase.generate],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    assert_ledger_balances(server)
