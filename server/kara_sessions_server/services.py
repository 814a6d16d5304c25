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

from . import idempotency, ledger, repository, snapshots
from .clock import Clock, SystemClock
from .errors import InvalidRequest, PreconditionFailed
from .lifecycle import SessionLifecycle
from .model import (
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
from .pagination import page_size
from .policy import CancellationPolicy
from .storage import Storage
from .unit_of_work import UnitOfWork

R = TypeVar("R")

SYSTEM_ACTOR = "SYSTEM"


@dataclass
class Services:
    storage: Storage
    clock: Clock = field(default_factory=SystemClock)
    policy: CancellationPolicy = field(default_factory=CancellationPolicy)

    def __post_init__(self) -> None:
        self.lifecycle = SessionLifecycle(self.policy)

    # --- sessions -------------------------------------------------------------------------

    def book_session(self, cmd: BookSession) -> Session:
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
            repository.add_session(session)
            repository.audit(None, session, "BOOK", SYSTEM_ACTOR, cmd.request_id, now)
            return session

        params = {
            "client_id": cmd.client_id,
            "professional_id": cmd.professional_id,
            "starts_at": cmd.starts_at,
        }
        return self._mutate(
            "BookSession", cmd.request_id, params, work, snapshots.dump_session, snapshots.load_session
        )

    def cancel_session(self, cmd: CancelSession) -> tuple[Session, Payment]:
        def work(uow: UnitOfWork, now: datetime) -> tuple[Session, Payment]:
            # The lifecycle checks these again; checking first makes a malformed request
            # INVALID_ARGUMENT even when the session does not exist.
            self.policy.validate_request(cmd, now)
            before = repository.get_session(cmd.session_id)
            outcome = self.lifecycle.cancel(before, cmd, now)
            after = _apply(before, outcome, now)
            repository.change_state(before, after)
            ledger.settle(
                before.client_id, before.session_id, outcome.credit_move, before.credits, cmd.request_id, now
            )
            repository.audit(before, after, "CANCEL", cmd.cancelled_by.value, cmd.request_id, now)
            return after, payment_of(after)

        params = {
            "session_id": cmd.session_id,
            "cancelled_by": cmd.cancelled_by.value,
            "charge_client": cmd.charge_client,
            "notified_at": cmd.notified_at,
            "reason": cmd.reason,
        }
        return self._mutate(
            "CancelSession",
            cmd.request_id,
            params,
            work,
            snapshots.dump_settlement,
            snapshots.load_settlement,
        )

    def preview_cancellation(self, cmd: CancelSession) -> CancellationOutcome:
        with UnitOfWork(self.storage, write=False):
            now = self.clock.now()
            self.policy.validate_request(cmd, now)
            return self.lifecycle.cancel(repository.get_session(cmd.session_id), cmd, now)

    def complete_session(self, cmd: CompleteSession) -> Session:
        def work(uow: UnitOfWork, now: datetime) -> Session:
            before = repository.get_session(cmd.session_id)
            after = replace(self.lifecycle.complete(before, now), version=before.version + 1)
            repository.change_state(before, after)
            ledger.settle(
                before.client_id, before.session_id, LedgerKind.TAKE, before.credits, cmd.request_id, now
            )
            repository.audit(before, after, "COMPLETE", SYSTEM_ACTOR, cmd.request_id, now)
            return after

        return self._mutate(
            "CompleteSession",
            cmd.request_id,
            {"session_id": cmd.session_id},
            work,
            snapshots.dump_session,
            snapshots.load_session,
        )

    def get_session(self, session_id: str) -> Session:
        with UnitOfWork(self.storage, write=False):
            return repository.get_session(session_id)

    def list_sessions(
        self, professional_id: str, client_id: str, state: SessionState | None, size: int, token: str
    ) -> Page[Session]:
        if not professional_id and not client_id:
            raise InvalidRequest.single("professional_id", "give a professional_id, a client_id or both")
        size = page_size(size)
        with UnitOfWork(self.storage, write=False):
            return repository.list_sessions(professional_id, client_id, state, size, token)

    # --- payments -------------------------------------------------------------------------

    def get_payment(self, session_id: str) -> Payment:
        with UnitOfWork(self.storage, write=False):
            return repository.get_payment(session_id)

    def list_payments(
        self, professional_id: str, section: PaymentSection, size: int, token: str
    ) -> Page[Payment]:
        size = page_size(size)
        with UnitOfWork(self.storage, write=False):
            return repository.list_payments(professional_id, section, size, token)

    # --- credits --------------------------------------------------------------------------

    def grant_credits(self, cmd: GrantCredits) -> CreditAccount:
        def work(uow: UnitOfWork, now: datetime) -> CreditAccount:
            ledger.grant(cmd.client_id, cmd.credits, cmd.request_id, now)
            return ledger.balance(cmd.client_id)

        return self._mutate(
            "GrantCredits",
            cmd.request_id,
            {"client_id": cmd.client_id, "credits": cmd.credits},
            work,
            snapshots.dump_account,
            snapshots.load_account,
        )

    def get_credit_account(self, client_id: str, size: int, token: str) -> CreditAccount:
        size = page_size(size)
        with UnitOfWork(self.storage, write=False):
            return ledger.account(client_id, size, token)

    # --- idempotent mutation --------------------------------------------------------------

    def _mutate(
        self,
        operation: str,
        request_id: str,
        params: Mapping[str, object],
        work: Callable[[UnitOfWork, datetime], R],
        dump: Callable[[R], str],
        load: Callable[[str], R],
    ) -> R:
        fp = idempotency.fingerprint(operation, params)
        try:
            with UnitOfWork(self.storage) as uow:
                stored = idempotency.find(request_id)
                if stored is not None:
                    return load(idempotency.check_same_request(stored, request_id, operation, fp))
                now = self.clock.now()
                result = work(uow, now)
                idempotency.record(request_id, operation, fp, dump(result), now)
                uow.commit()
                return result
        except (PreconditionFailed, pw.IntegrityError):
            # We may have lost a race to a request with the same request_id (e.g. a retry that
            # overtook its original): if that request committed, its result is ours.
            with UnitOfWork(self.storage, write=False):
                stored = idempotency.find(request_id)
            if stored is None:
                raise
            return load(idempotency.check_same_request(stored, request_id, operation, fp))


def _apply(before: Session, outcome: CancellationOutcome, now: datetime) -> Session:
    return replace(
        before,
        state=outcome.session_state,
        cancellation=outcome.cancellation,
        updated_at=now,
        version=before.version + 1,
    )
