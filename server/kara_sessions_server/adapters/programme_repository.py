"""Programmes and their terms. A programme changes by a conditional UPDATE on its version, so of
two concurrent updates exactly one goes through; the other is told to read it again."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from kara_sessions_server.adapters.storage import ProgrammeTermsRow, Sql, from_micros, to_micros
from kara_sessions_server.domain.errors import AlreadyExists, Conflict, NotFound
from kara_sessions_server.domain.model import Page
from kara_sessions_server.domain.programme import Programme, Terms
from kara_sessions_server.service_layer.pagination import cut, decode
from kara_sessions_server.service_layer.snapshots import TERMS_KEYS, terms_from, terms_values

# A version of terms is written once and never changed; its columns are the terms' own keys
# (snapshots.TERMS_KEYS, drawn from the Terms dataclass), so a new term needs no edit here.
_TERMS = ", ".join(TERMS_KEYS)
# A programme with its current terms: programmes points at a row of programme_terms.
_SELECT = (
    "SELECT p.programme_id, p.display_name, p.version, p.created_at, p.updated_at, p.terms_version, "
    + ", ".join(f"t.{key}" for key in TERMS_KEYS)
    + " FROM programmes p JOIN programme_terms t "
    "ON t.programme_id = p.programme_id AND t.terms_version = p.terms_version"
)
_GET = f"{_SELECT} WHERE p.programme_id = ?"
_INSERT = (
    "INSERT INTO programmes (programme_id, display_name, version, created_at, updated_at, terms_version) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (programme_id) DO NOTHING"
)
_CHANGE = (
    "UPDATE programmes SET display_name = ?, version = ?, updated_at = ?, terms_version = ? "
    "WHERE programme_id = ? AND version = ?"
)
_INSERT_TERMS = (
    f"INSERT INTO programme_terms (programme_id, terms_version, {_TERMS}, created_at) "
    f"VALUES ({', '.join('?' * (len(TERMS_KEYS) + 3))}) ON CONFLICT (programme_id, terms_version) DO NOTHING"
)
_GET_TERMS = f"SELECT {_TERMS} FROM programme_terms WHERE programme_id = ? AND terms_version = ?"
_UNSTORED = set(TERMS_KEYS) - set(ProgrammeTermsRow._meta.sorted_field_names)
if _UNSTORED:  # a term added to Terms and not to the table (nor to a migration)
    raise ImportError(f"programme_terms has no column for {sorted(_UNSTORED)}")


def _terms(row: Sequence[Any]) -> Terms:
    return terms_from(dict(zip(TERMS_KEYS, row, strict=True)))


def from_row(row: Sequence[Any]) -> Programme:
    """A row of _SELECT: the programme, then its current terms."""
    programme_id, name, version, created, updated, terms_version = row[:6]
    return Programme(
        programme_id=programme_id,
        display_name=name,
        terms=_terms(row[6:]),
        created_at=from_micros(created),
        updated_at=from_micros(updated),
        version=version,
        terms_version=terms_version,
    )


def row_values(p: Programme) -> tuple[object, ...]:
    """What _SELECT reads of `p`: its programmes row, then its terms' row."""
    own = (p.programme_id, p.display_name, p.version, to_micros(p.created_at), to_micros(p.updated_at))
    return (*own, p.terms_version, *terms_values(p.terms))


class TermsVersions:
    """Every version of terms this database holds, each read once: a version never changes, so
    what was read stays true (a version another process wrote is read when first asked for).
    One per Storage; the repositories that read sessions share it."""

    def __init__(self, sql: Sql):
        self._sql = sql
        self._known: dict[tuple[str, int], Terms] = {}

    def __call__(self, programme_id: str, version: int) -> Terms:
        found = self._known.get((programme_id, version))
        if found is None:
            row = self._sql(_GET_TERMS, (programme_id, version)).fetchone()
            if row is None:
                raise LookupError(f"programme {programme_id!r} has no terms version {version}")
            found = self._known[(programme_id, version)] = _terms(row)
        return found

    def add(self, programme_id: str, version: int, terms: Terms, at: datetime) -> None:
        self._sql(_INSERT_TERMS, (programme_id, version, *terms_values(terms), to_micros(at)))

    def seen(self, programme: Programme) -> Programme:
        """Remembers the terms a programme was read with (a booking reads its programme first,
        so the sessions it books are read back without another query). What is read is
        committed, or written by the same transaction: only the default programme's creation
        reads its own write, and if that does not commit the start fails and this map goes with
        its Storage, so no version is remembered that was never committed."""
        self._known.setdefault((programme.programme_id, programme.terms_version), programme.terms)
        return programme


class ProgrammeRepository:
    """Programmes, on one database."""

    def __init__(self, sql: Sql, terms: TermsVersions):
        self._sql = sql
        self._terms = terms

    def find(self, programme_id: str, *, for_change: bool = False) -> Programme | None:
        """`for_change`: the row stays locked until the transaction ends. SQLite needs no lock
        clause: its writing transactions run one at a time already."""
        lock = " FOR UPDATE OF p" if for_change and not self._sql.on_sqlite else ""
        row = self._sql(_GET + lock, (programme_id,)).fetchone()
        return None if row is None else self._terms.seen(from_row(row))

    def get(self, programme_id: str, *, for_change: bool = False) -> Programme:
        found = self.find(programme_id, for_change=for_change)
        if found is None:
            raise NotFound(
                f"programme {programme_id!r} does not exist (ListProgrammes shows them)",
                metadata={"programme_id": programme_id},
            )
        return found

    def add(self, programme: Programme) -> bool:
        """Inserts the programme and its terms; False if one with its id exists already."""
        if self._sql(_INSERT, row_values(programme)[:6]).rowcount != 1:
            return False
        p = programme
        self._terms.add(p.programme_id, p.terms_version, p.terms, p.created_at)
        return True

    def create(self, programme: Programme) -> None:
        if not self.add(programme):
            raise AlreadyExists(
                f"programme {programme.programme_id!r} already exists: choose another programme_id, or "
                "UpdateProgramme to change it",
                metadata={"programme_id": programme.programme_id},
            )

    def change(self, before: Programme, after: Programme) -> None:
        """The programme's row, guarded by its version; new terms are a new version of them."""
        changed = self._sql(
            _CHANGE,
            (
                after.display_name,
                before.version + 1,
                to_micros(after.updated_at),
                after.terms_version,
                before.programme_id,
                before.version,
            ),
        ).rowcount
        if changed != 1:
            raise Conflict(
                f"programme {before.programme_id!r} was changed by another request; read it again and retry",
                metadata={"programme_id": before.programme_id},
            )
        if after.terms_version != before.terms_version:
            self._terms.add(after.programme_id, after.terms_version, after.terms, after.updated_at)

    def page(self, size: int, token: str) -> Page[Programme]:
        """By programme_id."""
        query_id = ("programmes",)
        after = decode(query_id, token, (str,))
        if after is None:
            rows = self._sql(f"{_SELECT} ORDER BY p.programme_id LIMIT ?", (size + 1,))
        else:
            rows = self._sql(
                f"{_SELECT} WHERE p.programme_id > ? ORDER BY p.programme_id LIMIT ?",
                (after[0], size + 1),
            )
        page, token_out, resume = cut(query_id, rows.fetchall(), size, lambda r: [r[0]])
        return Page(tuple(from_row(r) for r in page), token_out, resume)
