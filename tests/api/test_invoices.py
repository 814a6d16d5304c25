"""Invoices (issue 5), through the real server on SQLite and PostgreSQL: what goes on an invoice
and why, its totals, its lifecycle, every refusal, and a session on at most one invoice."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any

import pytest
from kara.sessions.v1 import invoices_pb2 as ipb
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer

from ..support.booking import book
from ..support.clock import FakeClock
from ..support.database import assert_ledger_balances, db_snapshot
from ..support.refusals import INVALID, NOT_FOUND, PRECONDITION, refuse

DRAFT, SUBMITTED = ipb.INVOICE_STATE_DRAFT, ipb.INVOICE_STATE_SUBMITTED
FAR = timedelta(days=3)


@dataclass
class Sessions:
    """pro-1's sessions, one of each kind, as the article describes them."""

    completed: str
    client_late: str
    charged_late: str
    voided: str
    booked: str

    @property
    def paid(self) -> list[str]:
        return [self.completed, self.client_late, self.charged_late]


def paid_and_unpaid(kara: SessionsClient, clock: FakeClock, professional_id: str = "pro-1") -> Sessions:
    """Books and settles one session of each kind. The clock ends 3 days after it started."""
    kara.grant_credits("cl-a", 10)
    kara.grant_credits("cl-b", 10)

    def new(starts_in: timedelta, client_id: str = "cl-a") -> str:
        return str(kara.book(client_id, professional_id, clock.now() + starts_in).session_id)

    completed = new(timedelta(hours=1))
    client_late = new(timedelta(hours=10), "cl-b")
    charged_late = new(timedelta(hours=12))
    voided = new(FAR)
    booked = new(timedelta(days=30))
    kara.cancel(client_late, "client", reason="overslept")
    kara.cancel(charged_late, "professional", charge_client=True, reason="client emailed late")
    kara.cancel(voided, "client")
    clock.advance(timedelta(hours=2))
    kara.complete(completed)
    clock.advance(FAR - timedelta(hours=2))
    return Sessions(completed, client_late, charged_late, voided, booked)


@pytest.fixture
def pro1(kara: SessionsClient, clock: FakeClock) -> Sessions:
    return paid_and_unpaid(kara, clock)


def lines(invoice: ipb.Invoice) -> dict[str, ipb.InvoiceLine]:
    return {line.session_id: line for line in invoice.lines}


def invoiced_in_payments_tab(kara: SessionsClient, professional_id: str = "pro-1") -> dict[str, str]:
    return {p.session_id: p.invoice_id for p in kara.list_payments(professional_id, "paid").payments}


# --- what an invoice holds ----------------------------------------------------------------------


def test_each_line_says_whose_session_when_why_it_was_paid_and_for_how_much(
    kara: SessionsClient, server: RunningServer, pro1: Sessions
) -> None:
    invoice = kara.create_invoice("pro-1", pro1.paid)
    assert invoice.state == DRAFT and invoice.professional_id == "pro-1"
    by_id = lines(invoice)
    assert {sid: (line.paid_reason, line.client_id, line.credits) for sid, line in by_id.items()} == {
        pro1.completed: (pb.PAID_REASON_COMPLETED, "cl-a", 1),
        pro1.client_late: (pb.PAID_REASON_CLIENT_LATE_CANCELLATION, "cl-b", 1),
        pro1.charged_late: (pb.PAID_REASON_CHARGED_LATE_CANCELLATION, "cl-a", 1),
    }
    for sid, line in by_id.items():
        assert line.session_starts_at == kara.get_session(sid).starts_at
    starts = [line.session_starts_at.ToDatetime() for line in invoice.lines]
    assert starts == sorted(starts), "oldest session first"
    assert (invoice.line_count, invoice.total_credits) == (3, 3)
    assert kara.get_invoice(invoice.invoice_id) == invoice
    assert_ledger_balances(server)


def test_the_payments_tab_shows_which_paid_sessions_are_invoiced(
    kara: SessionsClient, pro1: Sessions
) -> None:
    assert invoiced_in_payments_tab(kara) == dict.fromkeys(pro1.paid, "")
    invoice = kara.create_invoice("pro-1", [pro1.completed, pro1.client_late])
    assert invoiced_in_payments_tab(kara) == {
        pro1.completed: invoice.invoice_id,
        pro1.client_late: invoice.invoice_id,
        pro1.charged_late: "",
    }
    details = kara.get_payment(pro1.completed)
    assert (details.invoice_id, details.paid_reason) == (invoice.invoice_id, pb.PAID_REASON_COMPLETED)
    assert kara.get_payment(pro1.charged_late).paid_reason == pb.PAID_REASON_CHARGED_LATE_CANCELLATION
    unpaid = kara.list_payments("pro-1", "unpaid").payments
    assert {p.session_id for p in unpaid} == {pro1.voided, pro1.booked}
    assert all(p.invoice_id == "" and p.paid_reason == pb.PAID_REASON_UNSPECIFIED for p in unpaid)


def test_up_to_takes_every_uninvoiced_paid_session_starting_by_then(
    kara: SessionsClient, server: RunningServer, pro1: Sessions, clock: FakeClock
) -> None:
    first = kara.create_invoice("pro-1", [pro1.completed])
    completed_at = kara.get_session(pro1.completed).starts_at.ToDatetime(tzinfo=UTC)
    charged_at = kara.get_session(pro1.charged_late).starts_at.ToDatetime(tzinfo=UTC)
    # Up to the client's late cancellation: the completed one is already invoiced, the charged
    # one starts later; voided and booked sessions are never taken.
    second = kara.create_invoice("pro-1", up_to=charged_at - timedelta(microseconds=1))
    assert [line.session_id for line in second.lines] == [pro1.client_late]
    third = kara.create_invoice("pro-1", up_to=charged_at)  # inclusive
    assert [line.session_id for line in third.lines] == [pro1.charged_late]
    refuse(
        server,
        lambda: kara.create_invoice("pro-1", up_to=clock.now() + timedelta(days=365)),
        PRECONDITION,
        "NOTHING_TO_INVOICE",
    )
    assert completed_at < charged_at
    assert invoiced_in_payments_tab(kara) == {
        pro1.completed: first.invoice_id,
        pro1.client_late: second.invoice_id,
        pro1.charged_late: third.invoice_id,
    }


def test_up_to_never_takes_another_professionals_sessions(
    kara: SessionsClient, server: RunningServer, pro1: Sessions, clock: FakeClock
) -> None:
    other = book(kara, clock, timedelta(hours=5), client_id="cl-z", professional_id="pro-2")
    kara.cancel(other, "client")
    invoice = kara.create_invoice("pro-1", up_to=clock.now() + timedelta(days=365))
    assert {line.session_id for line in invoice.lines} == set(pro1.paid)
    assert invoiced_in_payments_tab(kara, "pro-2") == {other: ""}


# --- lifecycle ------------------------------------------------------------------------------------


def test_a_draft_takes_and_gives_back_sessions_then_submitted_it_is_frozen(
    kara: SessionsClient, server: RunningServer, pro1: Sessions, clock: FakeClock
) -> None:
    invoice = kara.create_invoice("pro-1", [pro1.completed])
    grown = kara.add_to_invoice(invoice.invoice_id, [pro1.client_late, pro1.charged_late])
    assert (grown.line_count, grown.total_credits, grown.state) == (3, 3, DRAFT)
    shrunk = kara.remove_from_invoice(invoice.invoice_id, [pro1.client_late])
    assert set(lines(shrunk)) == {pro1.completed, pro1.charged_late} and shrunk.total_credits == 2
    assert invoiced_in_payments_tab(kara)[pro1.client_late] == "", "a removed session is free again"

    submitted = kara.submit_invoice(invoice.invoice_id)
    assert submitted.state == SUBMITTED
    assert submitted.submitted_at.ToDatetime(tzinfo=UTC) == clock.now()
    assert list(submitted.lines) == list(shrunk.lines)
    frozen = kara.get_invoice(invoice.invoice_id)
    for change in (
        lambda: kara.add_to_invoice(invoice.invoice_id, [pro1.client_late]),
        lambda: kara.remove_from_invoice(invoice.invoice_id, [pro1.completed]),
        lambda: kara.submit_invoice(invoice.invoice_id),
    ):
        err = refuse(server, change, PRECONDITION, "INVOICE_NOT_DRAFT")
        assert err.metadata == {"invoice_id": invoice.invoice_id, "state": "SUBMITTED"}
    assert kara.get_invoice(invoice.invoice_id) == frozen

    # The session taken off the draft goes on another invoice.
    other = kara.create_invoice("pro-1", [pro1.client_late])
    assert invoiced_in_payments_tab(kara)[pro1.client_late] == other.invoice_id


def test_an_empty_invoice_cannot_be_submitted(
    kara: SessionsClient, server: RunningServer, pro1: Sessions
) -> None:
    invoice = kara.create_invoice("pro-1", [pro1.completed])
    emptied = kara.remove_from_invoice(invoice.invoice_id, [pro1.completed])
    assert (emptied.line_count, emptied.total_credits, list(emptied.lines)) == (0, 0, [])
    refuse(server, lambda: kara.submit_invoice(invoice.invoice_id), PRECONDITION, "INVOICE_EMPTY")


def test_list_invoices_newest_first_with_totals_and_pages(
    kara: SessionsClient, server: RunningServer, pro1: Sessions, clock: FakeClock
) -> None:
    made = []
    for sid in pro1.paid:
        made.append(kara.create_invoice("pro-1", [sid]).invoice_id)
        clock.advance(timedelta(minutes=1))
    kara.submit_invoice(made[0])
    seen: list[ipb.Invoice] = []
    token = ""
    while True:
        page = kara.list_invoices("pro-1", page_size=2, page_token=token)
        seen += page.invoices
        token = page.next_page_token
        if not token:
            break
    assert [i.invoice_id for i in seen] == made[::-1]
    assert all((i.line_count, i.total_credits, len(i.lines)) == (1, 1, 0) for i in seen)
    drafts = kara.list_invoices("pro-1", state="draft").invoices
    assert [i.invoice_id for i in drafts] == made[:0:-1]
    assert [i.invoice_id for i in kara.list_invoices("pro-1", state="submitted").invoices] == made[:1]
    assert list(kara.list_invoices("pro-2").invoices) == []
    refuse(
        server,
        lambda: kara.list_invoices("pro-1", state="draft", page_token=page.next_page_token or "bogus"),
        INVALID,
        None,
    )


# --- idempotency ------------------------------------------------------------------------------


def test_a_retried_request_changes_nothing_twice(
    kara: SessionsClient, server: RunningServer, pro1: Sessions
) -> None:
    first = kara.create_invoice("pro-1", pro1.paid, request_id="inv-1")
    assert kara.create_invoice("pro-1", pro1.paid, request_id="inv-1") == first
    removed = kara.remove_from_invoice(first.invoice_id, [pro1.completed], request_id="rm-1")
    assert kara.remove_from_invoice(first.invoice_id, [pro1.completed], request_id="rm-1") == removed
    submitted = kara.submit_invoice(first.invoice_id, request_id="sub-1")
    assert kara.submit_invoice(first.invoice_id, request_id="sub-1") == submitted
    snapshot = db_snapshot(server)
    assert len(snapshot["invoices"]) == 1 and len(snapshot["invoice_lines"]) == 2
    assert [r["action"] for r in snapshot["invoice_audit"]] == ["CREATE", "REMOVE", "SUBMIT"]
    refuse(
        server,
        lambda: kara.create_invoice("pro-1", [pro1.completed], request_id="inv-1"),
        INVALID,
        "REQUEST_ID_REUSED",
    )


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "state"), [("voided", "CANCELLED_VOIDED and its payment VOIDED"), ("booked", "BOOKED")]
)
def test_a_session_whose_payment_is_not_paid_is_refused_by_name(
    kara: SessionsClient, server: RunningServer, pro1: Sessions, kind: str, state: str
) -> None:
    unpaid = getattr(pro1, kind)
    err = refuse(
        server,
        lambda: kara.create_invoice("pro-1", [pro1.completed, unpaid]),
        PRECONDITION,
        "SESSION_NOT_PAID",
    )
    assert err.metadata["session_id"] == unpaid and unpaid in err.message and state in err.message
    assert err.precondition_violations == [("SESSION_NOT_PAID", f"sessions/{unpaid}", err.message)], (
        "one violation, naming the session"
    )
    invoice = kara.create_invoice("pro-1", [pro1.completed])
    refuse(
        server, lambda: kara.add_to_invoice(invoice.invoice_id, [unpaid]), PRECONDITION, "SESSION_NOT_PAID"
    )


def test_every_refused_session_is_listed(
    kara: SessionsClient, server: RunningServer, pro1: Sessions, clock: FakeClock
) -> None:
    invoiced = kara.create_invoice("pro-1", [pro1.completed])
    theirs = book(kara, clock, timedelta(hours=3), client_id="cl-z", professional_id="pro-2")
    kara.cancel(theirs, "client")
    err = refuse(
        server,
        lambda: kara.create_invoice(
            "pro-1", [pro1.charged_late, pro1.voided, pro1.completed, theirs, pro1.booked]
        ),
        PRECONDITION,
        "SESSION_NOT_PAID",
    )
    assert [(kind, subject) for kind, subject, _ in err.precondition_violations] == [
        ("SESSION_NOT_PAID", f"sessions/{pro1.voided}"),
        ("SESSION_ALREADY_INVOICED", f"sessions/{pro1.completed}"),
        ("SESSION_OF_ANOTHER_PROFESSIONAL", f"sessions/{theirs}"),
        ("SESSION_NOT_PAID", f"sessions/{pro1.booked}"),
    ]
    assert err.metadata["refused_count"] == "4"
    assert invoiced.invoice_id in err.precondition_violations[1][2]


def test_a_session_already_on_an_invoice_is_refused_naming_that_invoice(
    kara: SessionsClient, server: RunningServer, pro1: Sessions
) -> None:
    first = kara.create_invoice("pro-1", [pro1.completed])
    second = kara.create_invoice("pro-1", [pro1.client_late])
    for attempt in (
        lambda: kara.create_invoice("pro-1", [pro1.completed]),
        lambda: kara.add_to_invoice(second.invoice_id, [pro1.completed]),
        lambda: kara.add_to_invoice(first.invoice_id, [pro1.completed]),
    ):
        err = refuse(server, attempt, PRECONDITION, "SESSION_ALREADY_INVOICED")
        assert err.metadata["session_id"] == pro1.completed and first.invoice_id in err.message


def test_another_professionals_session_is_refused(
    kara: SessionsClient, server: RunningServer, pro1: Sessions
) -> None:
    """A service may name any session; it still goes only on its own professional's invoice."""
    err = refuse(
        server,
        lambda: kara.create_invoice("pro-2", [pro1.completed]),
        PRECONDITION,
        "SESSION_OF_ANOTHER_PROFESSIONAL",
    )
    assert "pro-1" in err.message and "pro-2" in err.message


def test_removing_a_session_that_is_not_on_the_invoice(
    kara: SessionsClient, server: RunningServer, pro1: Sessions
) -> None:
    invoice = kara.create_invoice("pro-1", [pro1.completed])
    err = refuse(
        server,
        lambda: kara.remove_from_invoice(invoice.invoice_id, [pro1.completed, pro1.client_late]),
        PRECONDITION,
        "SESSION_NOT_ON_INVOICE",
    )
    assert err.metadata["session_id"] == pro1.client_late


def test_unknown_invoices_and_sessions(kara: SessionsClient, server: RunningServer, pro1: Sessions) -> None:
    refuse(server, lambda: kara.get_invoice("no-such-invoice"), NOT_FOUND, "NOT_FOUND")
    refuse(server, lambda: kara.submit_invoice("no-such-invoice"), NOT_FOUND, "NOT_FOUND")
    refuse(server, lambda: kara.add_to_invoice("no-such-invoice", [pro1.completed]), NOT_FOUND, "NOT_FOUND")
    err = refuse(
        server, lambda: kara.create_invoice("pro-1", [pro1.completed, "no-such"]), NOT_FOUND, "NOT_FOUND"
    )
    assert err.metadata == {"session_id": "no-such"}


def _create(session_ids: list[str]) -> ipb.CreateInvoiceRequest:
    return ipb.CreateInvoiceRequest(professional_id="pro-1", session_ids=session_ids, request_id="r")


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        pytest.param(_create([]), ["session_ids"], id="create-neither-sessions-nor-up_to"),
        pytest.param(
            ipb.CreateInvoiceRequest(session_ids=["s"], request_id="r"),
            ["professional_id"],
            id="no-professional",
        ),
        pytest.param(
            ipb.CreateInvoiceRequest(professional_id="pro-1", session_ids=["s"]),
            ["request_id"],
            id="no-request-id",
        ),
        pytest.param(_create(["s", "t", "s"]), ["session_ids"], id="a-session-twice"),
        pytest.param(_create(["a b"]), ["session_ids[0]"], id="malformed-session-id"),
        pytest.param(_create([f"s{i}" for i in range(1001)]), ["session_ids"], id="over-1000-sessions"),
        pytest.param(
            ipb.AddToInvoiceRequest(invoice_id="i", request_id="r"), ["session_ids"], id="add-nothing"
        ),
        pytest.param(
            ipb.RemoveFromInvoiceRequest(session_ids=["s"], request_id="r"),
            ["invoice_id"],
            id="remove-no-invoice",
        ),
        pytest.param(ipb.SubmitInvoiceRequest(invoice_id="i"), ["request_id"], id="submit-no-request-id"),
        pytest.param(
            ipb.ListInvoicesRequest(professional_id="pro-1", state=7), ["state"], id="list-bad-state"
        ),
        pytest.param(
            ipb.ListInvoicesRequest(professional_id="pro-1", page_size=-1),
            ["page_size"],
            id="list-bad-page-size",
        ),
        pytest.param(ipb.GetInvoiceRequest(), ["invoice_id"], id="get-no-invoice"),
    ],
)
def test_malformed_requests_name_their_fields(
    kara: SessionsClient, server: RunningServer, request_: Any, fields: list[str]
) -> None:
    method = getattr(kara.invoices, type(request_).__name__.removesuffix("Request"))
    err = refuse(server, lambda: kara._call(method, request_, object), INVALID, None)
    assert [f for f, _ in err.field_violations] == fields


def test_session_ids_and_up_to_together_are_refused(kara: SessionsClient, server: RunningServer) -> None:
    request = ipb.CreateInvoiceRequest(professional_id="pro-1", session_ids=["s"], request_id="r")
    request.up_to.GetCurrentTime()
    err = refuse(server, lambda: kara._call(kara.invoices.CreateInvoice, request, object), INVALID, None)
    assert err.field_violations == [("session_ids", "give either session_ids or up_to, not both")]


# --- at most one invoice per session, under concurrency -------------------------------------------


def _race(calls: list[Callable[[], ipb.Invoice]]) -> tuple[list[ipb.Invoice], list[Any]]:
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from kara_sessions_client.client import KaraError

    barrier = Barrier(len(calls))

    def run(call: Callable[[], ipb.Invoice]) -> ipb.Invoice | KaraError:
        barrier.wait()
        try:
            return call()
        except KaraError as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(run, calls))
    won = [r for r in results if isinstance(r, ipb.Invoice)]
    lost = [r for r in results if not isinstance(r, ipb.Invoice)]
    return won, lost


def assert_at_most_one_invoice_each(server: RunningServer, won: list[ipb.Invoice]) -> None:
    on_invoices = [line.session_id for invoice in won for line in invoice.lines]
    assert len(on_invoices) == len(set(on_invoices)), "a session went on two invoices"
    stored = db_snapshot(server)["invoice_lines"]
    assert sorted(r["session_id"] for r in stored) == sorted(on_invoices)


def test_concurrent_invoices_never_share_a_session(
    kara: SessionsClient, server: RunningServer, pro1: Sessions
) -> None:
    choices = [pro1.paid, pro1.paid[::-1], [pro1.client_late], [pro1.charged_late, pro1.completed]] * 2
    won, lost = _race([lambda ids=ids: kara.create_invoice("pro-1", ids) for ids in choices])
    assert won, "somebody wins"
    assert_at_most_one_invoice_each(server, won)
    assert {(e.code, e.reason) for e in lost} == {(PRECONDITION, "SESSION_ALREADY_INVOICED")}
    assert {line.session_id for invoice in won for line in invoice.lines} <= set(pro1.paid)


def test_concurrent_up_to_invoices_take_each_session_once(
    kara: SessionsClient, server: RunningServer, pro1: Sessions, clock: FakeClock
) -> None:
    up_to = clock.now() + timedelta(days=365)
    won, lost = _race([lambda: kara.create_invoice("pro-1", up_to=up_to) for _ in range(6)])
    assert_at_most_one_invoice_each(server, won)
    assert {line.session_id for invoice in won for line in invoice.lines} == set(pro1.paid)
    assert all(e.reason in ("SESSION_ALREADY_INVOICED", "NOTHING_TO_INVOICE") for e in lost), lost


def test_two_replicas_never_put_a_session_on_two_invoices(
    database_url: str, server: RunningServer, kara: SessionsClient, pro1: Sessions
) -> None:
    """Two `kara-sessions serve` processes on one database, each asked at once for the same sessions."""
    from ..support.processes import start_server_process

    procs = [start_server_process(database_url) for _ in range(2)]
    clients = [SessionsClient(f"127.0.0.1:{port}", timeout=30) for _, port in procs]
    try:
        calls = [
            lambda c=c, ids=ids: c.create_invoice("pro-1", ids)
            for c in clients
            for ids in (pro1.paid, pro1.paid[::-1], [pro1.charged_late])
        ]
        won, lost = _race(calls)
    finally:
        for c in clients:
            c.close()
        for proc, _ in procs:
            proc.terminate()
            proc.wait(timeout=30)
    assert won
    assert_at_most_one_invoice_each(server, won)
    assert {e.reason for e in lost} == {"SESSION_ALREADY_INVOICED"}, lost


def late_cancelled(kara: SessionsClient, clock: FakeClock, n: int) -> list[str]:
    """n paid sessions of pro-1 (clients' late cancellations)."""
    kara.grant_credits("cl-late", n)
    sessions = [kara.book("cl-late", "pro-1", clock.now() + timedelta(hours=5)).session_id for _ in range(n)]
    for session_id in sessions:
        kara.cancel(session_id, "client")
    return sessions


@pytest.mark.parametrize("round_", range(4))
def test_concurrent_changes_to_one_invoice_are_all_or_nothing_and_stop_at_submit(
    kara: SessionsClient, server: RunningServer, clock: FakeClock, round_: int
) -> None:
    a, b, c = late_cancelled(kara, clock, 3)
    invoice_id = kara.create_invoice("pro-1", [a, b]).invoice_id
    changes: list[Callable[[], ipb.Invoice]] = [
        lambda: kara.submit_invoice(invoice_id),
        lambda: kara.add_to_invoice(invoice_id, [c]),
        lambda: kara.remove_from_invoice(invoice_id, [b]),
        lambda: kara.remove_from_invoice(invoice_id, [a]),
    ] * 3
    won, lost = _race(changes)
    allowed = {
        "INVOICE_NOT_DRAFT",
        "CONCURRENT_MODIFICATION",
        "INVOICE_EMPTY",
        "SESSION_ALREADY_INVOICED",
        "SESSION_NOT_ON_INVOICE",
    }
    assert {e.reason for e in lost} <= allowed, lost
    final = kara.get_invoice(invoice_id)
    # Replaying the audit trail gives the invoice's lines: every change that was answered OK
    # took effect whole, and none went through after the submission.
    audit = sorted(db_snapshot(server)["invoice_audit"], key=lambda r: r["audit_id"])
    actions = [r["action"] for r in audit]
    assert "SUBMIT" not in actions or actions.index("SUBMIT") == len(actions) - 1, actions
    on_invoice: set[str] = set()
    for row in audit:
        sessions = set((row["session_ids"] or "").split(",")) - {""}
        on_invoice = on_invoice | sessions if row["action"] in ("CREATE", "ADD") else on_invoice - sessions
    assert {line.session_id for line in final.lines} == on_invoice
    assert len(audit) == 1 + len(won)
    submitted = [w for w in won if w.state == SUBMITTED]
    assert len(submitted) <= 1
    if submitted:
        assert final.state == SUBMITTED and list(final.lines) == list(submitted[0].lines)


# --- the sample client's CLI ---------------------------------------------------------------------


def cli(server: RunningServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kara_sessions_client.cli", "--target", f"127.0.0.1:{server.port}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_create_show_submit_and_export_csv(
    kara: SessionsClient, server: RunningServer, pro1: Sessions, clock: FakeClock
) -> None:
    day = clock.now().date().isoformat()  # every paid session starts before the clock's day ends
    created = cli(server, "--json", "invoice", "create", "--professional", "pro-1", "--up-to", day)
    assert created.returncode == 0, created.stderr
    import json

    invoice_id = json.loads(created.stdout)["invoice_id"]
    shown = cli(server, "invoice", "show", invoice_id)
    assert shown.returncode == 0 and "total_credits: 3" in shown.stdout, shown

    draft = cli(server, "invoice", "export", invoice_id, "--format", "csv")
    assert draft.returncode == 0 and "is a draft" in draft.stderr
    assert cli(server, "invoice", "submit", invoice_id).returncode == 0
    exported = cli(server, "invoice", "export", invoice_id, "--format", "csv")
    assert exported.returncode == 0 and exported.stderr == ""

    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    *line_rows, total = rows
    invoice = kara.get_invoice(invoice_id)
    assert [r["session_id"] for r in line_rows] == [line.session_id for line in invoice.lines]
    assert {r["session_id"]: r["why_paid"] for r in line_rows} == {
        pro1.completed: "completed",
        pro1.client_late: "client's late cancellation",
        pro1.charged_late: "charged late cancellation",
    }
    for row, line in zip(line_rows, invoice.lines, strict=True):
        assert row["client_id"] == line.client_id and row["credits"] == "1"
        assert row["session_date"] == line.session_starts_at.ToDatetime().date().isoformat()
        assert (row["invoice_id"], row["professional_id"], row["invoice_state"]) == (
            invoice_id,
            "pro-1",
            "submitted",
        )
    assert (total["why_paid"], total["credits"], total["session_id"]) == ("total", "3", "")
    assert sum(int(r["credits"]) for r in line_rows) == int(total["credits"])


def test_cli_refusals_name_each_session_and_exit_1(server: RunningServer, pro1: Sessions) -> None:
    refused = cli(server, "invoice", "create", "--professional", "pro-1", "--session", pro1.voided)
    assert refused.returncode == 1
    assert "SESSION_NOT_PAID" in refused.stderr and pro1.voided in refused.stderr
    both = cli(
        server,
        "invoice",
        "create",
        "--professional",
        "pro-1",
        "--session",
        pro1.voided,
        "--session",
        pro1.booked,
    )
    assert both.returncode == 1
    listed = [line.strip().split(":")[0] for line in both.stderr.splitlines() if line.startswith("  ")]
    assert listed == [f"sessions/{pro1.voided}", f"sessions/{pro1.booked}"], both.stderr
    usage = cli(server, "invoice", "create", "--professional", "pro-1")
    assert usage.returncode == 2 and "--session" in usage.stderr


def test_export_neutralises_ids_a_spreadsheet_would_run_as_formulas(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    session_id = book(kara, clock, timedelta(hours=4), client_id="=HYPERLINK(1)", professional_id="pro-1")
    kara.cancel(session_id, "client")
    invoice_id = kara.create_invoice("pro-1", [session_id]).invoice_id
    exported = cli(server, "invoice", "export", invoice_id)
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert rows[0]["client_id"] == "'=HYPERLINK(1)"
    assert rows[0]["session_id"] == session_id and rows[-1]["credits"] == "1"
