"""An invoice's lifecycle as a `transitions` state machine: DRAFT -> SUBMITTED, then frozen.

While DRAFT, lines may be added and removed (`edit`, an internal transition). `submit` needs at
least one line. No transition leaves SUBMITTED: what was sent to the accounts department stays
as it was sent."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from transitions import EventData

from kara_sessions_server.domain.errors import InvoiceEmpty, InvoiceNotDraft
from kara_sessions_server.domain.machines import Lifecycle, fire, shared_machine
from kara_sessions_server.domain.model import Invoice, InvoiceState

_I = InvoiceState

TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": "submit", "source": _I.DRAFT, "dest": _I.SUBMITTED, "conditions": ["has_lines"]},
    # Internal (no change of state): adding or removing lines, allowed only while DRAFT.
    {"trigger": "edit", "source": _I.DRAFT, "dest": None},
]

_VERBS = {"submit": "submitted", "edit": "changed"}


class _InvoiceModel:
    def __init__(self, invoice: Invoice):
        self.state: str = invoice.state.value
        self.invoice = invoice

    def has_lines(self, event: EventData) -> bool:
        """The invoice has at least one line."""
        return self.invoice.line_count > 0


INVOICE_LIFECYCLE = Lifecycle("Invoice", InvoiceState, InvoiceState.DRAFT, TRANSITIONS, _InvoiceModel)
_MACHINE = shared_machine(INVOICE_LIFECYCLE)


def submit(invoice: Invoice, now: datetime) -> Invoice:
    if _fire(invoice, "submit") is not InvoiceState.SUBMITTED:
        raise InvoiceEmpty(
            f"invoice {invoice.invoice_id} has no lines; add paid sessions before submitting it",
            metadata={"invoice_id": invoice.invoice_id},
        )
    return replace(
        invoice, state=InvoiceState.SUBMITTED, submitted_at=now, updated_at=now, version=invoice.version + 1
    )


def edit(invoice: Invoice, now: datetime) -> Invoice:
    """The invoice after a change of its lines (the caller sets them); refused unless DRAFT."""
    _fire(invoice, "edit")
    return replace(invoice, updated_at=now, version=invoice.version + 1)


def _fire(invoice: Invoice, trigger: str) -> InvoiceState:
    model = _InvoiceModel(invoice)
    fire(
        _MACHINE,
        model,
        invoice.state.value,
        trigger,
        lambda: InvoiceNotDraft(
            f"invoice {invoice.invoice_id} is {invoice.state.value}; only a DRAFT invoice can be "
            f"{_VERBS[trigger]} (a submitted invoice is frozen)",
            metadata={"invoice_id": invoice.invoice_id, "state": invoice.state.value},
        ),
    )
    return InvoiceState(model.state)
