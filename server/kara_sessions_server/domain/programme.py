"""Programmes: who sponsors a credit, and on what terms (issue 13).

The article speaks of "the programme's terms and conditions": a Wellbeing Hub, an employer's or
an insurer's scheme. Programmes differ in their notice window, in whether a professional may
charge a late cancellation, and in whether a no-show takes the credit. A session is booked
against one programme's credit and keeps the terms in force when it was booked."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from typing import TypeVar

from kara_sessions_server.domain.errors import FieldViolation, InvalidRequest

V = TypeVar("V")

DEFAULT_PROGRAMME_ID = "default"
MIN_NOTICE_WINDOW = timedelta(hours=1)
MAX_NOTICE_WINDOW = timedelta(days=14)
MAX_DISPLAY_NAME = 200
MAX_CANCELLATION_GRACE = timedelta(hours=24)
MAX_RESCHEDULES = 50
MAX_FREE_LATE_CANCELLATIONS = 10
MIN_FORGIVENESS_PERIOD = timedelta(days=1)
MAX_FORGIVENESS_PERIOD = timedelta(days=730)
MIN_SETTLE_UNMARKED_AFTER = timedelta(hours=1)
MAX_SETTLE_UNMARKED_AFTER = timedelta(days=60)
_PROGRAMME_ID = re.compile(r"[a-z][a-z0-9-]{0,63}")


class LateReschedule(enum.StrEnum):
    """What a client's reschedule with less notice than the window does (issue 25)."""

    # The article's rule carried over: a late move is a late cancellation, and a new booking.
    CHARGE = "CHARGE"
    FREE = "FREE"
    REFUSED = "REFUSED"


class ClientLateCancel(enum.StrEnum):
    """What a client's own cancellation with less notice than the window does (issue 36)."""

    # The article's rule: cancelled, the credit taken.
    CHARGE = "CHARGE"
    # "Contact your professional to cancel": refused; the professional decides with the box.
    CONTACT_PROFESSIONAL = "CONTACT_PROFESSIONAL"


class UnmarkedOutcome(enum.StrEnum):
    """What the server makes of a session nobody marked once its terms' settle_unmarked_after has
    passed since its start (issue 36)."""

    # It took place: the credit taken, as CompleteSession does.
    COMPLETED = "COMPLETED"
    # The client did not come: as MarkNoShow does (no_show_takes_credit, and forgiveness).
    NO_SHOW = "NO_SHOW"


@dataclass(frozen=True, slots=True)
class Terms:
    """What a session was promised when it was booked."""

    notice_window: timedelta
    professional_may_charge_late: bool
    no_show_takes_credit: bool
    late_reschedule: LateReschedule = LateReschedule.CHARGE
    # A client's change this soon after booking counts as enough notice (0: the article's rule).
    cancellation_grace: timedelta = timedelta(0)
    client_late_cancel: ClientLateCancel = ClientLateCancel.CHARGE
    # Moves in place a session may have (0: no limit of the programme's; policy's cap holds).
    max_reschedules: int = 0
    # How many of a client's late cancellations and no-shows that would be charged are voided
    # instead, within `forgiveness_period` before the one being decided (0: the article's rule).
    free_late_cancellations: int = 0
    forgiveness_period: timedelta = timedelta(days=365)
    # A session still BOOKED this long after its start is settled by the server as
    # `unmarked_outcome` (0: never, the article's silence: it waits to be marked).
    settle_unmarked_after: timedelta = timedelta(0)
    unmarked_outcome: UnmarkedOutcome = UnmarkedOutcome.COMPLETED


# The article's terms: the Wellbeing Hubs programme, and every session booked before programmes.
DEFAULT_TERMS = Terms(
    notice_window=timedelta(hours=24), professional_may_charge_late=True, no_show_takes_credit=True
)


@dataclass(frozen=True, slots=True)
class ProgrammeChanges:
    """What UpdateProgramme changes: the fields that are not None."""

    display_name: str | None = None
    notice_window: timedelta | None = None
    professional_may_charge_late: bool | None = None
    no_show_takes_credit: bool | None = None
    late_reschedule: LateReschedule | None = None
    cancellation_grace: timedelta | None = None
    client_late_cancel: ClientLateCancel | None = None
    max_reschedules: int | None = None
    free_late_cancellations: int | None = None
    forgiveness_period: timedelta | None = None
    settle_unmarked_after: timedelta | None = None
    unmarked_outcome: UnmarkedOutcome | None = None


# The fields UpdateProgramme may change: the name and every term.
MUTABLE_FIELDS = tuple(f.name for f in fields(ProgrammeChanges))
if ("display_name", *(f.name for f in fields(Terms))) != MUTABLE_FIELDS:
    raise ImportError("ProgrammeChanges must name display_name and then every field of Terms, in order")


def _either(new: V | None, old: V) -> V:
    return old if new is None else new


@dataclass(frozen=True, slots=True)
class Programme:
    programme_id: str
    display_name: str
    terms: Terms
    created_at: datetime
    updated_at: datetime
    version: int = 1
    # Which version of its terms `terms` is: a new one whenever they change, never reused; a
    # session keeps the version it was booked under.
    terms_version: int = 1

    @property
    def etag(self) -> str:
        """The version as callers see it (AIP-154): opaque, so it may change form later."""
        return f"v{self.version}"

    def changed(self, changes: ProgrammeChanges, now: datetime) -> Programme:
        """The programme with `changes` applied, checked. Sessions already booked keep the terms
        they were booked under; only new bookings get these."""
        terms = self._terms_with(changes)
        display_name = _either(changes.display_name, self.display_name)
        check(self.programme_id, display_name, terms, id_field=None)
        terms_version = self.terms_version if terms == self.terms else self.terms_version + 1
        return replace(
            self,
            display_name=display_name,
            terms=terms,
            updated_at=now,
            version=self.version + 1,
            terms_version=terms_version,
        )

    def proposed(self, changes: ProgrammeChanges, *, named: str) -> Terms:
        """Its terms as `changes` would make them, checked as a change is, a violation naming
        the field `named`.FIELD (SimulateTerms': its request's `terms`)."""
        terms = self._terms_with(changes)
        check(self.programme_id, self.display_name, terms, id_field=None, named=named)
        return terms

    def _terms_with(self, changes: ProgrammeChanges) -> Terms:
        given = {name: getattr(changes, name) for name in MUTABLE_FIELDS[1:]}
        return replace(self.terms, **{name: value for name, value in given.items() if value is not None})


def check(
    programme_id: str,
    display_name: str,
    terms: Terms,
    *,
    id_field: str | None = "programme_id",
    named: str = "programme",
) -> None:
    """Refuses a malformed programme, naming every field at fault (`named`.FIELD)."""
    violations = []
    if id_field is not None and not _PROGRAMME_ID.fullmatch(programme_id):
        violations.append(
            (
                id_field,
                "must be 1-64 characters: lower-case letters, digits and hyphens, starting with a letter",
            )
        )
    if not display_name.strip() or len(display_name) > MAX_DISPLAY_NAME:
        violations.append((f"{named}.display_name", f"is required, at most {MAX_DISPLAY_NAME} characters"))
    if not MIN_NOTICE_WINDOW <= terms.notice_window <= MAX_NOTICE_WINDOW:
        violations.append((f"{named}.notice_window", "must be between 1 hour and 14 days"))
    if not timedelta(0) <= terms.cancellation_grace <= MAX_CANCELLATION_GRACE:
        violations.append((f"{named}.cancellation_grace", "must be between 0 and 24 hours"))
    if not 0 <= terms.max_reschedules <= MAX_RESCHEDULES:
        violations.append((f"{named}.max_reschedules", f"must be between 0 (no limit) and {MAX_RESCHEDULES}"))
    if not 0 <= terms.free_late_cancellations <= MAX_FREE_LATE_CANCELLATIONS:
        violations.append(
            (
                f"{named}.free_late_cancellations",
                f"must be between 0 (none forgiven) and {MAX_FREE_LATE_CANCELLATIONS}",
            )
        )
    if not MIN_FORGIVENESS_PERIOD <= terms.forgiveness_period <= MAX_FORGIVENESS_PERIOD:
        violations.append((f"{named}.forgiveness_period", "must be between 1 and 730 days"))
    settle = terms.settle_unmarked_after
    if settle and not MIN_SETTLE_UNMARKED_AFTER <= settle <= MAX_SETTLE_UNMARKED_AFTER:
        violations.append(
            (f"{named}.settle_unmarked_after", "must be 0 (never) or between 1 hour and 60 days")
        )
    if violations:
        raise InvalidRequest([FieldViolation(f, d) for f, d in violations])


@dataclass(frozen=True, slots=True)
class Forgiveness:
    """Where a client stands against their programme's free late cancellations when a charge is
    decided: how many the terms allow, and how many were forgiven within the period before."""

    allowed: int = 0
    used: int = 0

    @property
    def available(self) -> bool:
        """The next charge would be forgiven."""
        return self.used < self.allowed


# Terms that forgive nothing (the article's): nothing to count.
NONE_FORGIVEN = Forgiveness()


def default_programme(now: datetime, notice_window: timedelta = DEFAULT_TERMS.notice_window) -> Programme:
    return Programme(
        DEFAULT_PROGRAMME_ID,
        "Default programme",
        replace(DEFAULT_TERMS, notice_window=notice_window),
        created_at=now,
        updated_at=now,
    )
