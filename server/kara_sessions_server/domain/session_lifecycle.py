"""A session's lifecycle as a `transitions` state machine.

The Machine is built once at import; each loaded session is attached for one event and
detached afterwards (machines.attached). `prepare` (the policy's assessment of the notice) and
the guards `client_pays` and `has_started` are where the article's table lives; docs/lifecycle.md
draws TRANSITIONS as the server runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from transitions import EventData, MachineError

from kara_sessions_server.domain.errors import SessionNotBooked, SessionNotStarted
from kara_sessions_server.domain.machines import Lifecycle, attached, shared_machine
from kara_sessions_server.domain.model import (
    CREDIT_MOVE_FOR_STATE,
    PAYMENT_FOR_STATE,
    Cancellation,
    CancellationOutcome,
    CancelSession,
    Session,
    SessionState,
)
from kara_sessions_server.domain.policy import CancellationPolicy, Notice

_S = SessionState

TRANSITIONS: list[dict[str, Any]] = [
    # Order matters: the first transition whose guards pass wins.
    {"trigger": "cancel", "source": _S.BOOKED, "dest": _S.CANCELLED_PAID, "conditions": ["client_pays"]},
    {"trigger": "cancel", "source": _S.BOOKED, "dest": _S.CANCELLED_VOIDED},
    {"trigger": "complete", "source": _S.BOOKED, "dest": _S.COMPLETED, "conditions": ["has_started"]},
]


class _SessionModel:
    """The object `transitions` drives: one session plus the inputs of the event in flight."""

    def __init__(self, session: Session, policy: CancellationPolicy, now: datetime):
        self.state: str = session.state.value
        self.session = session
        self.policy = policy
        self.now = now
        self.notice: Notice | None = None

    # machine-level prepare_event: runs once per event, after the source state is accepted
    def prepare(self, event: EventData) -> None:
        """On cancel: the policy measures the notice (starts_at - notified_at, notified_at
        defaulting to now) and refuses a client ticking the charge box or recording notice,
        notice recorded in the future or before the booking, a cancellation after the start
        without earlier notice, and the charge box ticked with enough notice (the programme's
        terms)."""
        if event.event.name == "cancel":
            command: CancelSession = event.kwargs["command"]
            self.notice = self.policy.assess(self.session, command, self.now)

    def client_pays(self, event: EventData) -> bool:
        """Late (notice < the window), and either the client cancelled (automatic) or the
        professional ticked "Charge the client for this session"."""
        command: CancelSession = event.kwargs["command"]
        assert self.notice is not None
        return self.policy.client_pays(command.cancelled_by, command.charge_client, self.notice.late)

    def has_started(self, event: EventData) -> bool:
        """The session's start time has come."""
        return self.now >= self.session.starts_at


SESSION_LIFECYCLE = Lifecycle(
    "Session", SessionState, SessionState.BOOKED, TRANSITIONS, _SessionModel, prepare_event="prepare"
)
_MACHINE = shared_machine(SESSION_LIFECYCLE)


@dataclass(frozen=True, slots=True)
class SessionLifecycle:
    policy: CancellationPolicy

    def cancel(self, session: Session, command: CancelSession, now: datetime) -> CancellationOutcome:
        """Decides a cancellation; raises a DomainError if the policy or the state refuses it."""
        model = self._fire(session, now, "cancel", command=command)
        assert model.notice is not None
        new_state = SessionState(model.state)
        cancellation = Cancellation(
            cancelled_by=command.cancelled_by,
            cancelled_at=now,
            notified_at=model.notice.notified_at,
            notice=model.notice.notice,
            late=model.notice.late,
            charge_client=command.charge_client,
            reason=command.reason,
        )
        return CancellationOutcome(
            session_state=new_state,
            payment_state=PAYMENT_FOR_STATE[new_state],
            cancellation=cancellation,
            credit_move=CREDIT_MOVE_FOR_STATE[new_state],
        )

    def complete(self, session: Session, now: datetime) -> Session:
        model = self._fire(session, now, "complete")
        if SessionState(model.state) is not SessionState.COMPLETED:
            raise SessionNotStarted(
                f"session {session.session_id} starts at {session.starts_at.isoformat()}; "
                "it can be completed only once it has started",
                metadata={"session_id": session.session_id, "starts_at": session.starts_at.isoformat()},
            )
        return replace(session, state=SessionState.COMPLETED, completed_at=now, updated_at=now)

    def _fire(self, session: Session, now: datetime, trigger: str, **kwargs: Any) -> _SessionModel:
        model = _SessionModel(session, self.policy, now)
        with attached(_MACHINE, model, session.state.value):
            try:
                getattr(model, trigger)(**kwargs)
            except MachineError as exc:
                raise SessionNotBooked(
                    f"session {session.session_id} is {session.state.value}, not BOOKED; only a booked "
                    f"session can be {'cancelled' if trigger == 'cancel' else 'completed'}",
                    metadata={"session_id": session.session_id, "state": session.state.value},
                ) from exc
        return model
