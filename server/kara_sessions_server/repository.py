"""Sessions, their payments and the audit log, persisted with peewee.

State changes are conditional UPDATEs (state and version must still be what was read), so of
two concurrent cancellations exactly one changes the row; the other sees zero rows updated."""

from __future__ import annotations

from datetime import datetime

import peewee as pw

from .authz import Principal
from .errors import Conflict, NotFound, SessionNotBooked
from .model import (
    PAYMENT_FOR_STATE,
    Cancellation,
    Page,
    Party,
    Payment,
    PaymentSection,
    PaymentState,
    Session,
    SessionState,
    payment_of,
)
from .pagination import cut, decode
from .storage import AuditRow, PaymentRow, SessionRow, from_micros, to_micros

S = SessionRow
P = PaymentRow


def _session(row: SessionRow) -> Session:
    return Session(
        session_id=row.session_id,
        client_id=row.client_id,
        professional_id=row.professional_id,
        starts_at=row.starts_at,
        booked_at=row.booked_at,
        updated_at=row.updated_at,
        state=SessionState(row.state),
        version=row.version,
        credits=row.credits,
        cancellation=_cancellation(row),
        completed_at=row.completed_at,
    )


def _cancellation(row: SessionRow) -> Cancellation | None:
    if row.cancelled_by is None:
        return None
    return Cancellation(
        cancelled_by=Party(row.cancelled_by),
        cancelled_at=row.cancelled_at,
        notified_at=row.notified_at,
        notice=row.notice,
        late=bool(row.late),
        charge_client=bool(row.charge_client),
        reason=row.reason or "",
    )


def _payment(row: PaymentRow, session: SessionRow | None) -> Payment:
    return Payment(
        session_id=row.session_id,
        client_id=row.client_id,
        professional_id=row.professional_id,
        session_starts_at=row.session_starts_at,
        state=PaymentState(row.state),
        credits=row.credits,
        updated_at=row.updated_at,
        cancellation=_cancellation(session) if session is not None else None,
    )


def get_session(session_id: str) -> Session:
    row = S.get_or_none(S.session_id == session_id)
    if row is None:
        raise NotFound(f"session {session_id} does not exist", metadata={"session_id": session_id})
    return _session(row)


def add_session(session: Session) -> None:
    S.insert(
        session_id=session.session_id,
        client_id=session.client_id,
        professional_id=session.professional_id,
        starts_at=session.starts_at,
        booked_at=session.booked_at,
        updated_at=session.updated_at,
        state=session.state.value,
        version=session.version,
        credits=session.credits,
    ).execute()
    payment = payment_of(session)
    P.insert(
        session_id=payment.session_id,
        client_id=payment.client_id,
        professional_id=payment.professional_id,
        session_starts_at=payment.session_starts_at,
        state=payment.state.value,
        section=payment.section.value,
        credits=payment.credits,
        updated_at=payment.updated_at,
    ).execute()


def change_state(before: Session, after: Session) -> None:
    """Writes `after` only if the row is still exactly `before` (same state and version)."""
    c = after.cancellation
    fields: dict[pw.Field, object] = {
        S.state: after.state.value,
        S.version: before.version + 1,
        S.updated_at: after.updated_at,
        S.completed_at: after.completed_at,
    }
    if c is not None:
        fields.update(
            {
                S.cancelled_by: c.cancelled_by.value,
                S.cancelled_at: c.cancelled_at,
                S.notified_at: c.notified_at,
                S.notice: c.notice,
                S.late: c.late,
                S.charge_client: c.charge_client,
                S.reason: c.reason,
            }
        )
    changed = (
        S.update(fields)
        .where(
            (S.session_id == before.session_id)
            & (S.state == before.state.value)
            & (S.version == before.version)
        )
        .execute()
    )
    if changed != 1:
        _raise_lost_race(before)
    payment_state = PAYMENT_FOR_STATE[after.state]
    changed = (
        P.update(state=payment_state.value, section=payment_state.section.value, updated_at=after.updated_at)
        .where((P.session_id == before.session_id) & (P.state == PAYMENT_FOR_STATE[before.state].value))
        .execute()
    )
    if changed != 1:
        raise Conflict(f"payment of session {before.session_id} changed concurrently; retry")


def _raise_lost_race(before: Session) -> None:
    current = get_session(before.session_id)
    if current.state is not SessionState.BOOKED:
        raise SessionNotBooked(
            f"session {before.session_id} is {current.state.value}, not BOOKED; it was changed by "
            "another request",
            metadata={"session_id": before.session_id, "state": current.state.value},
        )
    raise Conflict(
        f"session {before.session_id} was changed by another request; read it again and retry",
        metadata={"session_id": before.session_id},
    )


def audit(
    before: Session | None,
    after: Session,
    action: str,
    actor: str,
    principal: Principal,
    request_id: str,
    now: datetime,
) -> None:
    """`actor` is the party the domain acted for (CLIENT, PROFESSIONAL, SYSTEM); `principal` the
    authenticated caller who asked."""
    c = after.cancellation
    AuditRow.insert(
        session_id=after.session_id,
        action=action,
        actor=actor,
        principal=str(principal),
        from_state=before.state.value if before else None,
        to_state=after.state.value,
        notified_at=c.notified_at if c else None,
        notice=c.notice if c else None,
        charge_client=c.charge_client if c else None,
        reason=c.reason if c else None,
        request_id=request_id,
        at=now,
    ).execute()


def list_sessions(
    professional_id: str, client_id: str, state: SessionState | None, size: int, token: str
) -> Page[Session]:
    """Oldest start first."""
    query_id = ("sessions", professional_id, client_id, state.value if state else "")
    after = decode(query_id, token)
    query = S.select()
    if professional_id:
        query = query.where(S.professional_id == professional_id)
    if client_id:
        query = query.where(S.client_id == client_id)
    if state is not None:
        query = query.where(S.state == state.value)
    if after is not None:
        at, sid = int(after[0]), str(after[1])
        query = query.where(
            (S.starts_at > from_micros(at)) | ((S.starts_at == from_micros(at)) & (S.session_id > sid))
        )
    rows, token_out = cut(
        query_id,
        list(query.order_by(S.starts_at, S.session_id).limit(size + 1)),
        size,
        lambda r: [to_micros(r.starts_at), r.session_id],
    )
    return Page(tuple(_session(r) for r in rows), token_out)


def list_payments(professional_id: str, section: PaymentSection, size: int, token: str) -> Page[Payment]:
    """Most recent session first."""
    query_id = ("payments", professional_id, section.value)
    after = decode(query_id, token)
    query = (
        P.select(P, S)
        .join(S, on=(S.session_id == P.session_id), attr="session_row")
        .where((P.professional_id == professional_id) & (P.section == section.value))
    )
    if after is not None:
        at, sid = from_micros(int(after[0])), str(after[1])
        query = query.where((P.session_starts_at < at) | ((P.session_starts_at == at) & (P.session_id < sid)))
    rows, token_out = cut(
        query_id,
        list(query.order_by(P.session_starts_at.desc(), P.session_id.desc()).limit(size + 1)),
        size,
        lambda r: [to_micros(r.session_starts_at), r.session_id],
    )
    return Page(tuple(_payment(r, r.session_row) for r in rows), token_out)  # type: ignore[attr-defined]
