"""Invoice use cases: one function per RPC, one unit of work per request, sharing the sessions'
idempotent mutation (Mutations.mutate) so a retried request_id creates or changes nothing twice."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from kara_sessions_server.domain import invoice_lifecycle, invoicing
from kara_sessions_server.domain.errors import NotFound, NothingToInvoice, TooManySessions
from kara_sessions_server.domain.feed import Change, EventType
from kara_sessions_server.domain.invoicing import MAX_INVOICE_LINES, Candidate
from kara_sessions_server.domain.model import (
    ChangeInvoiceLines,
    CreateInvoice,
    Invoice,
    InvoiceState,
    Page,
    SubmitInvoice,
)
from kara_sessions_server.domain.principal import Principal
from kara_sessions_server.domain.tallies import InvoiceChanged
from kara_sessions_server.service_layer import authz, snapshots
from kara_sessions_server.service_layer.mutations import Mutations, Operation
from kara_sessions_server.service_layer.unit_of_work import UnitOfWork, UnitOfWorkFactory

Work = Callable[[UnitOfWork, datetime], Invoice]


@dataclass
class InvoiceServices:
    unit_of_work: UnitOfWorkFactory
    mutations: Mutations

    def create_invoice(self, who: Principal, cmd: CreateInvoice) -> Invoice:
        authz.check_invoices(who, cmd.professional_id)

        def work(uow: UnitOfWork, now: datetime) -> Invoice:
            chosen = self._chosen(uow, who, cmd)
            lines = invoicing.lines_for(cmd.professional_id, chosen, now)
            invoice = Invoice(
                invoice_id=str(uuid.uuid4()),
                professional_id=cmd.professional_id,
                state=InvoiceState.DRAFT,
                created_at=now,
                updated_at=now,
                version=1,
            ).with_lines(lines)
            uow.invoices.add(invoice)
            uow.invoices.add_lines(invoice.invoice_id, lines)
            ids = [line.session_id for line in invoice.lines]
            uow.invoices.audit(invoice.invoice_id, "CREATE", ids, who, cmd.request_id, now)
            uow.tallies.append(InvoiceChanged("CREATE", len(ids)))
            return invoice

        return self._mutate(who, "CreateInvoice", cmd, work, EventType.INVOICE_CREATED)

    def add_to_invoice(self, who: Principal, cmd: ChangeInvoiceLines) -> Invoice:
        def work(uow: UnitOfWork, now: datetime) -> Invoice:
            before = self._load(uow, who, cmd.invoice_id)
            after = invoice_lifecycle.edit(before, now)
            invoicing.check_room(before.invoice_id, before.line_count, len(cmd.session_ids))
            chosen = _visible(who, cmd.session_ids, uow.invoices.candidates(cmd.session_ids))
            lines = invoicing.lines_for(before.professional_id, chosen, now)
            uow.invoices.change(before, after)
            uow.invoices.add_lines(before.invoice_id, lines)
            uow.invoices.audit(before.invoice_id, "ADD", cmd.session_ids, who, cmd.request_id, now)
            uow.tallies.append(InvoiceChanged("ADD", len(lines)))
            return after.with_lines(before.lines + lines)

        return self._mutate(who, "AddToInvoice", cmd, work, EventType.INVOICE_CHANGED)

    def remove_from_invoice(self, who: Principal, cmd: ChangeInvoiceLines) -> Invoice:
        def work(uow: UnitOfWork, now: datetime) -> Invoice:
            before = self._load(uow, who, cmd.invoice_id)
            after = invoice_lifecycle.edit(before, now)
            invoicing.check_on_invoice(before, cmd.session_ids, {line.session_id for line in before.lines})
            uow.invoices.change(before, after)
            uow.invoices.remove_lines(before.invoice_id, cmd.session_ids)
            uow.invoices.audit(before.invoice_id, "REMOVE", cmd.session_ids, who, cmd.request_id, now)
            uow.tallies.append(InvoiceChanged("REMOVE", len(cmd.session_ids)))
            removed = set(cmd.session_ids)
            return after.with_lines(tuple(line for line in before.lines if line.session_id not in removed))

        return self._mutate(who, "RemoveFromInvoice", cmd, work, EventType.INVOICE_CHANGED)

    def submit_invoice(self, who: Principal, cmd: SubmitInvoice) -> Invoice:
        def work(uow: UnitOfWork, now: datetime) -> Invoice:
            before = self._load(uow, who, cmd.invoice_id)
            after = invoice_lifecycle.submit(before, now)
            uow.invoices.change(before, after)
            uow.invoices.audit(before.invoice_id, "SUBMIT", (), who, cmd.request_id, now)
            uow.tallies.append(InvoiceChanged("SUBMIT", 0))
            return after

        return self._mutate(who, "SubmitInvoice", cmd, work, EventType.INVOICE_SUBMITTED)

    def get_invoice(self, who: Principal, invoice_id: str) -> Invoice:
        with self.unit_of_work(write=False) as uow:
            return self._load(uow, who, invoice_id)

    def list_invoices(
        self, who: Principal, professional_id: str, state: InvoiceState | None, size: int, token: str
    ) -> Page[Invoice]:
        authz.check_invoices(who, professional_id)
        with self.unit_of_work(write=False) as uow:
            return uow.invoices.page(professional_id, state, size, token)

    # --- helpers --------------------------------------------------------------------------

    def _mutate(
        self,
        who: Principal,
        operation: str,
        cmd: CreateInvoice | ChangeInvoiceLines | SubmitInvoice,
        work: Work,
        told: EventType,
    ) -> Invoice:
        op = Operation(
            operation,
            cmd,
            snapshots.dump_invoice,
            snapshots.load_invoice,
            lambda invoice: Change.of_invoice(told, invoice),
        )
        return self.mutations.mutate(who, op, cmd.request_id, work)

    def _chosen(self, uow: UnitOfWork, who: Principal, cmd: CreateInvoice) -> list[Candidate]:
        if cmd.up_to is None:
            return _visible(who, cmd.session_ids, uow.invoices.candidates(cmd.session_ids))
        chosen = uow.invoices.uninvoiced_paid(cmd.professional_id, cmd.up_to, MAX_INVOICE_LINES + 1)
        up_to = cmd.up_to.isoformat()
        if not chosen:
            raise NothingToInvoice(
                f"professional {cmd.professional_id} has no paid session on no invoice that starts at or "
                f"before {up_to}",
                metadata={"professional_id": cmd.professional_id, "up_to": up_to},
            )
        if len(chosen) > MAX_INVOICE_LINES:
            raise TooManySessions(
                f"more than {MAX_INVOICE_LINES} uninvoiced paid sessions start at or before {up_to}; an "
                "invoice holds at most that many: choose an earlier up_to",
                metadata={"professional_id": cmd.professional_id, "up_to": up_to},
            )
        return chosen

    @staticmethod
    def _load(uow: UnitOfWork, who: Principal, invoice_id: str) -> Invoice:
        """The invoice, if `who` may see it; to anyone but a service, a missing invoice and another
        professional's are refused alike."""
        invoice = authz.found_or_denied(
            who, lambda: uow.invoices.get(invoice_id), lambda: authz.invoice_denied(invoice_id)
        )
        authz.check_invoice(who, invoice)
        return invoice


def _visible(who: Principal, session_ids: Sequence[str], found: Mapping[str, Candidate]) -> list[Candidate]:
    """The named sessions in the order given. As for a single session, a caller other than a
    service is not told whether a session it may not see exists."""
    chosen = []
    for session_id in session_ids:
        candidate = found.get(session_id)
        if candidate is None:
            if who.is_service:
                raise NotFound(f"session {session_id} does not exist", metadata={"session_id": session_id})
            raise authz.session_denied(session_id)
        if not authz.is_party_to(who, candidate.session):
            raise authz.session_denied(session_id)
        chosen.append(candidate)
    return chosen
