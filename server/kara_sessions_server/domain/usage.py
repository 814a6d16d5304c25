"""What happened under a programme over a period (issue 37): the counts its sponsor may see, how
small counts are kept from a sponsor, and what other terms would have decided.

**Counting.** Each decided session counts once, in the month of its decision, by the outcome its
record shows (`recorded`): with notice, late and charged, late and not charged (the
professional's own, forgiven, or within the grace), a charged late move, completed, a no-show
charged or not. Credits taken and returned follow from the outcomes (one session, its credits),
a waiver returns its credits in the month it was waived, and grants and expiries are the
ledger's. Bookings count in the month they were made, a charge's waiver in its month.

**Small numbers, for sponsors.** A sponsor is promised totals, never who. A figure from 1 to k-1
(k is the server's --report-min-count) is given as 0, suppressed; every other figure is rounded
down to a multiple of k. A sponsor's period is whole calendar months (UTC), and each count is
the sum of its months' protected figures, each month protected on its own: so any period's
count is a sum of figures a sponsor could ask for month by month, and subtracting one period
from an overlapping one gives a sum of protected months, never a figure below k. Rounding is
what keeps the differences of a simulation (the same month under other terms) and of the
distinct clients of overlapping periods (not a sum of months) from being exact: two figures
that are multiples of k differ by a multiple of k. A trusted service sees exact figures over
any period.

**Replaying.** A simulation takes each recorded decision of the period (a cancellation, a move,
a no-show, a settlement) with what was asked (who, the notice, the charge box, how long after
booking) and decides it again under other terms, by the policy's own rules. A decision the
other terms would have refused (a client's late cancellation where the client must contact the
professional, a charge with notice or that the terms forbid, a move past the cap, a late move
the terms refuse, a settlement the terms would not make) counts as refused: what the client
would have done instead is unknowable, and the response says how many such there were. A
client's forgiveness is replayed in time order; before the period, what happened happened (the
forgiven charges recorded then count against the allowance)."""

from __future__ import annotations

import bisect
import enum
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from kara_sessions_server.domain.errors import FieldViolation, InvalidRequest
from kara_sessions_server.domain.model import Move, Party, PaymentState, Session, payment_state
from kara_sessions_server.domain.policy import MAX_MOVES_PER_SESSION, NoticePolicy
from kara_sessions_server.domain.programme import ClientLateCancel, LateReschedule, Terms, UnmarkedOutcome

# The longest period a report covers: two years, a leap day included.
MAX_PERIOD = timedelta(days=731)
MAX_MONTHS = 24


class Outcome(enum.Enum):
    """What a decision did with a session's credit, as a report counts it."""

    WITH_NOTICE = "cancelled_with_notice"
    LATE_CHARGED = "cancelled_late_charged"
    LATE_NOT_CHARGED = "cancelled_late_not_charged"
    LATE_MOVE_CHARGED = "late_moves_charged"
    COMPLETED = "sessions_completed"
    NO_SHOW_CHARGED = "no_shows_charged"
    NO_SHOW_NOT_CHARGED = "no_shows_not_charged"
    # A move in place: counted nowhere, its credit stays held.
    MOVED = "moved"
    # Replayed only: the other terms would have refused it.
    REFUSED = "refused"


_TAKES = frozenset(
    {Outcome.LATE_CHARGED, Outcome.LATE_MOVE_CHARGED, Outcome.COMPLETED, Outcome.NO_SHOW_CHARGED}
)
_RETURNS = frozenset({Outcome.WITH_NOTICE, Outcome.LATE_NOT_CHARGED, Outcome.NO_SHOW_NOT_CHARGED})
# A charge the terms' free late cancellations may forgive, and what it then becomes.
_FORGIVABLE = {
    Outcome.LATE_CHARGED: Outcome.LATE_NOT_CHARGED,
    Outcome.NO_SHOW_CHARGED: Outcome.NO_SHOW_NOT_CHARGED,
}


@dataclass(slots=True)
class Usage:
    """The counts of one period (or month) of a programme: ProgrammeUsage's, field for field."""

    sessions_booked: int = 0
    sessions_completed: int = 0
    cancelled_with_notice: int = 0
    cancelled_late_charged: int = 0
    cancelled_late_not_charged: int = 0
    no_shows_charged: int = 0
    no_shows_not_charged: int = 0
    charges_waived: int = 0
    late_moves_charged: int = 0
    sessions_settled_automatically: int = 0
    credits_granted: int = 0
    credits_taken: int = 0
    credits_returned: int = 0
    credits_expired: int = 0
    distinct_clients: int = 0

    def count(self, outcome: Outcome, n: int, credits: int) -> None:
        """`n` decisions with `outcome`, moving `credits` between them (both negative: taken back)."""
        if outcome.value in USAGE_FIELDS:
            setattr(self, outcome.value, getattr(self, outcome.value) + n)
        if outcome in _TAKES:
            self.credits_taken += credits
        elif outcome in _RETURNS:
            self.credits_returned += credits


USAGE_FIELDS = tuple(f.name for f in fields(Usage))


def recorded(state: str, rescheduled: bool, late: bool, within_grace: bool, charged: bool) -> Outcome | None:
    """The outcome a decided session's record shows (`charged`: its payment is PAID, or was until
    a waiver); None while it is booked."""
    if state in ("CANCELLED_PAID", "CANCELLED_VOIDED"):
        if rescheduled:
            return Outcome.LATE_MOVE_CHARGED
        if state == "CANCELLED_PAID":
            return Outcome.LATE_CHARGED
        return Outcome.LATE_NOT_CHARGED if late or within_grace else Outcome.WITH_NOTICE
    if state == "COMPLETED":
        return Outcome.COMPLETED
    if state == "NO_SHOW":
        return Outcome.NO_SHOW_CHARGED if charged else Outcome.NO_SHOW_NOT_CHARGED
    return None


# --- periods ------------------------------------------------------------------------------------


def months(start: datetime, end: datetime) -> list[datetime]:
    """The bounds of a sponsor's period, a month apart: [start, ..., end]. Refused unless both are
    the first instant of a month (UTC), start before end, at most MAX_MONTHS apart."""
    violations = [
        (name, "for a sponsor, must be the first instant of a month (UTC), e.g. 2026-01-01T00:00:00Z")
        for name, at in (("start_time", start), ("end_time", end))
        if at.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0) != at
    ]
    if violations:
        raise InvalidRequest([FieldViolation(f, d) for f, d in violations], reason="REPORT_PERIOD_NOT_MONTHS")
    bounds = [start.astimezone(UTC)]
    while bounds[-1] < end and len(bounds) <= MAX_MONTHS:
        at = bounds[-1]
        bounds.append(at.replace(year=at.year + at.month // 12, month=at.month % 12 + 1))
    if bounds[-1] != end:
        raise InvalidRequest.single(
            "end_time", f"a sponsor's period is at most {MAX_MONTHS} months", reason="REPORT_PERIOD_TOO_LONG"
        )
    return bounds


def check_period(start: datetime, end: datetime) -> None:
    """Refuses a period that is empty, backwards or longer than MAX_PERIOD."""
    if end <= start:
        raise InvalidRequest.single("end_time", "must be after start_time")
    if end - start > MAX_PERIOD:
        raise InvalidRequest.single(
            "end_time",
            f"a period is at most {MAX_PERIOD.days} days (two years)",
            reason="REPORT_PERIOD_TOO_LONG",
        )


# --- what a caller is shown ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Count:
    value: int
    suppressed: bool = False


def protect(value: int, k: int) -> Count:
    """`value` as shown to a caller who may see figures of at least `k` (1: exact)."""
    if k <= 1 or value == 0:
        return Count(value)
    if value < k:
        return Count(0, suppressed=True)
    return Count(value - value % k)


def total(per_month: Iterable[int], k: int) -> Count:
    """A count over months, each month protected on its own, summed."""
    shown = [protect(v, k) for v in per_month]
    return Count(sum(c.value for c in shown), any(c.suppressed for c in shown))


@dataclass(frozen=True, slots=True)
class Report:
    """A ProgrammeUsage: each count as the caller may see it, and the k it was protected with."""

    counts: dict[str, Count]
    min_count: int


def report(per_month: Sequence[Usage], distinct_clients: int, k: int) -> Report:
    counts = {name: total((getattr(m, name) for m in per_month), k) for name in USAGE_FIELDS}
    counts["distinct_clients"] = protect(distinct_clients, k)
    return Report(counts, k)


# --- replaying ----------------------------------------------------------------------------------


class Asked(enum.Enum):
    CANCEL = "cancel"
    MOVE = "move"
    NO_SHOW = "no_show"
    SETTLED = "settled"


class Decided(NamedTuple):
    """One recorded decision, as a simulation replays it (times in microseconds since the epoch,
    so a year of them is read without a datetime each)."""

    client_id: str
    at: int
    asked: Asked
    outcome: Outcome
    credits: int = 1
    by_client: bool = False
    notice: int = 0
    since_booking: int = 0
    charge_client: bool = False
    # A charge recorded as forgiven (a lookback's count).
    forgiven: bool = False
    # A move's: how many times the session had been moved in place before.
    moves_before: int = 0


class MoveRecord(NamedTuple):
    """What a move in place recorded that a replay reads (microseconds)."""

    moved_at: int
    by_client: bool
    notified_at: int
    notice: int


class Record(NamedTuple):
    """What a session's row records that a replay reads (microseconds; None where unset)."""

    client_id: str
    state: str
    booked_at: int
    credits: int
    cancelled_by: str | None
    # When its credit was decided: cancelled_at, completed_at or no_show_at.
    decided_at: int | None
    notified_at: int | None
    notice: int | None
    charge_client: bool | None
    late: bool | None
    within_grace: bool | None
    forgiven: bool | None
    no_show_forgiven: bool | None
    rescheduled: bool
    # Its payment is PAID, or was until a waiver.
    charged: bool
    settled: bool | None
    moves: tuple[MoveRecord, ...]


def record_of(session: Session) -> Record:
    """`session` as a replay reads it (what the SQL reads of its row)."""
    c = session.cancellation
    decided = c.cancelled_at if c else session.completed_at or session.no_show_at
    return Record(
        session.client_id,
        session.state.value,
        _at(session.booked_at),
        session.credits,
        c.cancelled_by.value if c else None,
        None if decided is None else _at(decided),
        _at(c.notified_at) if c else None,
        c.notice // _MICROSECOND if c else None,
        c.charge_client if c else None,
        c.late if c else None,
        c.within_grace if c else None,
        c.forgiven if c else None,
        session.no_show_forgiven,
        bool(session.rescheduled_to),
        payment_state(session) is PaymentState.PAID or session.waiver is not None,
        session.settled_automatically,
        move_records(session.moves),
    )


def move_records(moves: Iterable[Move]) -> tuple[MoveRecord, ...]:
    """A session's moves in place as a replay reads them."""
    return tuple(
        MoveRecord(_at(m.moved_at), m.moved_by is Party.CLIENT, _at(m.notified_at), m.notice // _MICROSECOND)
        for m in moves
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _at(value: datetime) -> int:
    return (value - _EPOCH) // _MICROSECOND


def decided(records: Iterable[Record], start: datetime, end: datetime) -> list[Decided]:
    """The decisions `records` recorded in [start, end) that a simulation replays."""
    found: list[Decided] = []
    span = (_at(start), _at(end))
    for r in records:
        decided_of(r, *span, found)
    return found


def decided_of(r: Record, start: int, end: int, found: list[Decided]) -> None:
    """Adds to `found` the decisions `r` recorded in [start, end) that a simulation replays: its
    moves in place, and the cancellation, charged move, no-show or settlement that decided it (a
    completion a person marked is what it is, under any terms)."""
    for i, m in enumerate(r.moves):
        if start <= m.moved_at < end:
            since = m.notified_at - r.booked_at
            found.append(
                Decided(
                    r.client_id,
                    m.moved_at,
                    Asked.MOVE,
                    Outcome.MOVED,
                    r.credits,
                    m.by_client,
                    m.notice,
                    since,
                    moves_before=i,
                )
            )
    at = r.decided_at
    if at is None or not start <= at < end:
        return
    if r.state in ("CANCELLED_PAID", "CANCELLED_VOIDED") and r.cancelled_by is not None:
        asked = Asked.MOVE if r.rescheduled else Asked.CANCEL
    elif r.state == "NO_SHOW":
        asked = Asked.SETTLED if r.settled else Asked.NO_SHOW
    elif r.state == "COMPLETED" and r.settled:
        asked = Asked.SETTLED
    else:
        return
    outcome = recorded(r.state, r.rescheduled, bool(r.late), bool(r.within_grace), r.charged)
    assert outcome is not None
    found.append(
        Decided(
            r.client_id,
            at,
            asked,
            outcome,
            r.credits,
            r.cancelled_by == "CLIENT",
            r.notice or 0,
            (r.notified_at - r.booked_at) if r.notified_at is not None else 0,
            bool(r.charge_client),
            bool(r.forgiven or r.no_show_forgiven),
            len(r.moves),
        )
    )


@dataclass
class Simulation:
    """The period's usage month by month under the terms it was decided under and under others."""

    current: list[Usage]
    proposed: list[Usage]
    changed: list[int]
    refused: list[int]


def replay(d: Decided, terms: Terms) -> Outcome:
    """What `terms` decide of what `d` asked, before any forgiveness."""
    if d.asked is Asked.NO_SHOW:
        return Outcome.NO_SHOW_CHARGED if terms.no_show_takes_credit else Outcome.NO_SHOW_NOT_CHARGED
    if d.asked is Asked.SETTLED:
        if not terms.settle_unmarked_after:
            return Outcome.REFUSED
        if terms.unmarked_outcome is UnmarkedOutcome.COMPLETED:
            return Outcome.COMPLETED
        return Outcome.NO_SHOW_CHARGED if terms.no_show_takes_credit else Outcome.NO_SHOW_NOT_CHARGED
    party = Party.CLIENT if d.by_client else Party.PROFESSIONAL
    notice, since = timedelta(microseconds=d.notice), timedelta(microseconds=d.since_booking)
    late, grace = NoticePolicy.measure(party, notice, since, terms)
    if d.charge_client and (not late or not terms.professional_may_charge_late):
        return Outcome.REFUSED
    if d.asked is Asked.MOVE:
        cap = terms.max_reschedules or MAX_MOVES_PER_SESSION
        refused = d.by_client and late and terms.late_reschedule is LateReschedule.REFUSED
        if d.moves_before >= cap or refused:
            return Outcome.REFUSED
        charged = NoticePolicy.move_charged(party, d.charge_client, late, terms.late_reschedule)
        return Outcome.LATE_MOVE_CHARGED if charged else Outcome.MOVED
    if d.by_client and late and terms.client_late_cancel is ClientLateCancel.CONTACT_PROFESSIONAL:
        return Outcome.REFUSED
    if NoticePolicy.client_pays(party, d.charge_client, late):
        return Outcome.LATE_CHARGED
    return Outcome.LATE_NOT_CHARGED if late or grace else Outcome.WITH_NOTICE


@dataclass
class _Forgiveness:
    """Each client's forgiven charges, oldest first, as a replay in time order meets them."""

    allowed: int
    period: int
    times: dict[str, deque[int]] = field(default_factory=lambda: defaultdict(deque))

    def forgives(self, client_id: str, at: int) -> bool:
        if not self.allowed:
            return False
        times = self.times[client_id]
        since = at - self.period
        while times and times[0] < since:
            times.popleft()
        if len(times) >= self.allowed:
            return False
        times.append(at)
        return True


def simulate(
    current: list[Usage],
    lookback: Iterable[Decided],
    decided: Iterable[Decided],
    bounds: Sequence[datetime],
    terms: Terms,
) -> Simulation:
    """`current` (one Usage per month of `bounds`) with every decision of `decided` replayed under
    `terms`, in time order; `lookback`: the forgiven charges recorded before the period."""
    proposed = [replace(u) for u in current]
    changed, refused = [0] * len(current), [0] * len(current)
    forgiveness = _Forgiveness(terms.free_late_cancellations, terms.forgiveness_period // _MICROSECOND)
    for d in sorted(lookback, key=_in_order):
        if d.forgiven:
            forgiveness.times[d.client_id].append(d.at)
    starts = [_at(b) for b in bounds[1:-1]]
    for d in sorted(decided, key=_in_order):
        outcome = replay(d, terms)
        if outcome in _FORGIVABLE and forgiveness.forgives(d.client_id, d.at):
            outcome = _FORGIVABLE[outcome]
        if outcome is d.outcome:
            continue
        month = bisect.bisect_right(starts, d.at)
        changed[month] += 1
        usage = proposed[month]
        usage.count(d.outcome, -1, -d.credits)
        usage.count(outcome, 1, d.credits)
        if outcome is Outcome.REFUSED:
            refused[month] += 1
            if d.asked is Asked.SETTLED:
                usage.sessions_settled_automatically -= 1
    return Simulation(current, proposed, changed, refused)


def _in_order(d: Decided) -> tuple[int, bool]:
    """The order the decisions were made in: by time, and of two at the same instant a forgiven
    one first (the allowance was left for it, so it came first)."""
    return d.at, not d.forgiven
