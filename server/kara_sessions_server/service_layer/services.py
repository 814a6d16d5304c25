"""Application services: one function per use case, one unit of work per request.

They turn commands into domain decisions (lifecycle/policy) and persist the session (its payment
follows from it), the credit movement and the audit record in a single transaction, through
Mutations.mutate."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from kara_sessions_server.domain.clock import Clock
from kara_sessions_server.domain.errors import InvalidRequest, NothingToExpire
from kara_sessions_server.domain.feed import Change, EventType
from kara_sessions_server.domain.model import (
    CREDITS_PER_SESSION,
    Account,
    BookSession,
    CancellationOutcome,
    CancelSession,
    CompleteSession,
    CreditAccount,
    ExpireCredits,
    GrantCredits,
    LedgerKind,
    MarkNoShow,
    Page,
    Party,
    Payment,
    PaymentSection,
    Rescheduled,
    RescheduleOutcome,
    RescheduleSession,
    Session,
    SessionState,
    SessionStep,
    SettleUnmarked,
    WaiveCharge,
    check_credit_expiry,
    expires_on_return,
)
from kara_sessions_server.domain.policy import NoticePolicy
from kara_sessions_server.domain.principal import Principal, Role
from kara_sessions_server.domain.programme import NONE_FORGIVEN, Forgiveness, UnmarkedOutcome
from kara_sessions_server.domain.session_lifecycle import (
    SessionLifecycle,
    moved,
    on_invoice_refusal,
    settled_by_move,
)
from kara_sessions_server.domain.tallies import (
    ChargeWaived,
    CreditsMoved,
    NoShowMarked,
    SessionCancelled,
    SessionRescheduled,
    SettledAutomatically,
)
from kara_sessions_server.service_layer import authz, snapshots
from kara_sessions_server.service_layer.mutations import Mutations, Operation
from kara_sessions_server.service_layer.unit_of_work import UnitOfWork, UnitOfWorkFactory

SYSTEM_ACTOR = "SYSTEM"
# Who the server's own changes are made by (the settlement of unmarked sessions).
SERVER = Principal(Role.SERVICE, "kara-sessions")

# A charged late move books the session again: on a new credit, which the client must have.
_REBOOK = (
    "to book the session again at the new time (a late move is charged as a late cancellation "
    "and booked on a new credit)"
)


@dataclass
class Services:
    """Sessions, payments and credits: what they read (units of work, clock) and how they
    change things (mutations), injected by the composition root (entrypoints/grpc/server.py)."""

    unit_of_work: UnitOfWorkFactory
    clock: Clock
    mutations: Mutations
    # How far ahead a session may be booked: a typo'd year would otherwise hold a credit for ever
    # (Settings.max_booking_horizon).
    booking_horizon: timedelta
    policy: NoticePolicy = field(default_factory=NoticePolicy)

    def __post_init__(self) -> None:
        self.lifecycle = SessionLifecycle(self.policy)
        self.mutate = self.mutations.mutate

    # --- sessions -------------------------------------------------------------------------

    def book_session(self, who: Principal, cmd: BookSession) -> Session:
        authz.check_book(who, cmd.client_id, cmd.professional_id)

        def work(uow: UnitOfWork, now: datetime) -> Session:
            if cmd.starts_at <= now:
                raise InvalidRequest.single(
                    "starts_at",
                    f"must be in the future (server time is {now.isoformat()})",
                    reason="STARTS_AT_NOT_IN_FUTURE",
                )
            self._check_horizon("starts_at", cmd.starts_at, now)
            session = _new_booking(
                uow, cmd.client_id, cmd.professional_id, cmd.starts_at, cmd.programme_id, now
            )
            expires = uow.ledger.hold(
                _account(session), session.session_id, session.credits, cmd.request_id, now, session.starts_at
            )
            session = replace(session, credit_expires_at=expires)
            uow.sessions.add(session)
            uow.sessions.audit(None, session, "BOOK", SYSTEM_ACTOR, who, cmd.request_id, now)
            uow.tallies.append(CreditsMoved(LedgerKind.HOLD, session.credits))
            return session

        return self.mutate(
            who,
            _session_operation("BookSession", cmd, EventType.SESSION_BOOKED),
            cmd.request_id,
            work,
        )

    def cancel_session(self, who: Principal, cmd: CancelSession) -> tuple[Session, Payment]:
        authz.check_cancel(who, cmd)

        def work(uow: UnitOfWork, now: datetime) -> tuple[Session, Payment]:
            # The lifecycle checks these again; checking first makes a malformed request
            # INVALID_ARGUMENT even when the session does not exist.
            self.policy.validate_request(cmd, now)
            before = _load_session(uow, who, cmd.session_id)
            outcome = self.lifecycle.cancel(before, cmd, now, _forgiveness(uow, before, now, for_change=True))
            step = SessionStep(outcome.after, outcome.credit_move)
            after = _settle(uow, before, step, "CANCEL", cmd.cancelled_by.value, who, cmd.request_id, now)
            uow.tallies.append(SessionCancelled(cmd.cancelled_by, outcome.cancellation.late, after.state))
            return after, Payment.of(after)

        return self.mutate(
            who,
            _settlement_operation("CancelSession", cmd, EventType.SESSION_CANCELLED),
            cmd.request_id,
            work,
        )

    def reschedule_session(self, who: Principal, cmd: RescheduleSession) -> Rescheduled:
        authz.check_reschedule(who, cmd)

        def work(uow: UnitOfWork, now: datetime) -> Rescheduled:
            self._check_reschedule_request(cmd, now)
            before = _load_session(uow, who, cmd.session_id)
            outcome = self.lifecycle.reschedule(before, cmd, now)
            party = cmd.rescheduled_by.value
            uow.tallies.append(SessionRescheduled(cmd.rescheduled_by, outcome.move.late, outcome.charged))
            if not outcome.charged:
                after = uow.sessions.move(before, moved(before, outcome.move, now))
                uow.sessions.audit(before, after, "RESCHEDULE", party, who, cmd.request_id, now)
                return Rescheduled(after)
            # Settled as a late cancellation, and booked again on a new credit of the programme,
            # under its terms as they are now (a new booking), naming the session it replaces.
            replacement = _new_booking(
                uow,
                before.client_id,
                before.professional_id,
                cmd.new_starts_at,
                before.programme_id,
                now,
                before,
            )
            step = settled_by_move(before, outcome, replacement.session_id, now)
            # The session's guarded UPDATE first: of two racing requests the loser is told the
            # session moved on, not (wrongly) that the client has no credit left. Then, as the
            # ledger has always told it, the new booking's HOLD before the old session's TAKE.
            account = _account(before)
            settled = uow.sessions.change_state(before, step.after)
            if before.credit_expires_at is not None:
                # Its lot before the account the new booking's hold writes: every change's order.
                uow.ledger.hold_lot(account, before.credit_expires_at)
            expires = uow.ledger.hold(
                account,
                replacement.session_id,
                replacement.credits,
                cmd.request_id,
                now,
                replacement.starts_at,
                _REBOOK,
            )
            replacement = replace(replacement, credit_expires_at=expires)
            uow.ledger.settle(
                account,
                before.session_id,
                step.credit_move,
                before.credits,
                cmd.request_id,
                now,
                before.credit_expires_at,
            )
            uow.sessions.add(replacement)
            uow.sessions.audit(before, settled, "RESCHEDULE", party, who, cmd.request_id, now)
            uow.sessions.audit(None, replacement, "BOOK", party, who, cmd.request_id, now)
            uow.tallies.append(CreditsMoved(step.credit_move, before.credits))
            uow.tallies.append(CreditsMoved(LedgerKind.HOLD, replacement.credits))
            return Rescheduled(replacement, settled)

        return self.mutate(
            who,
            Operation(
                "RescheduleSession",
                cmd,
                snapshots.dump_rescheduled,
                snapshots.load_rescheduled,
                lambda done: Change.of_session(EventType.SESSION_RESCHEDULED, done.session),
            ),
            cmd.request_id,
            work,
        )

    def preview_reschedule(self, who: Principal, cmd: RescheduleSession) -> RescheduleOutcome:
        """What reschedule_session would do; a charged move needs a spare credit, so a preview
        without one is refused as the reschedule would be."""
        authz.check_reschedule(who, cmd)
        with self.unit_of_work(write=False) as uow:
            now = self.clock.now()
            self._check_reschedule_request(cmd, now)
            session = _load_session(uow, who, cmd.session_id)
            outcome = self.lifecycle.reschedule(session, cmd, now)
            if outcome.charged:
                uow.ledger.check_hold(
                    _account(session), outcome.credits_held, now, cmd.new_starts_at, _REBOOK
                )
            return outcome

    def _check_reschedule_request(self, cmd: RescheduleSession, now: datetime) -> None:
        # The lifecycle checks these again; checking first makes a malformed request
        # INVALID_ARGUMENT even when the session does not exist.
        self.policy.validate_request(cmd, now)
        self._check_horizon("new_starts_at", cmd.new_starts_at, now)

    def _check_horizon(self, field_name: str, starts_at: datetime, now: datetime) -> None:
        if starts_at > now + self.booking_horizon:
            raise InvalidRequest.single(
                field_name,
                f"must be at most {self.booking_horizon.days} days ahead (server time is "
                f"{now.isoformat()}; the server's --max-booking-horizon-days)",
                reason="STARTS_AT_BEYOND_HORIZON",
            )

    def preview_cancellation(self, who: Principal, cmd: CancelSession) -> CancellationOutcome:
        authz.check_cancel(who, cmd)
        with self.unit_of_work(write=False) as uow:
            now = self.clock.now()
            self.policy.validate_request(cmd, now)
            session = _load_session(uow, who, cmd.session_id)
            return self.lifecycle.cancel(session, cmd, now, _forgiveness(uow, session, now))

    def complete_session(self, who: Principal, cmd: CompleteSession) -> Session:
        def work(uow: UnitOfWork, now: datetime) -> Session:
            before = _load_session(uow, who, cmd.session_id)
            authz.check_complete(who, before)
            step = self.lifecycle.complete(before, now)
            return _settle(uow, before, step, "COMPLETE", SYSTEM_ACTOR, who, cmd.request_id, now)

        return self.mutate(
            who,
            _session_operation("CompleteSession", cmd, EventType.SESSION_COMPLETED),
            cmd.request_id,
            work,
        )

    def mark_no_show(self, who: Principal, cmd: MarkNoShow) -> tuple[Session, Payment]:
        def work(uow: UnitOfWork, now: datetime) -> tuple[Session, Payment]:
            before = _load_session(uow, who, cmd.session_id)
            authz.check_professional_act(who, before, "mark a session as a no-show")
            forgiveness = NONE_FORGIVEN
            if before.terms.no_show_takes_credit:
                forgiveness = _forgiveness(uow, before, now, for_change=True)
            step = self.lifecycle.no_show(before, now, forgiveness)
            after = _settle(uow, before, step, "NO_SHOW", _actor(who), who, cmd.request_id, now)
            uow.tallies.append(NoShowMarked(charged=step.credit_move is LedgerKind.TAKE))
            return after, Payment.of(after)

        return self.mutate(
            who,
            _settlement_operation("MarkNoShow", cmd, EventType.SESSION_NO_SHOW),
            cmd.request_id,
            work,
        )

    def unmarked_due(self, limit: int) -> list[str]:
        """Sessions nobody marked whose terms' settle_unmarked_after has passed since their start."""
        with self.unit_of_work(write=False) as uow:
            return uow.sessions.unmarked_due(self.clock.now(), limit)

    def settle_unmarked(self, session_id: str) -> Session:
        """The server settles a session nobody marked (one of unmarked_due), as its terms'
        unmarked_outcome says. Its request_id is the session's own and no caller's (a caller's
        has no space), so of every replica sweeping, one settles it and the others replay that;
        a session marked meanwhile is refused as a late CompleteSession would be."""
        cmd = SettleUnmarked(session_id, f"settle unmarked {session_id}")

        def work(uow: UnitOfWork, now: datetime) -> Session:
            before = uow.sessions.get(session_id)
            forgiveness = NONE_FORGIVEN
            if before.terms.unmarked_outcome is UnmarkedOutcome.NO_SHOW and before.terms.no_show_takes_credit:
                forgiveness = _forgiveness(uow, before, now, for_change=True)
            step = self.lifecycle.settle_unmarked(before, now, forgiveness)
            action = "NO_SHOW" if step.after.state is SessionState.NO_SHOW else "COMPLETE"
            after = _settle(uow, before, step, action, SYSTEM_ACTOR, SERVER, cmd.request_id, now)
            uow.tallies.append(SettledAutomatically(after.state))
            return after

        return self.mutate(
            SERVER,
            Operation(
                "SettleUnmarked",
                cmd,
                snapshots.dump_settled_unmarked,
                snapshots.load_settled_unmarked,
                lambda s: Change.of_session(
                    EventType.SESSION_NO_SHOW
                    if s.state is SessionState.NO_SHOW
                    else EventType.SESSION_COMPLETED,
                    s,
                ),
            ),
            cmd.request_id,
            work,
        )

    def waive_charge(self, who: Principal, cmd: WaiveCharge) -> tuple[Session, Payment]:
        def work(uow: UnitOfWork, now: datetime) -> tuple[Session, Payment]:
            before, invoice_id = self._session_and_invoice(uow, who, cmd.session_id)
            authz.check_professional_act(who, before, "waive a charge")
            step = self.lifecycle.waive(before, invoice_id, str(who), cmd.reason, now)
            after = _settle(uow, before, step, "WAIVE", _actor(who), who, cmd.request_id, now)
            # The conditional UPDATE locked the session's row; an AddToInvoice locks it too before
            # it adds a line, so whichever came second sees the other: look again under the lock
            # (a refusal rolls back all of it).
            if on_invoice := uow.invoices.invoices_of([before.session_id]):
                raise on_invoice_refusal(before, on_invoice[before.session_id])
            uow.tallies.append(ChargeWaived())
            return after, Payment.of(after)

        return self.mutate(
            who,
            _settlement_operation("WaiveCharge", cmd, EventType.SESSION_CHARGE_WAIVED),
            cmd.request_id,
            work,
        )

    @staticmethod
    def _session_and_invoice(uow: UnitOfWork, who: Principal, session_id: str) -> tuple[Session, str]:
        session, invoice_id = authz.found_or_denied(
            who,
            lambda: uow.sessions.get_with_invoice(session_id),
            lambda: authz.session_denied(session_id),
        )
        authz.check_session(who, session)
        return session, invoice_id

    def get_session(self, who: Principal, session_id: str) -> Session:
        with self.unit_of_work(write=False) as uow:
            return _load_session(uow, who, session_id)

    def list_sessions(
        self,
        who: Principal,
        professional_id: str,
        client_id: str,
        state: SessionState | None,
        size: int,
        token: str,
    ) -> Page[Session]:
        if not professional_id and not client_id:
            raise InvalidRequest.single("professional_id", "give a professional_id, a client_id or both")
        authz.check_list_sessions(who, professional_id, client_id)
        with self.unit_of_work(write=False) as uow:
            return uow.sessions.page(professional_id, client_id, state, size, token)

    # --- payments -------------------------------------------------------------------------

    def get_payment(self, who: Principal, session_id: str) -> Payment:
        with self.unit_of_work(write=False) as uow:
            return Payment.of(*self._session_and_invoice(uow, who, session_id))

    def list_payments(
        self, who: Principal, professional_id: str, section: PaymentSection, size: int, token: str
    ) -> Page[Payment]:
        authz.check_list_payments(who, professional_id)
        with self.unit_of_work(write=False) as uow:
            return uow.sessions.payments(professional_id, section, size, token)

    # --- credits --------------------------------------------------------------------------

    def grant_credits(self, who: Principal, cmd: GrantCredits) -> CreditAccount:
        authz.check_grant(who)

        def work(uow: UnitOfWork, now: datetime) -> CreditAccount:
            check_credit_expiry(cmd.expires_at, now)
            account = Account(cmd.client_id, uow.programmes.get(cmd.programme_id).programme_id)
            uow.ledger.grant(account, cmd.credits, cmd.request_id, now, cmd.expires_at)
            uow.tallies.append(CreditsMoved(LedgerKind.GRANT, cmd.credits))
            return uow.ledger.balance(account)

        return self.mutate(
            who,
            Operation(
                "GrantCredits",
                cmd,
                snapshots.dump_account,
                snapshots.load_account,
                Change.of_account,
            ),
            cmd.request_id,
            work,
        )

    def due_credit_lots(self, limit: int) -> list[tuple[Account, datetime]]:
        """Lots whose expire time has come with credits still available."""
        with self.unit_of_work(write=False) as uow:
            return uow.ledger.due_lots(self.clock.now(), limit)

    def expire_credits(self, account: Account, expires_at: datetime) -> CreditAccount:
        """Expires what is left available of the account's lot of `expires_at`, once its time has
        come (held credits wait for their sessions): one EXPIRE entry and one credits.expired
        event. The request_id is the lot's own, which no caller can send, so of replicas
        sweeping at once one expires it and the others replay that."""
        lot = hashlib.sha256(
            f"{account.client_id}\0{account.programme_id}\0{expires_at.isoformat()}".encode()
        )
        request_id = f"expire credits {lot.hexdigest()[:40]}"

        def work(uow: UnitOfWork, now: datetime) -> CreditAccount:
            if expires_at > now:
                raise ValueError(f"credits of {account} expiring at {expires_at.isoformat()} are not due")
            credits = uow.ledger.lot_available(account, expires_at)
            if not credits:
                raise NothingToExpire(
                    f"client {account.client_id}'s credits expiring at {expires_at.isoformat()} are spent",
                    metadata={"client_id": account.client_id, "programme_id": account.programme_id},
                )
            uow.ledger.expire(account, None, credits, request_id, now, expires_at)
            uow.tallies.append(CreditsMoved(LedgerKind.EXPIRE, credits))
            return uow.ledger.balance(account)

        return self.mutate(
            SERVER,
            Operation(
                "ExpireCredits",
                ExpireCredits(account.client_id, account.programme_id, expires_at, request_id),
                snapshots.dump_account,
                snapshots.load_account,
                lambda a: Change.of_account(a, EventType.CREDITS_EXPIRED),
            ),
            request_id,
            work,
        )

    def get_credit_account(
        self, who: Principal, client_id: str, programme_id: str, size: int, token: str
    ) -> CreditAccount:
        authz.check_credit_account(who, client_id)
        with self.unit_of_work(write=False) as uow:
            return uow.ledger.account(Account(client_id, programme_id), size, token)


def _new_booking(
    uow: UnitOfWork,
    client_id: str,
    professional_id: str,
    starts_at: datetime,
    programme_id: str,
    now: datetime,
    replacing: Session | None = None,
) -> Session:
    """A session booked now under its programme's current terms (`replacing`: the session a
    charged move settled, which it names)."""
    programme = uow.programmes.get(programme_id)
    return Session(
        session_id=str(uuid.uuid4()),
        client_id=client_id,
        professional_id=professional_id,
        starts_at=starts_at,
        booked_at=now,
        updated_at=now,
        state=SessionState.BOOKED,
        version=1,
        credits=CREDITS_PER_SESSION,
        programme_id=programme_id,
        terms=programme.terms,
        terms_version=programme.terms_version,
        rescheduled_from="" if replacing is None else replacing.session_id,
    )


def _session_operation(name: str, request: object, told: EventType) -> Operation[Session]:
    """A use case whose result is the session it changed."""
    return Operation(
        name, request, snapshots.dump_session, snapshots.load_session, lambda s: Change.of_session(told, s)
    )


def _settlement_operation(name: str, request: object, told: EventType) -> Operation[tuple[Session, Payment]]:
    """A use case whose result is the session it settled and its payment."""
    return Operation(
        name,
        request,
        snapshots.dump_settlement,
        snapshots.load_settlement,
        lambda settled: Change.of_session(told, settled[0]),
    )


def _settle(
    uow: UnitOfWork,
    before: Session,
    step: SessionStep,
    action: str,
    actor: str,
    who: Principal,
    request_id: str,
    now: datetime,
) -> Session:
    """Persists one settling step, as every use case that settles a session does: the session's
    guarded UPDATE first (of two racing requests, the loser learns the session moved on), the
    credit's move in the ledger, the audit row. Returns the session as saved."""
    after = uow.sessions.change_state(before, step.after)
    account, lot = _account(before), before.credit_expires_at
    uow.ledger.settle(account, before.session_id, step.credit_move, before.credits, request_id, now, lot)
    uow.sessions.audit(before, after, action, actor, who, request_id, now)
    uow.tallies.append(CreditsMoved(step.credit_move, before.credits))
    if lot is not None and step.credit_move is not LedgerKind.TAKE and expires_on_return(before, now):
        # Given back to a lot whose time has passed: it expires as it comes back.
        uow.ledger.expire(account, before.session_id, before.credits, request_id, now, lot)
        uow.tallies.append(CreditsMoved(LedgerKind.EXPIRE, before.credits))
    return after


def _forgiveness(
    uow: UnitOfWork, session: Session, now: datetime, *, for_change: bool = False
) -> Forgiveness:
    """Where `session`'s client stands against its terms' free late cancellations now. Counted
    only under terms that forgive any (the article's forgive none), so other sessions read
    nothing more; `for_change`: held until the change commits, so racing charges count each other."""
    allowed = session.terms.free_late_cancellations
    if not allowed:
        return NONE_FORGIVEN
    if for_change:
        # The session, its credit's lot, its account: the order every change takes them in (a
        # session's guarded UPDATE, then the ledger's lot before its account), so holding them
        # before the change writes them deadlocks with none.
        uow.sessions.hold(session)
        if session.credit_expires_at is not None:
            uow.ledger.hold_lot(_account(session), session.credit_expires_at)
        uow.ledger.hold_account(_account(session))
    since = now - session.terms.forgiveness_period
    return Forgiveness(allowed, uow.sessions.forgiven_since(session, since))


def _load_session(uow: UnitOfWork, who: Principal, session_id: str) -> Session:
    """The session, if `who` may see it; to anyone but a service, a missing session and another
    person's session are refused alike."""
    session = authz.found_or_denied(
        who, lambda: uow.sessions.get(session_id), lambda: authz.session_denied(session_id)
    )
    authz.check_session(who, session)
    return session


def _account(session: Session) -> Account:
    return Account(session.client_id, session.programme_id)


def _actor(who: Principal) -> str:
    """The party a professional's own request acts for; a service acts as the system."""
    return Party.PROFESSIONAL.value if who.role is Role.PROFESSIONAL else SYSTEM_ACTOR
