"""The sponsored-credit cancellation policy (help-centre article), as pure functions.

The window and whether a professional may charge are the session's programme's terms as they
were when it was booked (programme.py); the article's are the default programme's.

| who cancels  | notice          | charge box    | outcome                       |
|--------------|-----------------|---------------|-------------------------------|
| client       | >= window       | (not theirs)  | VOIDED: credit returned       |
| professional | >= window       | must be clear | VOIDED: credit returned       |
| client       | <  window       | (automatic)   | PAID: credit taken            |
| professional | <  window       | ticked        | PAID: credit taken            |
| professional | <  window       | clear         | VOIDED: credit returned       |
| professional | <  window       | ticked, but the programme forbids it: refused      |
| client       | <  window       | (not theirs)  | refused where the terms'      |
|              |                 |               | client_late_cancel is         |
|              |                 |               | CONTACT_PROFESSIONAL          |

The article speaks of "more than" and "less than" 24 hours and leaves exactly 24 hours open;
we resolve it in the client's favour: notice >= window is enough notice.

A client's cancellation or move within the terms' `cancellation_grace` after booking counts as
enough notice whatever the notice (issue 25: a session booked 2 hours ahead and cancelled a
minute later is not charged).

Moving a session (RescheduleSession) follows the same principle, notice measured against its
current start:

| who          | notice    | charge box | outcome                                              |
|--------------|-----------|------------|------------------------------------------------------|
| either       | >= window | clear      | moved in place, credit stays held                    |
| professional | >= window | ticked     | refused (CHARGE_NOT_ALLOWED_WITH_NOTICE)             |
| professional | <  window | clear      | moved in place (their own late move)                 |
| professional | <  window | ticked     | charged; refused where the programme forbids it      |
| client       | <  window | (not theirs) | the terms' late_reschedule: CHARGE, FREE or REFUSED |

A session moved in place as often as its terms' max_reschedules (when not 0), or
MAX_MOVES_PER_SESSION, refuses another move (RESCHEDULE_LIMIT_REACHED).

Charged: the session is settled as a late cancellation (credit taken) and a new one is booked
at the new time on a new credit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from kara_sessions_server.domain.decisions import DecisionRule, refused
from kara_sessions_server.domain.errors import (
    ChargeNotAllowedByProgramme,
    ChargeNotAllowedWithNotice,
    DomainError,
    InvalidRequest,
    LateCancelContactProfessional,
    LateRescheduleNotAllowed,
    RescheduleLimitReached,
    SessionAlreadyStarted,
)
from kara_sessions_server.domain.model import CancelSession, Party, RescheduleSession, Session
from kara_sessions_server.domain.programme import ClientLateCancel, LateReschedule, Terms

# A session's moves in place are kept with it (each up to a 1,000-character reason), so they are
# capped: every record, and so every event and response, fits in a message (issue 33).
MAX_MOVES_PER_SESSION = 20


@dataclass(frozen=True, slots=True)
class Notice:
    """How much notice a cancellation or a move gave, and whether that was enough."""

    notified_at: datetime
    notice: timedelta
    late: bool
    # Less notice than the window, but a client's change within the grace after booking.
    within_grace: bool = False


@dataclass(frozen=True, slots=True)
class _Asked:
    """What the policy reads of a cancellation or a reschedule: who, the box, when notified."""

    party: Party
    charge_client: bool
    notified_at: datetime | None
    # "cancel" or "move", for messages.
    verb: str

    @classmethod
    def of(cls, command: CancelSession | RescheduleSession) -> _Asked:
        if isinstance(command, CancelSession):
            return cls(command.cancelled_by, command.charge_client, command.notified_at, "cancel")
        return cls(command.rescheduled_by, command.charge_client, command.notified_at, "move")


@dataclass(frozen=True, slots=True)
class NoticePolicy:
    """The article's rule about notice, for a cancellation and a move alike: how much was
    given, whether it was enough, and who then pays."""

    def validate_request(self, command: CancelSession | RescheduleSession, now: datetime) -> None:
        """Rules that need no session: checked before anything is loaded."""
        asked = _Asked.of(command)
        if asked.party is Party.CLIENT and asked.charge_client:
            raise InvalidRequest.single(
                "charge_client",
                f"only the professional can charge the client; a client's late {asked.verb} is "
                "charged automatically where the programme's terms say so",
                reason="CLIENT_CANNOT_CHARGE",
            )
        if isinstance(command, RescheduleSession) and command.new_starts_at <= now:
            raise InvalidRequest.single(
                "new_starts_at",
                f"must be in the future (server time is {now.isoformat()})",
                reason="STARTS_AT_NOT_IN_FUTURE",
            )
        if asked.notified_at is None:
            return
        if asked.party is not Party.PROFESSIONAL:
            raise InvalidRequest.single(
                "notified_at",
                "only a professional may record when notice was given; omit it to use the current time",
                reason="NOTIFIED_AT_NOT_ALLOWED",
            )
        if asked.notified_at > now:
            raise InvalidRequest.single(
                "notified_at",
                f"notice cannot be given in the future ({asked.notified_at.isoformat()} is after "
                f"the server's time {now.isoformat()})",
                reason="NOTIFIED_AT_IN_FUTURE",
            )

    def assess(self, session: Session, command: CancelSession | RescheduleSession, now: datetime) -> Notice:
        """The notice a cancellation or a move of `session` gives; raises if the policy refuses
        it (a client's late move under terms that refuse one included)."""
        self.validate_request(command, now)
        asked = _Asked.of(command)
        if isinstance(command, RescheduleSession) and command.new_starts_at == session.starts_at:
            raise InvalidRequest.single(
                "new_starts_at",
                f"is the session's current start ({session.starts_at.isoformat()}): give the new one",
                reason="STARTS_AT_UNCHANGED",
            )
        if isinstance(command, RescheduleSession) and len(session.moves) >= MAX_MOVES_PER_SESSION:
            raise _refusal(
                RescheduleLimitReached(
                    f"session {session.session_id} has been moved {len(session.moves)} times, as often as "
                    f"a session may be ({MAX_MOVES_PER_SESSION}): cancel it and book the new time instead",
                    metadata={"session_id": session.session_id, "moves": str(len(session.moves))},
                ),
                DecisionRule.REFUSED_RESCHEDULE_LIMIT,
                session,
                None,
                False,
            )
        cap = session.terms.max_reschedules
        if isinstance(command, RescheduleSession) and cap and len(session.moves) >= cap:
            raise _refusal(
                RescheduleLimitReached(
                    f"session {session.session_id} has been moved {len(session.moves)} times, as often as "
                    f"programme {session.programme_id!r} allows ({cap}): cancel it and book the new time "
                    "instead",
                    metadata={
                        "session_id": session.session_id,
                        "programme_id": session.programme_id,
                        "moves": str(len(session.moves)),
                        "max_reschedules": str(cap),
                    },
                ),
                DecisionRule.REFUSED_RESCHEDULE_LIMIT,
                session,
                None,
                False,
            )
        notified_at = asked.notified_at or now
        if notified_at < session.booked_at:
            raise InvalidRequest.single(
                "notified_at",
                f"notice cannot predate the booking ({session.booked_at.isoformat()})",
                reason="NOTIFIED_AT_BEFORE_BOOKING",
            )
        if notified_at >= session.starts_at:
            raise SessionAlreadyStarted(
                f"session {session.session_id} started at {session.starts_at.isoformat()}; "
                f"it can be {'cancelled' if asked.verb == 'cancel' else 'moved'} after its start "
                "only if notice was given before it started (set notified_at)",
                metadata={"session_id": session.session_id, "starts_at": session.starts_at.isoformat()},
            )
        terms = session.terms
        window = terms.notice_window
        notice = session.starts_at - notified_at
        late, within_grace = self.measure(asked.party, notice, notified_at - session.booked_at, terms)
        if asked.charge_client and not late:
            raise _refusal(
                ChargeNotAllowedWithNotice(
                    f"the client gave {_hours(notice)} of notice (at least {_hours(window)}); under the "
                    f"terms of programme {session.programme_id!r} they must not be charged: clear "
                    "charge_client",
                    metadata=_notice_metadata(session, notice, window),
                ),
                DecisionRule.REFUSED_CHARGE_WITH_NOTICE,
                session,
                notice,
                within_grace,
            )
        if asked.charge_client and not terms.professional_may_charge_late:
            raise _refusal(
                ChargeNotAllowedByProgramme(
                    f"programme {session.programme_id!r} does not let a professional charge a late "
                    f"{'cancellation' if asked.verb == 'cancel' else 'move'}: clear charge_client "
                    "(the credit goes back to the client)",
                    metadata={"session_id": session.session_id, "programme_id": session.programme_id},
                ),
                DecisionRule.REFUSED_CHARGE_NOT_ALLOWED,
                session,
                notice,
                within_grace,
            )
        contact = terms.client_late_cancel is ClientLateCancel.CONTACT_PROFESSIONAL
        if asked.verb == "cancel" and late and asked.party is Party.CLIENT and contact:
            raise _refusal(
                LateCancelContactProfessional(
                    f"the client gave {_hours(notice)} of notice (less than {_hours(window)}) and "
                    f"programme {session.programme_id!r} asks a client to contact their professional to "
                    "cancel this late: the professional can cancel it, and decides whether it is charged",
                    metadata=_notice_metadata(session, notice, window),
                ),
                DecisionRule.REFUSED_CONTACT_PROFESSIONAL,
                session,
                notice,
                within_grace,
            )
        refused = terms.late_reschedule is LateReschedule.REFUSED
        if asked.verb == "move" and late and asked.party is Party.CLIENT and refused:
            raise _refusal(
                LateRescheduleNotAllowed(
                    f"the client gave {_hours(notice)} of notice (less than {_hours(window)}) and "
                    f"programme {session.programme_id!r} does not let a client move a session that "
                    "late; the session may still be cancelled",
                    metadata=_notice_metadata(session, notice, window),
                ),
                DecisionRule.REFUSED_LATE_MOVE,
                session,
                notice,
                within_grace,
            )
        return Notice(notified_at=notified_at, notice=notice, late=late, within_grace=within_grace)

    @staticmethod
    def measure(party: Party, notice: timedelta, since_booking: timedelta, terms: Terms) -> tuple[bool, bool]:
        """(late, within_grace) of a change by `party` giving `notice`, `since_booking` after the
        booking, under `terms`: less notice than the window is late, unless it is the client's
        within the terms' cancellation_grace after booking."""
        # The grace is the client's: a professional's own late change is free already.
        within_grace = (
            notice < terms.notice_window
            and party is Party.CLIENT
            and terms.cancellation_grace > timedelta(0)
            and since_booking <= terms.cancellation_grace
        )
        return notice < terms.notice_window and not within_grace, within_grace

    @staticmethod
    def client_pays(cancelled_by: Party, charge_client: bool, late: bool) -> bool:
        """Whether a cancellation takes the credit: only when late, and then automatically for
        the client's own cancellation or at the professional's discretion."""
        return late and (cancelled_by is Party.CLIENT or charge_client)

    @staticmethod
    def move_charged(moved_by: Party, charge_client: bool, late: bool, rule: LateReschedule) -> bool:
        """Whether a move is charged: only when late, and then for the client's own move where
        the terms say CHARGE (FREE moves it; REFUSED was refused by `assess`) or at the
        professional's discretion."""
        if not late:
            return False
        return rule is LateReschedule.CHARGE if moved_by is Party.CLIENT else charge_client


def _refusal(
    error: DomainError, rule: DecisionRule, session: Session, notice: timedelta | None, grace: bool
) -> DomainError:
    """`error`, carrying the decision behind it (its message is the decision's sentence)."""
    return error.decided(refused(rule, session, notice, grace, error.message))


def _notice_metadata(session: Session, notice: timedelta, window: timedelta) -> dict[str, str]:
    """What a refusal about notice tells a program: whose session, and the notice against the window."""
    return {
        "session_id": session.session_id,
        "programme_id": session.programme_id,
        "notice_seconds": str(int(notice.total_seconds())),
        "notice_window_seconds": str(int(window.total_seconds())),
    }


def _hours(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:.2f} h"
