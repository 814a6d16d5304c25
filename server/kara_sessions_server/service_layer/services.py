"""Application services: one function per use case, one unit of work per request.

They turn commands into domain decisions (lifecycle/policy) and persist the result, the credit
movement, the payment and the audit record in a single transaction."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TypeVar

import peewee as pw

from kara_sessions_server.adapters import idempotency, ledger, outbox, session_repository, snapshots
from kara_sessions_server.adapters.pagination import page_size
from kara_sessions_server.adapters.storage import Storage
from kara_sessions_server.domain.clock import Clock, SystemClock
from kara_sessions_server.domain.errors import InvalidRequest, PreconditionFailed
from kara_sessions_server.domain.events import CreditsMoved, Event, FeedAppended, SessionCancelled
from kara_sessions_server.domain.feed import Change, EventType
from kara_sessions_server.domain.model import (
    CREDITS_PER_SESSION,
    BookSession,
    CancellationOutcome,
    CancelSession,
    CompleteSession,
    CreditAccount,
    GrantCredits,
    LedgerKind,
    Page,
    Payment,
    PaymentSection,
    Session,
    SessionState,
    payment_of,
)
from kara_sessions_server.domain.policy import CancellationPolicy
from kara_sessions_server.domain.principal import Principal
from kara_sessions_server.domain.session_lifecycle import SessionLifecycle
from kara_sessions_server.service_layer import authz
from kara_sessions_server.service_layer.commit_signal import CommitSignal
from kara_sessions_server.service_layer.unit_of_work import UnitOfWork

R = TypeVar("R")

SYSTEM_ACTOR = "SYSTEM"


@dataclass
class Services:
    storage: Storage
    clock: Clock = field(default_factory=SystemClock)
    policy: CancellationPolicy = field(default_factory=CancellationPolicy)
    # Told of what committed (metrics); never of a replay or a rollback.
    publish: Callable[[Event], None] = field(default=lambda event: None)
    # Wakes the event feed's followers after each commit.
    signal: CommitSignal = field(default_factory=CommitSignal)

    def __post_init__(self) -> None:
        self.lifecycle = SessionLifecycle(self.policy)

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
            session = Session(
                session_id=str(uuid.uuid4()),
                client_id=cmd.client_id,
                professional_id=cmd.professional_id,
                starts_at=cmd.starts_at,
                booked_at=now,
                updated_at=now,
                state=SessionState.BOOKED,
                version=1,
                credits=CREDITS_PER_SESSION,
            )
            ledger.hold(cmd.client_id, session.session_id, session.credits, cmd.request_id, now)
            session_repository.add_session(session)
            session_repository.audit(None, session, "BOOK", SYSTEM_ACTOR, who, cmd.request_id, now)
            uow.events.append(CreditsMoved(LedgerKind.HOLD, session.credits))
            return session

        params = {
            "client_id": cmd.client_id,
            "professional_id": cmd.professional_id,
            "starts_at": cmd.starts_at,
        }
        return self.mutate(
            who,
            "BookSession",
            cmd.request_id,
            params,
            work,
            snapshots.dump_session,
            snapshots.load_session,
            lambda session: Change.of_session(EventType.SESSION_BOOKED, session),
        )

    def cancel_session(self, who: Principal, cmd: CancelSession) -> tuple[Session, Payment]:
        authz.check_cancel(who, cmd)

        def work(uow: UnitOfWork, now: datetime) -> tuple[Session, Payment]:
            # The lifecycle checks these again; checking first makes a malformed request
            # INVALID_ARGUMENT even when the session does not exist.
            self.policy.validate_request(cmd, now)
            before = _load_session(who, cmd.session_id)
            outcome = self.lifecycle.cancel(before, cmd, now)
            after = _apply(before, outcome, now)
            session_repository.change_state(before, after)
            ledger.settle(
                before.client_id, before.session_id, outcome.credit_move, before.credits, cmd.request_id, now
            )
            session_repository.audit(
                before, after, "CANCEL", cmd.cancelled_by.value, who, cmd.request_id, now
            )
            uow.events.append(SessionCancelled(cmd.cancelled_by, outcome.cancellation.late, after.state))
            uow.events.append(CreditsMoved(outcome.credit_move, before.credits))
            return after, payment_of(after)

        params = {
            "session_id": cmd.session_id,
            "cancelled_by": cmd.cancelled_by.value,
            "charge_client": cmd.charge_client,
            "notified_at": cmd.notified_at,
            "reason": cmd.reason,
        }
        return self.mutate(
            who,
            "CancelSession",
            cmd.request_id,
            params,
            work,
            snapshots.dump_settlement,
            snapshots.load_settlement,
            lambda settled: Change.of_session(EventType.SESSION_CANCELLED, settled[0]),
        )

    def preview_cancellation(self, who: Principal, cmd: CancelSession) -> CancellationOutcome:
        authz.check_cancel(who, cmd)
        with UnitOfWork(self.storage, write=False):
            now = self.clock.now()
            self.policy.validate_request(cmd, now)
            return self.lifecycle.cancel(_load_session(who, cmd.session_id), cmd, now)

    def complete_session(self, who: Principal, cmd: CompleteSession) -> Session:
        def work(uow: UnitOfWork, now: datetime) -> Session:
            before = _load_session(who, cmd.session_id)
            authz.check_complete(who, before)
            after = replace(self.lifecycle.complete(before, now), version=before.version + 1)
            session_repository.change_state(before, after)
            ledger.settle(
                before.client_id, before.session_id, LedgerKind.TAKE, before.credits, cmd.request_id, now
            )
            session_repository.audit(before, after, "COMPLETE", SYSTEM_ACTOR, who, cmd.request_id, now)
            uow.events.append(CreditsMoved(LedgerKind.TAKE, before.credits))
            return after

        return self.mutate(
            who,
            "CompleteSession",
            cmd.request_id,
            {"session_id": cmd.session_id},
            work,
            snapshots.dump_session,
            snapshots.load_session,
            lambda session: Change.of_session(EventType.SESSION_COMPLETED, session),
        )

    def get_session(self, who: Principal, session_id: str) -> Session:
        with UnitOfWork(self.storage, write=False):
            return _load_session(who, session_id)

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
        size = page_size(size)
        with UnitOfWork(self.storage, write=False):
            return session_repository.list_sessions(professional_id, client_id, state, size, token)

    # --- payments -------------------------------------------------------------------------

    def get_payment(self, who: Principal, session_id: str) -> Payment:
        with UnitOfWork(self.storage, write=False):
            session, invoice_id = authz.found_or_denied(
                who,
                lambda: session_repository.get_session_and_invoice(session_id),
                lambda: authz.session_denied(session_id),
            )
            authz.check_session(who, session)
            return payment_of(session, invoice_id)

    def list_payments(
        self, who: Principal, professional_id: str, section: PaymentSection, size: int, token: str
    ) -> Page[Payment]:
        authz.check_list_payments(who, professional_id)
        size = page_size(size)
        with UnitOfWork(self.storage, write=False):
            return session_repository.list_payments(professional_id, section, size, token)

    # --- credits --------------------------------------------------------------------------

    def grant_credits(self, who: Principal, cmd: GrantCredits) -> CreditAccount:
        authz.check_grant(who)

        def work(uow: UnitOfWork, now: datetime) -> CreditAccount:
            ledger.grant(cmd.client_id, cmd.credits, cmd.request_id, now)
            uow.events.append(CreditsMoved(LedgerKind.GRANT, cmd.credits))
            return ledger.balance(cmd.client_id)

        return self.mutate(
            who,
            "GrantCredits",
            cmd.request_id,
            {"client_id": cmd.client_id, "credits": cmd.credits},
            work,
            snapshots.dump_account,
            snapshots.load_account,
            Change.of_account,
        )

    def get_credit_account(self, who: Principal, client_id: str, size: int, token: str) -> CreditAccount:
        authz.check_credit_account(who, client_id)
        size = page_size(size)
        with UnitOfWork(self.storage, write=False):
            return ledger.account(client_id, size, token)

    # --- idempotent mutation --------------------------------------------------------------

    def mutate(
        self,
        who: Principal,
        operation: str,
        request_id: str,
        params: Mapping[str, object],
        work: Callable[[UnitOfWork, datetime], R],
        dump: Callable[[R], str],
        load: Callable[[str], R],
        change: Callable[[R], Change],
    ) -> R:
        """Runs `work` once per request_id in one unit of work, storing its result (`dump`) and
        the one event that tells the feed of it (`change`) in the same transaction; a retry gets
        that result back (`load`) and changes nothing, the feed included."""
        # The caller is part of the request: another principal's request_id replays nothing of theirs.
        fp = idempotency.fingerprint(operation, {**params, "principal": str(who)})
        try:
            with UnitOfWork(self.storage) as uow:
                stored = idempotency.find(request_id)
                if stored is not None:
                    return load(idempotency.check_same_request(stored, request_id, operation, fp))
                now = self.clock.now()
                result = work(uow, now)
                data = dump(result)
                idempotency.record(request_id, operation, fp, data, now)
                told = change(result)
                outbox.append(told, data, now)
                uow.events.append(FeedAppended(told.type.value))
                uow.commit()
            for event in uow.events:
                self.publish(event)
            self.signal.notify()
            return result
        except (PreconditionFailed, pw.IntegrityError):
            # We may have lost a race to a request with the same request_id (e.g. a retry that
            # overtook its original): if that request committed, its result is ours.
            with UnitOfWork(self.storage, write=False):
                stored = idempotency.find(request_id)
            if stored is None:
                raise
            return load(idempotency.check_same_request(stored, request_id, operation, fp))


def _load_session(who: Principal, session_id: str) -> Session:
    """The session, if `who` may see it; to anyone but a service, a missing session and another
    person's session are refused alike."""
    session = authz.found_or_denied(
        who, lambda: session_repository.get_session(session_id), lambda: authz.session_denied(session_id)
    )
    authz.check_session(who, session)
    return session


def _apply(before: Session, outcome: CancellationOutcome, now: datetime) -> Session:
    return replace(
        before,
        state=outcome.session_state,
        cancellation=outcome.cancellation,
        updated_at=now,
        version=before.version + 1,
    )
