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

The article speaks of "more than" and "less than" 24 hours and leaves exactly 24 hours open;
we resolve it in the client's favour: notice >= window is enough notice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from kara_sessions_server.domain.errors import (
    ChargeNotAllowedByProgramme,
    ChargeNotAllowedWithNotice,
    InvalidRequest,
    SessionAlreadyStarted,
)
from kara_sessions_server.domain.model import CancelSession, Party, Session


@dataclass(frozen=True, slots=True)
class Notice:
    """How much notice a cancellation gave, and whether that was enough."""

    notified_at: datetime
    notice: timedelta
    late: bool


@dataclass(frozen=True, slots=True)
class CancellationPolicy:
    def validate_request(self, command: CancelSession, now: datetime) -> None:
        """Rules that need no session: checked before anything is loaded."""
        if command.cancelled_by is Party.CLIENT and command.charge_client:
            raise InvalidRequest.single(
                "charge_client",
                "only the professional can charge the client; a client's late cancellation is "
                "charged automatically",
                reason="CLIENT_CANNOT_CHARGE",
            )
        if command.notified_at is None:
            return
        if command.cancelled_by is not Party.PROFESSIONAL:
            raise InvalidRequest.single(
                "notified_at",
                "only a professional may record when notice was given; omit it to use the current time",
                reason="NOTIFIED_AT_NOT_ALLOWED",
            )
        if command.notified_at > now:
            raise InvalidRequest.single(
                "notified_at",
                f"notice cannot be given in the future ({command.notified_at.isoformat()} is after "
                f"the server's time {now.isoformat()})",
                reason="NOTIFIED_AT_IN_FUTURE",
            )

    def assess(self, session: Session, command: CancelSession, now: datetime) -> Notice:
        """The notice a cancellation of `session` gives; raises if the policy refuses it."""
        self.validate_request(command, now)
        notified_at = command.notified_at or now
        if notified_at < session.booked_at:
            raise InvalidRequest.single(
                "notified_at",
                f"notice cannot predate the booking ({session.booked_at.isoformat()})",
                reason="NOTIFIED_AT_BEFORE_BOOKING",
            )
        if notified_at >= session.starts_at:
            raise SessionAlreadyStarted(
                f"session {session.session_id} started at {session.starts_at.isoformat()}; "
                "it can be cancelled after its start only if notice was given before it started "
                "(set notified_at)",
                metadata={"session_id": session.session_id, "starts_at": session.starts_at.isoformat()},
            )
        window = session.terms.notice_window
        notice = session.starts_at - notified_at
        late = notice < window
        if command.charge_client and not late:
            raise ChargeNotAllowedWithNotice(
                f"the client gave {_hours(notice)} of notice (at least {_hours(window)}); under the terms "
                f"of programme {session.programme_id!r} they must not be charged: clear charge_client",
                metadata={
                    "session_id": session.session_id,
                    "programme_id": session.programme_id,
                    "notice_seconds": str(int(notice.total_seconds())),
                    "notice_window_seconds": str(int(window.total_seconds())),
                },
            )
        if command.charge_client and not session.terms.professional_may_charge_late:
            raise ChargeNotAllowedByProgramme(
                f"programme {session.programme_id!r} does not let a professional charge a late "
                "cancellation: clear charge_client (the credit goes back to the client)",
                metadata={"session_id": session.session_id, "programme_id": session.programme_id},
            )
        return Notice(notified_at=notified_at, notice=notice, late=late)

    @staticmethod
    def client_pays(cancelled_by: Party, charge_client: bool, late: bool) -> bool:
        """Whether a cancellation takes the credit: only when late, and then automatically for
        the client's own cancellation or at the professional's discretion."""
        return late and (cancelled_by is Party.CLIENT or charge_client)


def _hours(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:.2f} h"
