"""A programme's report (domain/usage.py) on SQLite and PostgreSQL: what happened under it in a
period, counted by the database in one pass over the programme's sessions, grouped by what
decides each count (so a million sessions come back as a few hundred rows), and the recorded
decisions a simulation replays."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from kara_sessions_server.adapters.session_repository import load_moves
from kara_sessions_server.adapters.storage import Sql, to_micros
from kara_sessions_server.domain.usage import Record, Usage, move_records, recorded

# When a session's credit was decided: its cancellation, completion or no-show.
_DECIDED_AT = "COALESCE(s.cancelled_at, s.completed_at, s.no_show_at)"


def _month_of(column: str, bounds_us: Sequence[int]) -> str:
    """Which period of `bounds_us` `column` falls in, -1 for none (NULL included). The bounds are
    integers this module computed, so they are written into the statement, not bound."""
    whens = " ".join(f"WHEN {column} < {b} THEN {i - 1}" for i, b in enumerate(bounds_us))
    return f"CASE {whens} ELSE -1 END"


# What decides each count of a session, packed into one integer the database groups by: the
# months of its booking, decision and waiver, its state, and five facts. (Grouped by the nine
# columns, SQLite sorted a million rows' records for 5 s; by one integer, 2 s.)
_STATES = ("BOOKED", "CANCELLED_VOIDED", "CANCELLED_PAID", "COMPLETED", "NO_SHOW")
_FACTS = (
    "s.rescheduled_to IS NOT NULL",
    "s.late",
    "s.within_grace",
    "s.payment_section = 'PAID' OR s.waived_at IS NOT NULL",
    "s.settled_automatically",
)
# A month index (-1: none) + 1 fits in 5 bits: at most 24 months.
_MONTH_BITS = 5


def _key(bounds_us: Sequence[int]) -> str:
    months = [_month_of(c, bounds_us) for c in ("s.booked_at", _DECIDED_AT, "s.waived_at")]
    packed = "0"
    for month in months:
        packed = f"(({packed}) * {1 << _MONTH_BITS} + ({month}) + 1)"
    states = " ".join(f"WHEN '{state}' THEN {i}" for i, state in enumerate(_STATES))
    packed = f"({packed} * 8 + CASE s.state {states} END)"
    for fact in _FACTS:
        packed = f"({packed} * 2 + CASE WHEN {fact} THEN 1 ELSE 0 END)"
    return packed


def _unpack(key: int) -> tuple[int, int, int, str, bool, bool, bool, bool, bool]:
    """_KEY's integer back: (booked, decided, waived months, state, then the five facts)."""
    facts = []
    for _ in _FACTS:
        key, bit = divmod(key, 2)
        facts.append(bool(bit))
    key, state = divmod(key, 8)
    months = []
    for _ in range(3):
        key, month = divmod(key, 1 << _MONTH_BITS)
        months.append(month - 1)
    booked, decided, waived = reversed(months)
    moved, late, grace, charged, settled = reversed(facts)
    return booked, decided, waived, _STATES[state], moved, late, grace, charged, settled


def _in(column: str) -> str:
    return f"({column} >= ? AND {column} < ?)"


class ReportRepository:
    def __init__(self, sql: Sql):
        self._sql = sql

    def usage(self, programme_id: str, bounds: Sequence[datetime]) -> list[Usage]:
        us = [to_micros(b) for b in bounds]
        per_month = [Usage() for _ in us[1:]]
        span = (us[0], us[-1])
        sessions = (
            f"SELECT {_key(us)}, COUNT(*), SUM(s.credits) FROM sessions s WHERE s.programme_id = ? "
            f"AND ({_in('s.booked_at')} OR {_in(_DECIDED_AT)} OR {_in('s.waived_at')}) GROUP BY 1"
        )
        for key, n, credits in self._sql(sessions, (programme_id, *span, *span, *span)).fetchall():
            booked, decided, waived, state, moved, late, grace, charged, settled = _unpack(key)
            if booked >= 0:
                per_month[booked].sessions_booked += n
            outcome = recorded(state, moved, late, grace, charged)
            if decided >= 0 and outcome is not None:
                per_month[decided].count(outcome, n, credits)
                if settled:
                    per_month[decided].sessions_settled_automatically += n
            if waived >= 0:
                per_month[waived].charges_waived += n
                per_month[waived].credits_returned += credits
        # The same words as the partial index's WHERE, so both databases read through it.
        ledger = (
            f"SELECT {_month_of('created_at', us)}, kind, SUM(credits) FROM ledger_entries "
            "WHERE programme_id = ? AND kind IN ('GRANT', 'EXPIRE') AND created_at >= ? AND created_at < ? "
            "GROUP BY 1, 2"
        )
        for month, kind, credits in self._sql(ledger, (programme_id, *span)).fetchall():
            if kind == "GRANT":
                per_month[month].credits_granted += credits
            else:
                per_month[month].credits_expired += credits
        return per_month

    def distinct_clients(self, programme_id: str, start: datetime, end: datetime) -> int:
        text = (
            "SELECT COUNT(DISTINCT client_id) FROM sessions "
            "WHERE programme_id = ? AND booked_at >= ? AND booked_at < ?"
        )
        return int(self._sql(text, (programme_id, to_micros(start), to_micros(end))).fetchone()[0])

    def records(
        self, programme_id: str, start: datetime, end: datetime, *, forgiven_only: bool = False
    ) -> list[Record]:
        span = (to_micros(start), to_micros(end))
        if forgiven_only:
            where = f"(s.forgiven OR s.no_show_forgiven) AND {_in(_DECIDED_AT)}"
        else:
            # Moves in place are read with their session: any that holds moves may have one then.
            where = (
                f"(({_in(_DECIDED_AT)} AND NOT (s.state = 'COMPLETED' AND s.settled_automatically IS NULL)) "
                "OR s.moves IS NOT NULL)"
            )
        text = (
            f"SELECT s.client_id, s.state, s.booked_at, s.credits, s.cancelled_by, {_DECIDED_AT}, "
            "s.notified_at, s.notice_us, s.charge_client, s.late, s.within_grace, s.forgiven, "
            "s.no_show_forgiven, s.rescheduled_to IS NOT NULL, "
            "(s.payment_section = 'PAID' OR s.waived_at IS NOT NULL), s.settled_automatically, s.moves "
            f"FROM sessions s WHERE s.programme_id = ? AND {where}"
        )
        return [
            Record._make((*row[:-1], move_records(load_moves(row[-1]))))
            for row in self._sql(text, (programme_id, *span)).fetchall()
        ]
