"""A session's lifecycle as a `transitions` state machine.

The Machine is built once at import; each event is fired on a model of the loaded session
(machines.fire). `prepare` (the policy's assessment of the notice) and
the guards `client_pays` and `has_started` are where the article's table lives; docs/lifecycle.md
draws TRANSITIONS as the server runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from transitions import EventData

from kara_sessions_server.domain.decisions import decision_of
from kara_sessions_server.domain.errors import (
    Conflict,
    CreditsExpireBeforeSession,
    NotWaivable,
    OnInvoice,
    PreconditionFailed,
    SessionNotBooked,
    SessionNotStarted,
)
from kara_sessions_server.domain.machines import Lifecycle, fire, shared_machine
from kara_sessions_server.domain.model import (
    Cancellation,
    CancellationOutcome,
    CancelSession,
    LedgerKind,
    Move,
    PaymentState,
    RescheduleOutcome,
    RescheduleSession,
    Session,
    SessionState,
    SessionStep,
    Waiver,
    changed,
    credit_move,
    payment_state,
)
from kara_sessions_server.domain.policy import Notice, NoticePolicy
from kara_sessions_server.domain.programme import NONE_FORGIVEN, Forgiveness, UnmarkedOutcome

_S = SessionState
_DONE = {
    "cancel": "cancelled",
    "reschedule": "rescheduled",
    "complete": "completed",
    "no_show": "marked as a no-show",
    "waive": "waived",
}

TRANSITIONS: list[dict[str, Any]] = [
    # Order matters: the first transition whose guards pass wins.
    {
        "trigger": "cancel",
        "source": _S.BOOKED,
        "dest": _S.CANCELLED_PAID,
        "conditions": ["client_pays"],
        "unless": ["forgiven"],
    },
    {"trigger": "cancel", "source": _S.BOOKED, "dest": _S.CANCELLED_VOIDED},
    # A charged move settles the session as a late cancellation; a new one is booked in its place.
    {"trigger": "reschedule", "source": _S.BOOKED, "dest": _S.CANCELLED_PAID, "conditions": ["move_charged"]},
    # Internal: moved in place, still BOOKED, the credit stays held.
    {"trigger": "reschedule", "source": _S.BOOKED, "dest": None},
    {"trigger": "complete", "source": _S.BOOKED, "dest": _S.COMPLETED, "conditions": ["has_started"]},
    {"trigger": "no_show", "source": _S.BOOKED, "dest": _S.NO_SHOW, "conditions": ["has_started"]},
    # Internal: the state stays; the payment becomes VOIDED and the credit goes back.
    {
        "trigger": "waive",
        "source": [_S.CANCELLED_PAID, _S.NO_SHOW],
        "dest": None,
        "conditions": ["credit_taken", "on_no_invoice"],
    },
]


class _SessionModel:
    """The object `transitions` drives: one session plus the inputs of the event in flight."""

    def __init__(self, session: Session, policy: NoticePolicy, now: datetime):
        self.state: str = session.state.value
        self.session = session
        self.policy = policy
        self.now = now
        self.notice: Notice | None = None
        # Whether the event fired a transition (transitions returns False when no guard passed).
        self.fired = False

    # machine-level prepare_event: runs once per event, after the source state is accepted
    def prepare(self, event: EventData) -> None:
        """On cancel and reschedule: the policy measures the notice (the current starts_at -
        notified_at, notified_at defaulting to now; a client's change within the terms'
        cancellation_grace after booking has enough notice) and refuses a client ticking the
        charge box or recording notice, notice recorded in the future or before the booking, a
        change after the start without earlier notice, the charge box ticked with enough notice
        or under terms that forbid it, a move to the current start, and a client's late move
        under terms whose late_reschedule is REFUSED."""
        if event.event.name in ("cancel", "reschedule"):
            command: CancelSession | RescheduleSession = event.kwargs["command"]
            self.notice = self.policy.assess(self.session, command, self.now)

    def client_pays(self, event: EventData) -> bool:
        """Late (notice < the window), and either the client cancelled (automatic) or the
        professional ticked "Charge the client for this session"."""
        command: CancelSession = event.kwargs["command"]
        assert self.notice is not None
        return self.policy.client_pays(command.cancelled_by, command.charge_client, self.notice.late)

    def forgiven(self, event: EventData) -> bool:
        """The client has a free late cancellation left: fewer of their late cancellations and
        no-shows under this programme were forgiven within its forgiveness_period before now
        than its free_late_cancellations (0 by default: none is forgiven)."""
        forgiveness: Forgiveness = event.kwargs["forgiveness"]
        return forgiveness.available

    def move_charged(self, event: EventData) -> bool:
        """Late (notice < the window, outside a client's grace after booking), and either the
        professional ticked "Charge the client for this session" or the client moved under terms
        whose late_reschedule is CHARGE (REFUSED was refused by `prepare`; FREE moves it)."""
        command: RescheduleSession = event.kwargs["command"]
        assert self.notice is not None
        return self.policy.move_charged(
            command.rescheduled_by,
            command.charge_client,
            self.notice.late,
            self.session.terms.late_reschedule,
        )

    def has_started(self, event: EventData) -> bool:
        """The session's start time has come."""
        return self.now >= self.session.starts_at

    def credit_taken(self, event: EventData) -> bool:
        """The payment is PAID: the credit was taken (by a late cancellation, or a no-show its
        terms charge) and not already waived."""
        return payment_state(self.session) is PaymentState.PAID

    def on_no_invoice(self, event: EventData) -> bool:
        """The session is on no invoice (a draft's line must be removed first; a submitted
        invoice is final)."""
        return not event.kwargs["invoice_id"]


SESSION_LIFECYCLE = Lifecycle(
    "Session", SessionState, SessionState.BOOKED, TRANSITIONS, _SessionModel, prepare_event="prepare"
)
_MACHINE = shared_machine(SESSION_LIFECYCLE)


@dataclass(frozen=True, slots=True)
class SessionLifecycle:
    policy: NoticePolicy

    def cancel(
        self,
        session: Session,
        command: CancelSession,
        now: datetime,
        forgiveness: Forgiveness = NONE_FORGIVEN,
    ) -> CancellationOutcome:
        """Decides a cancellation, with where the client stands against the programme's free
        late cancellations; raises a DomainError if the policy or the state refuses it."""
        model = self._fire(session, now, "cancel", command=command, forgiveness=forgiveness)
        assert model.notice is not None
        new_state = SessionState(model.state)
        would_pay = self.policy.client_pays(command.cancelled_by, command.charge_client, model.notice.late)
        cancellation = Cancellation(
            cancelled_by=command.cancelled_by,
            cancelled_at=now,
            notified_at=model.notice.notified_at,
            notice=model.notice.notice,
            late=model.notice.late,
            charge_client=command.charge_client,
            reason=command.reason,
            within_grace=model.notice.within_grace,
            forgiven=would_pay and new_state is SessionState.CANCELLED_VOIDED,
        )
        move = credit_move(new_state, session.terms)
        assert move is not None
        after = changed(
            session, now, state=new_state, cancellation=cancellation, forgiveness_used=forgiveness.used
        )
        return CancellationOutcome(
            session_state=new_state,
            payment_state=PaymentState.PAID if move is LedgerKind.TAKE else PaymentState.VOIDED,
            cancellation=cancellation,
            credit_move=move,
            after=after,
            forgiveness=forgiveness,
        )

    def reschedule(self, session: Session, command: RescheduleSession, now: datetime) -> RescheduleOutcome:
        """Decides a move; raises a DomainError if the policy or the state refuses it."""
        model = self._fire(session, now, "reschedule", command=command)
        notice = model.notice
        assert notice is not None
        new_state = SessionState(model.state)
        charged = new_state is not SessionState.BOOKED
        expires = session.credit_expires_at
        if not charged and expires is not None and command.new_starts_at >= expires:
            # Moved in place, it would keep a credit that is no longer valid at its new start.
            raise CreditsExpireBeforeSession(
                f"session {session.session_id} holds a credit that expires at {expires.isoformat()}, "
                f"before its new start {command.new_starts_at.isoformat()}: cancel it and book the new "
                "time with a credit valid then",
                metadata={
                    "session_id": session.session_id,
                    "credit_expire_time": expires.isoformat(),
                },
            )
        move = Move(
            moved_at=now,
            from_starts_at=session.starts_at,
            to_starts_at=command.new_starts_at,
            moved_by=command.rescheduled_by,
            notified_at=notice.notified_at,
            notice=notice.notice,
            late=notice.late,
            within_grace=notice.within_grace,
            reason=command.reason,
        )
        if not charged:
            return RescheduleOutcome(new_state, move, None, decision_of(moved(session, move, now)))
        cancellation = Cancellation(
            cancelled_by=command.rescheduled_by,
            cancelled_at=now,
            notified_at=notice.notified_at,
            notice=notice.notice,
            late=True,
            charge_client=command.charge_client,
            reason=command.reason,
        )
        # The new session's id is made when it is booked; the decision does not depend on it.
        settled = changed(session, now, state=new_state, cancellation=cancellation, rescheduled_to="(new)")
        return RescheduleOutcome(new_state, move, cancellation, decision_of(settled))

    def complete(self, session: Session, now: datetime) -> SessionStep:
        """The session took place: the state the table gives it, and what that does with the credit."""
        state = self._started(session, now, "complete", "completed")
        return _settled(changed(session, now, state=state, completed_at=now))

    def no_show(
        self, session: Session, now: datetime, forgiveness: Forgiveness = NONE_FORGIVEN
    ) -> SessionStep:
        """The client did not come: the state the table gives it, and what its terms do with the
        held credit (a charge the client has a free late cancellation left for is forgiven)."""
        state = self._started(session, now, "no_show", "marked as a no-show")
        forgiven = session.terms.no_show_takes_credit and forgiveness.available
        after = changed(
            session,
            now,
            state=state,
            no_show_at=now,
            no_show_forgiven=forgiven,
            forgiveness_used=forgiveness.used,
        )
        return _settled(after)

    def settle_unmarked(
        self, session: Session, now: datetime, forgiveness: Forgiveness = NONE_FORGIVEN
    ) -> SessionStep:
        """The server settles a session nobody marked, its terms' settle_unmarked_after past its
        start, as their unmarked_outcome says: the very transition CompleteSession or MarkNoShow
        takes, so it is refused only as they would be (not BOOKED: someone marked it first)."""
        after = session.terms.settle_unmarked_after
        if not after or now < session.starts_at + after:
            raise ValueError(f"session {session.session_id} is not due to be settled")
        if session.terms.unmarked_outcome is UnmarkedOutcome.NO_SHOW:
            step = self.no_show(session, now, forgiveness)
        else:
            step = self.complete(session, now)
        return SessionStep(replace(step.after, settled_automatically=True), step.credit_move)

    def waive(
        self, session: Session, invoice_id: str, waived_by: str, reason: str, now: datetime
    ) -> SessionStep:
        """Waives the charge on a session whose credit was taken; refused otherwise."""
        why_not = (
            "only the charge of a late cancellation or of a no-show can be waived, while its credit is taken"
        )
        try:
            waived = self._fire(session, now, "waive", invoice_id=invoice_id).fired
        except SessionNotBooked:
            raise NotWaivable(
                f"session {session.session_id} is {session.state.value}: {why_not}",
                metadata={"session_id": session.session_id, "state": session.state.value},
            ) from None
        if not waived:
            if payment_state(session) is not PaymentState.PAID:
                raise NotWaivable(
                    f"session {session.session_id}'s payment is {payment_state(session).value}"
                    f"{_why_voided(session)}: {why_not}",
                    metadata={"session_id": session.session_id, "state": session.state.value},
                )
            raise on_invoice_refusal(session, invoice_id)
        # The taken credit goes back.
        return SessionStep(changed(session, now, waiver=Waiver(now, waived_by, reason)), LedgerKind.REFUND)

    def _started(self, session: Session, now: datetime, trigger: str, done: str) -> SessionState:
        """Fires `trigger`, which only a started session takes; the state it leads to."""
        model = self._fire(session, now, trigger)
        if not model.fired:
            raise SessionNotStarted(
                f"session {session.session_id} starts at {session.starts_at.isoformat()}; "
                f"it can be {done} only once it has started",
                metadata={"session_id": session.session_id, "starts_at": session.starts_at.isoformat()},
            )
        return SessionState(model.state)

    def _fire(self, session: Session, now: datetime, trigger: str, **kwargs: Any) -> _SessionModel:
        """Fires `trigger`; the model says whether a transition fired (all of its guards passed)."""
        model = _SessionModel(session, self.policy, now)
        model.fired = fire(
            _MACHINE,
            model,
            session.state.value,
            trigger,
            lambda: SessionNotBooked(
                f"session {session.session_id} is {session.state.value}, not BOOKED; only a booked "
                f"session can be {_DONE[trigger]}",
                metadata={"session_id": session.session_id, "state": session.state.value},
            ),
            **kwargs,
        )
        return model


def _why_voided(session: Session) -> str:
    if session.waiver:
        return " (already waived)"
    if session.no_show_forgiven or (session.cancellation and session.cancellation.forgiven):
        return " (forgiven: one of the client's free late cancellations under its programme)"
    return ""


def on_invoice_refusal(session: Session, invoice_id: str) -> OnInvoice:
    return OnInvoice(
        f"session {session.session_id} is on invoice {invoice_id}: remove it from that draft invoice "
        "first (a submitted invoice is final)",
        metadata={"session_id": session.session_id, "invoice_id": invoice_id},
    )


def lost_race(before: Session, current: Session) -> PreconditionFailed:
    """What a guarded change of `before` tells its caller when another request had changed
    the session to `current` first: what it became, if that is why the change cannot be made."""
    if current.waiver is not None and before.waiver is None:
        return NotWaivable(
            f"session {before.session_id}'s charge was waived by another request",
            metadata={"session_id": before.session_id, "state": current.state.value},
        )
    if current.state is not SessionState.BOOKED:
        return SessionNotBooked(
            f"session {before.session_id} is {current.state.value}, not BOOKED; it was changed by "
            "another request",
            metadata={"session_id": before.session_id, "state": current.state.value},
        )
    return Conflict(
        f"session {before.session_id} was changed by another request; read it again and retry",
        metadata={"session_id": before.session_id},
    )


def moved(session: Session, move: Move, now: datetime) -> Session:
    """The session moved in place: same id, programme and terms; the move kept with it."""
    return changed(session, now, starts_at=move.to_starts_at, moves=(*session.moves, move))


def settled_by_move(
    session: Session, outcome: RescheduleOutcome, replacement_id: str, now: datetime
) -> SessionStep:
    """The session a charged move settles: a late cancellation, its credit taken, that names
    its replacement."""
    assert outcome.charged and outcome.cancellation is not None
    after = changed(
        session,
        now,
        state=outcome.session_state,
        cancellation=outcome.cancellation,
        rescheduled_to=replacement_id,
    )
    return _settled(after)


def _settled(after: Session) -> SessionStep:
    """A session that entered a settled state, and what that state does with its held credit."""
    move = credit_move(after.state, after.terms, forgiven=after.no_show_forgiven)
    assert move is not None, f"{after.state} settles nothing"
    return SessionStep(after, move)
