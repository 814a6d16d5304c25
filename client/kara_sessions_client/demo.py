"""The help-centre article's five scenarios, played against a real server."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
from kara.sessions.v1 import credits_pb2 as cpb
from kara.sessions.v1 import sessions_pb2 as pb

from .client import KaraError, SessionsClient
from .invoice_export import WHY_PAID


@dataclass(frozen=True)
class Scenario:
    title: str
    cancelled_by: str
    starts_in: timedelta
    charge_client: bool


SCENARIOS = (
    Scenario("Client cancels with more than 24 h notice", "client", timedelta(days=3), False),
    Scenario("Professional cancels with more than 24 h notice", "professional", timedelta(days=3), False),
    Scenario("Client cancels with less than 24 h notice", "client", timedelta(hours=3), False),
    Scenario(
        "Professional cancels late and charges (client emailed late)",
        "professional",
        timedelta(hours=3),
        True,
    ),
    Scenario("Professional cancels late without charging", "professional", timedelta(hours=3), False),
)


def _balance(account: cpb.CreditAccount) -> str:
    return f"available {account.available}, held {account.held}, used {account.used}"


def _name(enum_type: object, value: int) -> str:
    return str(enum_type.Name(value))  # type: ignore[attr-defined]


def play(client: SessionsClient, pass_time: Callable[[timedelta], None] | None = None) -> None:
    """The scenarios; `pass_time` moves the throwaway server's clock on and runs its sweep of
    unmarked sessions (None against another server: that scenario is skipped)."""
    run = uuid.uuid4().hex[:8]
    for number, scenario in enumerate(SCENARIOS, start=1):
        client_id, professional_id = f"demo-client-{run}-{number}", f"demo-pro-{run}"
        client.grant_credits(client_id, 1)
        session = client.book(client_id, professional_id, datetime.now(UTC) + scenario.starts_in)
        before = client.get_credit_account(client_id, page_size=1)
        result = client.cancel(
            session.session_id, scenario.cancelled_by, charge_client=scenario.charge_client, reason="demo"
        )
        after = client.get_credit_account(client_id, page_size=1)
        c = result.session.cancellation
        moved = (
            "returned to client" if result.payment.state == pb.PAYMENT_STATE_VOIDED else "taken (invoiceable)"
        )
        click.echo(f"{number}. {scenario.title}")
        click.echo(
            f"   cancelled by {scenario.cancelled_by}, notice {c.notice_seconds / 3600:.1f} h, "
            f"charge box {'ticked' if scenario.charge_client else 'clear'}"
        )
        click.echo(f"   session {session.session_id}: {_name(pb.SessionState, result.session.state)}")
        click.echo(
            f"   payment: {_name(pb.PaymentState, result.payment.state)} "
            f"in section {_name(pb.PaymentSection, result.payment.section)}; credit {moved}"
        )
        click.echo(f"   credits before: {_balance(before)}")
        click.echo(f"   credits after:  {_balance(after)}\n")

    # The programme's terms forbid charging when the client had enough notice.
    client_id = f"demo-client-{run}-refused"
    client.grant_credits(client_id, 1)
    session = client.book(client_id, f"demo-pro-{run}", datetime.now(UTC) + timedelta(days=3))
    try:
        client.cancel(session.session_id, "professional", charge_client=True)
    except KaraError as exc:
        click.echo(f"And refused: a professional charging despite 3 days' notice -> {exc}")
        click.echo(f"   credits unchanged: {_balance(client.get_credit_account(client_id, page_size=1))}\n")
    programme_and_waiver(client, run)
    forgiven_late_cancellation(client, run)
    settled_unmarked_session(client, run, pass_time)
    invoice_paid_sessions(client, f"demo-pro-{run}")


def programme_and_waiver(client: SessionsClient, run: str) -> None:
    """Programmes differ: under a 48-hour programme, 30 hours' notice is late. And a professional
    may waive a charge afterwards, as a goodwill gesture."""
    programme_id = f"demo-48h-{run}"
    client.create_programme(programme_id, "A 48-hour wellbeing programme", timedelta(hours=48))
    client_id = f"demo-client-{run}-48h"
    client.grant_credits(client_id, 1, programme_id=programme_id)
    session = client.book(
        client_id, f"demo-pro-{run}", datetime.now(UTC) + timedelta(hours=30), programme_id=programme_id
    )
    result = client.cancel(session.session_id, "client")
    click.echo(f"6. Client cancels with 30 h notice under programme {programme_id} (48 h window)")
    click.echo(
        f"   payment: {_name(pb.PaymentState, result.payment.state)} in section "
        f"{_name(pb.PaymentSection, result.payment.section)} (under the default 24 h it would be VOIDED)"
    )
    waived = client.waive_charge(session.session_id, "demo: the client had a family emergency")
    account = client.get_credit_account(client_id, page_size=1, programme_id=programme_id)
    # The throwaway server has no tokens, so the demo calls as a service, and the waiver says so.
    click.echo(
        "7. The charge is waived afterwards (a professional may waive their own sessions' charges; "
        "this throwaway server has no tokens, so the demo waives it as a service)"
    )
    click.echo(
        f"   payment: {_name(pb.PaymentState, waived.payment.state)} in section "
        f"{_name(pb.PaymentSection, waived.payment.section)}, waived by {waived.payment.waiver.waived_by}: "
        f"{waived.payment.waiver.reason}"
    )
    click.echo(f"   credits after: {_balance(account)} (a REFUND entry in the ledger)\n")


def forgiven_late_cancellation(client: SessionsClient, run: str) -> None:
    """A sponsor that forgives a client's first late cancellation in a year: the first is voided
    and its credit returned, the second is charged as the article says."""
    programme_id = f"demo-kind-{run}"
    client.create_programme(
        programme_id,
        "A programme that forgives one late cancellation a year",
        timedelta(hours=24),
        free_late_cancellations=1,
    )
    client_id = f"demo-client-{run}-kind"
    client.grant_credits(client_id, 2, programme_id=programme_id)
    click.echo(f"8. Client cancels late twice under programme {programme_id} (one forgiven a year)")
    for nth in ("first", "second"):
        session = client.book(
            client_id, f"demo-pro-{run}", datetime.now(UTC) + timedelta(hours=3), programme_id=programme_id
        )
        preview = client.preview(session.session_id, "client")
        result = client.cancel(session.session_id, "client")
        left = preview.forgiveness_allowed - preview.forgiveness_used
        click.echo(
            f"   {nth}: {left} of {preview.forgiveness_allowed} free late cancellation(s) left -> "
            f"{_name(pb.SessionState, result.session.state)}, payment "
            f"{_name(pb.PaymentState, result.payment.state)}"
            f"{' (forgiven: credit returned)' if result.session.cancellation.forgiven else ' (credit taken)'}"
        )
    account = client.get_credit_account(client_id, page_size=1, programme_id=programme_id)
    click.echo(f"   credits after: {_balance(account)}\n")


def settled_unmarked_session(
    client: SessionsClient, run: str, pass_time: Callable[[timedelta], None] | None
) -> None:
    """A session nobody marked, settled by the server two days after its start under a
    programme that says so (completed: the credit taken)."""
    click.echo("9. Nobody marks a session; its programme has the server settle it 48 h after the start")
    if pass_time is None:
        click.echo("   (skipped against --target: the demo moves only its own server's clock)\n")
        return
    programme_id = f"demo-settles-{run}"
    client.create_programme(
        programme_id,
        "A programme whose unmarked sessions count as completed after 48 h",
        timedelta(hours=24),
        settle_unmarked_after=timedelta(hours=48),
    )
    client_id = f"demo-client-{run}-unmarked"
    client.grant_credits(client_id, 1, programme_id=programme_id)
    session = client.book(
        client_id, f"demo-pro-{run}", datetime.now(UTC) + timedelta(hours=2), programme_id=programme_id
    )
    pass_time(timedelta(hours=50, minutes=1))
    settled = client.get_session(session.session_id)
    payment = client.get_payment(session.session_id)
    click.echo(
        f"   50 h later: {_name(pb.SessionState, settled.state)}"
        f"{' (settled automatically)' if settled.settled_automatically else ''}, payment "
        f"{_name(pb.PaymentState, payment.state)} ({WHY_PAID[payment.paid_reason]})"
    )
    account = client.get_credit_account(client_id, page_size=1, programme_id=programme_id)
    click.echo(f"   credits after: {_balance(account)}\n")


def invoice_paid_sessions(client: SessionsClient, professional_id: str) -> None:
    """The article's last step of every Paid case: "you can add the session to the invoice which
    you send to the accounts department"."""
    invoice = client.create_invoice(professional_id, up_to=datetime.now(UTC) + timedelta(days=1))
    invoice = client.submit_invoice(invoice.invoice_id)
    click.echo(f"Invoice {invoice.invoice_id} of {professional_id}: the paid sessions, submitted")
    for line in invoice.lines:
        click.echo(
            f"   {line.session_id}  {line.client_id}  {WHY_PAID[line.paid_reason]}: {line.credits} credit"
        )
    click.echo(f"   total: {invoice.total_credits} credits")


def run_demo(target: str | None) -> int:
    if target is not None:
        with SessionsClient(target) as client:
            play(client)
        return 0
    try:
        from kara_sessions_server.entrypoints.grpc.server import Settings, start
    except ImportError as exc:  # the client install: no server to run in-process
        raise click.ClickException(
            f"the demo's throwaway server needs the server install ({exc.name} is missing): "
            'pip install "kara-sessions[server]", or give --target HOST:PORT'
        ) from None

    clock = _DemoClock()
    with tempfile.TemporaryDirectory(prefix="kara-demo-") as tmp:
        server = start(
            Settings(listen="127.0.0.1:0", database_url=f"sqlite:///{Path(tmp) / 'demo.db'}"), clock=clock
        )
        click.echo(f"Throwaway server on 127.0.0.1:{server.port} with SQLite in {tmp}\n")

        def pass_time(by: timedelta) -> None:
            clock.offset += by
            server.settler.run_once()

        try:
            with SessionsClient(f"127.0.0.1:{server.port}") as client:
                play(client, pass_time)
        finally:
            server.stop(1)
    return 0


class _DemoClock:
    """The throwaway server's clock: the time now, moved on when the demo lets time pass (so a
    session can be two days old without anyone waiting for it)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset
