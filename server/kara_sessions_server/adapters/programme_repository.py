"""Programmes and their terms. A programme changes by a conditional UPDATE on its version, so of
two concurrent updates exactly one goes through; the other is told to read it again."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kara_sessions_server.adapters.storage import Sql, from_micros, to_micros
from kara_sessions_server.domain.clock import MICROSECOND
from kara_sessions_server.domain.errors import AlreadyExists, Conflict, NotFound
from kara_sessions_server.domain.model import Page
from kara_sessions_server.domain.programme import LateReschedule, Programme, Terms
from kara_sessions_server.service_layer.pagination import cut, decode

_COLUMNS = (
    "programme_id, display_name, notice_window, professional_may_charge_late, no_show_takes_credit, "
    "version, created_at, updated_at, late_reschedule, cancellation_grace"
)
_GET = f"SELECT {_COLUMNS} FROM programmes WHERE programme_id = ?"
_INSERT = (
    f"INSERT INTO programmes ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (programme_id) DO NOTHING"
)
_CHANGE = (
    "UPDATE programmes SET display_name = ?, notice_window = ?, professional_may_charge_late = ?, "
    "no_show_takes_credit = ?, version = ?, updated_at = ?, late_reschedule = ?, cancellation_grace = ? "
    "WHERE programme_id = ? AND version = ?"
)


def from_row(row: Sequence[Any]) -> Programme:
    programme_id, name, window, may_charge, no_show, version, created, updated, late, grace = row
    return Programme(
        programme_id=programme_id,
        display_name=name,
        terms=Terms(
            MICROSECOND * window,
            bool(may_charge),
            bool(no_show),
            LateReschedule(late),
            MICROSECOND * grace,
        ),
        created_at=from_micros(created),
        updated_at=from_micros(updated),
        version=version,
    )


def row_values(p: Programme) -> tuple[object, ...]:
    t = p.terms
    return (
        p.programme_id,
        p.display_name,
        t.notice_window // MICROSECOND,
        t.professional_may_charge_late,
        t.no_show_takes_credit,
        p.version,
        to_micros(p.created_at),
        to_micros(p.updated_at),
        t.late_reschedule.value,
        t.cancellation_grace // MICROSECOND,
    )


class ProgrammeRepository:
    """Programmes, on one database."""

    def __init__(self, sql: Sql):
        self._sql = sql

    def find(self, programme_id: str, *, for_change: bool = False) -> Programme | None:
        """`for_change`: the row stays locked until the transaction ends. SQLite needs no lock
        clause: its writing transactions run one at a time already."""
        lock = " FOR UPDATE" if for_change and not self._sql.on_sqlite else ""
        row = self._sql(_GET + lock, (programme_id,)).fetchone()
        return None if row is None else from_row(row)

    def get(self, programme_id: str, *, for_change: bool = False) -> Programme:
        found = self.find(programme_id, for_change=for_change)
        if found is None:
            raise NotFound(
                f"programme {programme_id!r} does not exist (ListProgrammes shows them)",
                metadata={"programme_id": programme_id},
            )
        return found

    def add(self, programme: Programme) -> bool:
        """Inserts the programme; False if one with its id exists already."""
        return bool(self._sql(_INSERT, row_values(programme)).rowcount == 1)

    def create(self, programme: Programme) -> None:
        if not self.add(programme):
            raise AlreadyExists(
                f"programme {programme.programme_id!r} already exists: choose another programme_id, or "
                "UpdateProgramme to change it",
                metadata={"programme_id": programme.programme_id},
            )

    def change(self, before: Programme, after: Programme) -> None:
        t = after.terms
        changed = self._sql(
            _CHANGE,
            (
                after.display_name,
                t.notice_window // MICROSECOND,
                t.professional_may_charge_late,
                t.no_show_takes_credit,
                before.version + 1,
                to_micros(after.updated_at),
                t.late_reschedule.value,
                t.cancellation_grace // MICROSECOND,
                before.programme_id,
                before.version,
            ),
        ).rowcount
        if changed != 1:
            raise Conflict(
                f"programme {before.programme_id!r} was changed by another request; read it again and retry",
                metadata={"programme_id": before.programme_id},
            )

    def page(self, size: int, token: str) -> Page[Programme]:
        """By programme_id."""
        query_id = ("programmes",)
        after = decode(query_id, token, (str,))
        if after is None:
            rows = self._sql(f"SELECT {_COLUMNS} FROM programmes ORDER BY programme_id LIMIT ?", (size + 1,))
        else:
            rows = self._sql(
                f"SELECT {_COLUMNS} FROM programmes WHERE programme_id > ? ORDER BY programme_id LIMIT ?",
                (after[0], size + 1),
            )
        page, token_out, resume = cut(query_id, rows.fetchall(), size, lambda r: [r[0]])
        return Page(tuple(from_row(r) for r in page), token_out, resume)
