"""Tallies: what happened, told to metrics after the transaction that did it commits (a
replayed request tells nothing: it changed nothing); the domain knows no subscriber. Not to be
confused with the event feed's events (domain/feed.py), which other services read: a tally
is counted and forgotten. (Nor with a party's notice, policy.Notice.) FeedAppended is the
tally of a feed event appended."""

from __future__ import annotations

from dataclasses import dataclass

from kara_sessions_server.domain.model import LedgerKind, Party, SessionState


@dataclass(frozen=True, slots=True)
class SessionCancelled:
    cancelled_by: Party
    late: bool
    state: SessionState


@dataclass(frozen=True, slots=True)
class SessionRescheduled:
    rescheduled_by: Party
    late: bool
    # Settled as a late cancellation and booked again, rather than moved in place.
    charged: bool


@dataclass(frozen=True, slots=True)
class CreditsMoved:
    kind: LedgerKind
    credits: int


@dataclass(frozen=True, slots=True)
class InvoiceChanged:
    """CREATE, ADD, REMOVE or SUBMIT, with the number of sessions it put on or took off."""

    action: str
    sessions: int


@dataclass(frozen=True, slots=True)
class FeedAppended:
    """An event went into the feed (counted per type)."""

    type: str


@dataclass(frozen=True, slots=True)
class NoShowMarked:
    charged: bool


@dataclass(frozen=True, slots=True)
class ChargeWaived:
    pass


@dataclass(frozen=True, slots=True)
class SettledAutomatically:
    """The server settled a session nobody marked: COMPLETED or NO_SHOW."""

    state: SessionState


Tally = (
    SessionCancelled
    | SessionRescheduled
    | CreditsMoved
    | InvoiceChanged
    | FeedAppended
    | NoShowMarked
    | ChargeWaived
    | SettledAutomatically
)
