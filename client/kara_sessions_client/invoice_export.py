"""An invoice as CSV for the accounts department: one row per session, then a total row."""

from __future__ import annotations

import csv
from typing import TextIO

from kara.sessions.v1 import invoices_pb2 as ipb
from kara.sessions.v1 import sessions_pb2 as pb

from .client import INVOICE_STATES

COLUMNS = (
    "invoice_id",
    "professional_id",
    "invoice_state",
    "session_id",
    "client_id",
    "session_date",
    "session_starts_at",
    "why_paid",
    "credits",
)

# The article's words for why a session was paid.
WHY_PAID = {
    pb.PAID_REASON_COMPLETED: "completed",
    pb.PAID_REASON_CLIENT_LATE_CANCELLATION: "client's late cancellation",
    pb.PAID_REASON_CHARGED_LATE_CANCELLATION: "charged late cancellation",
    pb.PAID_REASON_NO_SHOW: "no-show",
    pb.PAID_REASON_CLIENT_LATE_RESCHEDULE: "client's late reschedule",
    pb.PAID_REASON_CHARGED_LATE_RESCHEDULE: "charged late reschedule",
}
STATES = {number: name for name, number in INVOICE_STATES.items()}
TOTAL = "total"
# A spreadsheet runs a cell starting with one of these as a formula (CSV injection); ids come
# from other systems, so such a cell is written with a leading apostrophe, as OWASP advises.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _text(value: str) -> str:
    return "'" + value if value.startswith(_FORMULA_START) else value


def write_csv(invoice: ipb.Invoice, out: TextIO) -> None:
    """Rows in the invoice's order (oldest session first); the last row carries the total in
    `credits`, with `why_paid` set to "total" and no session. Ids that a spreadsheet would take
    for a formula get a leading apostrophe."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    head = (_text(invoice.invoice_id), _text(invoice.professional_id), STATES.get(invoice.state, "unknown"))
    for line in invoice.lines:
        starts_at = line.session_starts_at.ToDatetime()
        writer.writerow(
            (
                *head,
                _text(line.session_id),
                _text(line.client_id),
                starts_at.date().isoformat(),
                line.session_starts_at.ToJsonString(),
                WHY_PAID.get(line.paid_reason, "unknown"),
                line.credits,
            )
        )
    writer.writerow((*head, "", "", "", "", TOTAL, invoice.total_credits))
