"""A programme's report (domain/usage.py) on SQLite and PostgreSQL: what happened under it in a
period, counted by the database in one pass over the programme's sessions, grouped by what
decides each count (so a million sessions come back as a few hundred rows), and the recorded
decisions a simulation replays."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from kara_sessions_server.adapters.session_repository import S_SESSION_COLUMNS, TermsOf, session_from_row
from kara_sessions_server.adapters.storage import Sql, to_micros
from kara_sessions_server.domain.usage import Decided, Usage, decided_of, recorded

# When a session's credit was decided: its cancellation, completion or no-show.
_DECIDED_AT = "COALESCE(s.cancelled_at, s.completed_at, s.no_show_at)"


def _month_of(column: str, bounds_us: Sequence[int]) -> str:
    """Which period of `bounds_us` `column` falls in, -1 for none (NULL included). The bounds are
    integers this module computed, so they are written into the statement, not bound."""
    whens = " ".join(f"WHEN {column} < {b} THEN {i - 1}" for i, b in enumerate(bounds_us))
    return f"CASE {whens} ELSE -1 END"


def _in(column: str) -> str:
    return f"({column} >= ? AND {column} < ?)"


class ReportRepository:
    def __init__(self, sql: Sql, terms: TermsOf):
        self._sql = sql
        self._terms = terms

    def usage(self, programme_id: str, bounds: Sequence[datetime]) -> list[Usage]:
        us = [to_micros(b) for b in bounds]
        per_month = [Usage() for _ in us[1:]]
        span = (us[0], us[-1])
        sessions = (
            f"SELECT {_month_of('s.booked_at', us)}, {_month_of(_DECIDED_AT, us)}, "
            f"{_month_of('s.waived_at', us)}, s.state, s.rescheduled_to IS NOT NULL, s.late, "
            "s.within_grace, (s.payment_section = 'PAID' OR s.waived_at IS NOT NULL), "
            "s.settled_automatically, COUNT(*), SUM(s.credits) FROM sessions s WHERE s.programme_id = ? "
            f"AND ({_in('s.booked_at')} OR {_in(_DECIDED_AT)} OR {_in('s.waived_at')}) "
            "GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9"
        )
        rows = self._sql(sessions, (programme_id, *span, *span, *span)).fetchall()
        for booked, decided, waived, state, moved, late, grace, charged, settled, n, credits in rows:
            if booked >= 0:
                per_month[booked].sessions_booked += n
            outcome = recorded(state, bool(moved), bool(late), bool(grace), bool(charged))
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

    def decided(
        self, programme_id: str, start: datetime, end: datetime, *, forgiven_only: bool = False
    ) -> list[Decided]:
        span = (to_micros(start), to_micros(end))
        if forgiven_only:
            where = f"(s.forgiven OR s.no_show_forgiven) AND {_in(_DECIDED_AT)}"
            params: tuple[object, ...] = (programme_id, *span)
        else:
            # Moves in place are read with their session: any that holds moves may have one then.
            where = (
                f"(({_in(_DECIDED_AT)} AND NOT (s.state = 'COMPLETED' AND s.settled_automatically IS NULL)) "
                "OR s.moves IS NOT NULL)"
            )
            params = (programme_id, *span)
        text = f"SELECT {S_SESSION_COLUMNS} FROM sessions s WHERE s.programme_id = ? AND {where}"
        found: list[Decided] = []
        for row in self._sql(text, params).fetchall():
            found += decided_of(session_from_row(row, self._terms), start, end)
        return found
