"""Who may do what (issue 4), as pure functions over a Principal and domain values.

A refusal never tells a caller whether somebody else's session exists: "not yours" and
"no such session" read the same to anyone but a trusted service."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from kara_sessions_server.domain.errors import NotFound, PermissionDenied
from kara_sessions_server.domain.model import CancelSession, Invoice, Party, RescheduleSession, Session
from kara_sessions_server.domain.principal import Principal, Role

T = TypeVar("T")

_PARTY_FOR_ROLE = {Role.PROFESSIONAL: Party.PROFESSIONAL, Role.CLIENT: Party.CLIENT}


def _deny(message: str, **metadata: str) -> PermissionDenied:
    return PermissionDenied(message, metadata=metadata)


def session_denied(session_id: str) -> PermissionDenied:
    return _deny(f"session {session_id} does not exist or you may not act on it", session_id=session_id)


def found_or_denied(principal: Principal, load: Callable[[], T], denied: Callable[[], PermissionDenied]) -> T:
    """`load()`; if what it loads does not exist, only a service is told so (NOT_FOUND). Anyone
    else gets `denied()`, the refusal they would get for something that is not theirs."""
    try:
        return load()
    except NotFound:
        if principal.is_service:
            raise
        raise denied() from None


def is_party_to(principal: Principal, session: Session) -> bool:
    if principal.role is Role.PROFESSIONAL:
        return principal.id == session.professional_id
    if principal.role is Role.CLIENT:
        return principal.id == session.client_id
    return principal.is_service


def check_session(principal: Principal, session: Session) -> None:
    """Read access to a session and its payment: its professional, its client, a service."""
    if not is_party_to(principal, session):
        raise session_denied(session.session_id)


def check_cancel(principal: Principal, command: CancelSession) -> None:
    """A professional or client cancels only as themselves; `cancelled_by` must agree. (That a
    client may neither tick the charge box nor set notified_at is the policy's rule.)"""
    party = _PARTY_FOR_ROLE.get(principal.role)
    if party is not None and command.cancelled_by is not party:
        raise _deny(
            f"{principal} may cancel only as {party.value}, not as {command.cancelled_by.value}",
            cancelled_by=command.cancelled_by.value,
        )


def check_reschedule(principal: Principal, command: RescheduleSession) -> None:
    """As for a cancellation: a professional or client moves only as themselves."""
    party = _PARTY_FOR_ROLE.get(principal.role)
    if party is not None and command.rescheduled_by is not party:
        raise _deny(
            f"{principal} may reschedule only as {party.value}, not as {command.rescheduled_by.value}",
            rescheduled_by=command.rescheduled_by.value,
        )


def check_complete(principal: Principal, session: Session) -> None:
    if principal.role is Role.CLIENT or not is_party_to(principal, session):
        raise session_denied(session.session_id)


def check_book(principal: Principal, client_id: str, professional_id: str) -> None:
    if principal.role is Role.PROFESSIONAL and principal.id != professional_id:
        raise _deny(f"{principal} may book sessions only as professional {principal.id}")
    if principal.role is Role.CLIENT and principal.id != client_id:
        raise _deny(f"{principal} may book sessions only for client {principal.id}")


def check_list_sessions(principal: Principal, professional_id: str, client_id: str) -> None:
    if principal.role is Role.PROFESSIONAL and professional_id != principal.id:
        raise _deny(f"{principal} may list only sessions with professional_id {principal.id}")
    if principal.role is Role.CLIENT and client_id != principal.id:
        raise _deny(f"{principal} may list only sessions with client_id {principal.id}")


def check_list_payments(principal: Principal, professional_id: str) -> None:
    if not principal.is_service and (principal.role, principal.id) != (Role.PROFESSIONAL, professional_id):
        raise _deny(f"{principal} may not list the payments of professional {professional_id}")


def check_grant(principal: Principal) -> None:
    if not principal.is_service:
        raise _deny("only a trusted service may grant credits")


def check_credit_account(principal: Principal, client_id: str) -> None:
    if not principal.is_service and (principal.role, principal.id) != (Role.CLIENT, client_id):
        raise _deny(f"{principal} may not see the credit account of client {client_id}")


def invoice_denied(invoice_id: str) -> PermissionDenied:
    return _deny(f"invoice {invoice_id} does not exist or you may not act on it", invoice_id=invoice_id)


def check_invoices(principal: Principal, professional_id: str) -> None:
    """A professional's invoices are theirs (and a service's) to create, list and change."""
    if not principal.is_service and (principal.role, principal.id) != (Role.PROFESSIONAL, professional_id):
        raise _deny(f"{principal} may not act on the invoices of professional {professional_id}")


def check_invoice(principal: Principal, invoice: Invoice) -> None:
    if not principal.is_service and (principal.role, principal.id) != (
        Role.PROFESSIONAL,
        invoice.professional_id,
    ):
        raise invoice_denied(invoice.invoice_id)


def feed_scope(principal: Principal) -> tuple[str | None, str | None]:
    """(professional_id, client_id) the principal's event feed is limited to; None: no limit. A
    service reads the whole feed, a professional the events of their sessions and invoices, a
    client those of their sessions and credit account."""
    if principal.role is Role.PROFESSIONAL:
        return principal.id, None
    if principal.role is Role.CLIENT:
        return None, principal.id
    if not principal.is_service:
        raise _deny(f"{principal} may not read the event feed")
    return None, None


def check_professional_act(principal: Principal, session: Session, what: str) -> None:
    """Acts only the session's professional (or a service) may take: a no-show, a waiver."""
    if principal.role is Role.CLIENT:
        raise _deny(f"a client may not {what}; the session's professional may", session_id=session.session_id)
    if not is_party_to(principal, session):
        raise session_denied(session.session_id)


def check_manage_programmes(principal: Principal) -> None:
    if not principal.is_service:
        raise _deny("only a trusted service may create or change programmes")


# All a sponsor may call: its programme, and that programme's report. Checked before any handler
# runs (the interceptor), so a use case never meets a sponsor it was not written for.
SPONSOR_METHODS = frozenset({"GetProgramme", "GetProgrammeUsage", "SimulateTerms"})


def check_method(principal: Principal, method: str) -> None:
    """A sponsor calls only SPONSOR_METHODS (`method`: the RPC's name)."""
    if principal.role is Role.SPONSOR and method not in SPONSOR_METHODS:
        raise _deny(f"{principal} may call only {', '.join(sorted(SPONSOR_METHODS))}, not {method}")


def check_programme(principal: Principal, programme_id: str) -> None:
    """A sponsor reads its own programme only; anyone else reads any."""
    if principal.role is Role.SPONSOR and principal.id != programme_id:
        raise _deny(f"{principal} may read only programme {principal.id}", programme_id=programme_id)


def check_programme_report(principal: Principal, programme_id: str) -> None:
    """A programme's usage and simulations: a service's, or its own sponsor's."""
    if not principal.is_service and (principal.role, principal.id) != (Role.SPONSOR, programme_id):
        raise _deny(
            f"{principal} may not see the usage of programme {programme_id}", programme_id=programme_id
        )
