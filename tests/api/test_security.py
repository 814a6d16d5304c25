"""Authentication and authorization through the real server: bearer tokens from a tokens file of
hashes, and who may do what to whose sessions (issue 4)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from kara_sessions_client.client import NO_RETRY, KaraError, SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start
from kara_sessions_server.entrypoints.grpc.tokens import TokenTable, new_token

from ..support.clock import FakeClock
from ..support.database import db_snapshot
from ..support.refusals import refuse
from ..support.tokens import write_tokens

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
PRINCIPALS = ("service:workstation", "professional:pro-1", "professional:pro-2", "client:cl-1", "client:cl-2")
LATER = timedelta(days=3)


@pytest.fixture
def tokens(tmp_path: Path) -> dict[str, str]:
    return write_tokens(tmp_path / "tokens.toml", PRINCIPALS)


@pytest.fixture
def server(
    database_url: str, clock: FakeClock, tmp_path: Path, tokens: dict[str, str]
) -> Iterator[RunningServer]:
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=database_url,
        max_workers=4,
        tokens=TokenTable.load(tmp_path / "tokens.toml"),
    )
    running = start(settings, clock=clock)
    yield running
    running.stop(grace=1)


@pytest.fixture
def as_(server: RunningServer, tokens: dict[str, str]) -> Iterator[Callable[[str], SessionsClient]]:
    clients: list[SessionsClient] = []

    def make(principal: str) -> SessionsClient:
        token = tokens.get(principal, principal)  # not a known principal: use the text as the token
        client = SessionsClient(f"127.0.0.1:{server.port}", timeout=15, retry=NO_RETRY, token=token)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def session_of_pro1(as_: Callable[[str], SessionsClient], clock: FakeClock) -> str:
    """A session of professional pro-1 with client cl-1, booked by the workstation backend."""
    svc = as_("service:workstation")
    svc.grant_credits("cl-1", 3)
    return str(svc.book("cl-1", "pro-1", clock.now() + LATER).session_id)


@pytest.fixture
def invoice_of_pro1(as_: Callable[[str], SessionsClient], session_of_pro1: str, clock: FakeClock) -> str:
    """A DRAFT invoice of pro-1 holding one late-cancelled session of cl-1."""
    svc = as_("service:workstation")
    late = svc.book("cl-1", "pro-1", clock.now() + timedelta(hours=10)).session_id
    svc.cancel(late, "client")
    return str(as_("professional:pro-1").create_invoice("pro-1", [late]).invoice_id)


def every_rpc(session_id: str, invoice_id: str) -> dict[str, Callable[[SessionsClient], Any]]:
    """One valid call of every RPC, about pro-1 / cl-1, `session_id` and `invoice_id`."""
    return {
        "BookSession": lambda c: c.book("cl-1", "pro-1", _far_future()),
        "GetSession": lambda c: c.get_session(session_id),
        "ListSessions": lambda c: c.list_sessions("pro-1", "", None),
        "CancelSession": lambda c: c.cancel(session_id, "professional"),
        "PreviewCancellation": lambda c: c.preview(session_id, "professional"),
        "CompleteSession": lambda c: c.complete(session_id),
        "GetPayment": lambda c: c.get_payment(session_id),
        "ListPayments": lambda c: c.list_payments("pro-1", "paid"),
        "GrantCredits": lambda c: c.grant_credits("cl-1", 1),
        "GetCreditAccount": lambda c: c.get_credit_account("cl-1"),
        "CreateInvoice": lambda c: c.create_invoice("pro-1", up_to=_far_future()),
        "GetInvoice": lambda c: c.get_invoice(invoice_id),
        "ListInvoices": lambda c: c.list_invoices("pro-1"),
        "AddToInvoice": lambda c: c.add_to_invoice(invoice_id, [session_id]),
        "RemoveFromInvoice": lambda c: c.remove_from_invoice(invoice_id, [session_id]),
        "SubmitInvoice": lambda c: c.submit_invoice(invoice_id),
        "MarkNoShow": lambda c: c.mark_no_show(session_id),
        "WaiveCharge": lambda c: c.waive_charge(session_id, "goodwill"),
        "CreateProgramme": lambda c: c.create_programme("eap", "EAP", timedelta(hours=48)),
        "UpdateProgramme": lambda c: c.update_programme("default", display_name="Mine"),
        "GetProgramme": lambda c: c.get_programme("default"),
        "ListProgrammes": lambda c: c.list_programmes(),
        "ListEvents": lambda c: c.list_events(),
        "StreamEvents": lambda c: next(c.events(follow=True)),
    }


# Read by anyone authenticated, within what is theirs: no refusal to show for another person.
NOT_OWNED = {"GetProgramme", "ListProgrammes", "ListEvents", "StreamEvents"}


def _far_future() -> Any:
    from datetime import UTC, datetime

    return datetime(2030, 1, 1, tzinfo=UTC)


RPCS = list(every_rpc("x", "x"))


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize(
    "credential",
    ["none", "unknown", "forged", "not-bearer"],
)
def test_every_rpc_needs_a_valid_token(
    server: RunningServer,
    session_of_pro1: str,
    invoice_of_pro1: str,
    tokens: dict[str, str],
    rpc: str,
    credential: str,
) -> None:
    real = tokens["service:workstation"]
    metadata = {
        "none": (),
        "unknown": (("authorization", f"Bearer {new_token()}"),),
        # a real token with its last character changed
        "forged": (("authorization", f"Bearer {real[:-1]}{'A' if real[-1] != 'A' else 'B'}"),),
        "not-bearer": (("authorization", f"Basic {real}"),),
    }[credential]
    with SessionsClient(f"127.0.0.1:{server.port}", retry=NO_RETRY, metadata=metadata) as anonymous:
        err = refuse(
            server,
            lambda: every_rpc(session_of_pro1, invoice_of_pro1)[rpc](anonymous),
            UNAUTHENTICATED,
            "UNAUTHENTICATED",
        )
    assert real not in err.message


def test_health_and_reflection_need_no_token(server: RunningServer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# What each other-person principal may not do to pro-1 / cl-1's session, RPC by RPC.
CROSS_OWNER = [
    (rpc, who)
    for who in ("professional:pro-2", "client:cl-2")
    for rpc in RPCS
    if rpc not in NOT_OWNED
    and not (rpc == "CancelSession" and who.startswith("client"))  # covered by cancelled_by below
    and not (rpc == "PreviewCancellation" and who.startswith("client"))
]


@pytest.mark.parametrize(("rpc", "who"), CROSS_OWNER)
def test_nobody_acts_on_another_persons_session(
    server: RunningServer,
    as_: Callable[[str], SessionsClient],
    session_of_pro1: str,
    invoice_of_pro1: str,
    rpc: str,
    who: str,
) -> None:
    call = every_rpc(session_of_pro1, invoice_of_pro1)[rpc]
    refuse(server, lambda: call(as_(who)), DENIED, "PERMISSION_DENIED")


@pytest.mark.parametrize("who", ["professional:pro-2", "client:cl-2"])
@pytest.mark.parametrize(
    "rpc", ["GetSession", "GetPayment", "CompleteSession", "CancelSession", "PreviewCancellation"]
)
def test_a_refusal_does_not_tell_whether_the_session_exists(
    server: RunningServer, as_: Callable[[str], SessionsClient], session_of_pro1: str, rpc: str, who: str
) -> None:
    party = "client" if who.startswith("client") else "professional"
    calls = {
        "GetSession": lambda c, s: c.get_session(s),
        "GetPayment": lambda c, s: c.get_payment(s),
        "CompleteSession": lambda c, s: c.complete(s),
        "CancelSession": lambda c, s: c.cancel(s, party),
        "PreviewCancellation": lambda c, s: c.preview(s, party),
    }
    missing = "00000000-0000-0000-0000-000000000000"
    theirs = refuse(server, lambda: calls[rpc](as_(who), session_of_pro1), DENIED, "PERMISSION_DENIED")
    nobodys = refuse(server, lambda: calls[rpc](as_(who), missing), DENIED, "PERMISSION_DENIED")
    assert theirs.message.replace(session_of_pro1, "ID") == nobodys.message.replace(missing, "ID")


def test_a_service_is_told_a_session_does_not_exist(as_: Callable[[str], SessionsClient]) -> None:
    with pytest.raises(KaraError) as err:
        as_("service:workstation").get_session("no-such-session")
    assert err.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("who", "as_party"), [("client:cl-1", "professional"), ("professional:pro-1", "client")]
)
def test_cancelled_by_must_agree_with_the_principal(
    server: RunningServer, as_: Callable[[str], SessionsClient], session_of_pro1: str, who: str, as_party: str
) -> None:
    err = refuse(server, lambda: as_(who).cancel(session_of_pro1, as_party), DENIED, "PERMISSION_DENIED")
    assert err.metadata["cancelled_by"] == as_party.upper()


def test_a_client_cannot_tick_the_charge_box_or_backdate_notice(
    server: RunningServer, as_: Callable[[str], SessionsClient], session_of_pro1: str, clock: FakeClock
) -> None:
    client = as_("client:cl-1")
    refuse(
        server,
        lambda: client.cancel(session_of_pro1, "client", charge_client=True),
        grpc.StatusCode.INVALID_ARGUMENT,
        "CLIENT_CANNOT_CHARGE",
    )
    refuse(
        server,
        lambda: client.cancel(session_of_pro1, "client", notified_at=clock.now()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "NOTIFIED_AT_NOT_ALLOWED",
    )


@pytest.mark.parametrize("who", ["professional:pro-1", "client:cl-1"])
def test_only_a_service_grants_credits(
    server: RunningServer, as_: Callable[[str], SessionsClient], who: str
) -> None:
    refuse(server, lambda: as_(who).grant_credits("cl-1", 5), DENIED, "PERMISSION_DENIED")


def test_a_professional_manages_their_own_sessions(
    server: RunningServer, as_: Callable[[str], SessionsClient], clock: FakeClock
) -> None:
    """The article's "client emailed late" row, done by the professional themselves."""
    as_("service:workstation").grant_credits("cl-1", 2)
    pro = as_("professional:pro-1")
    session_id = pro.book("cl-1", "pro-1", clock.now() + LATER).session_id
    assert [s.session_id for s in pro.list_sessions("pro-1", "", None).sessions] == [session_id]
    clock.advance(LATER - timedelta(hours=2))
    emailed = clock.now() - timedelta(hours=1)
    done = pro.cancel(session_id, "professional", charge_client=True, notified_at=emailed, reason="email")
    assert done.payment.section == 2  # PAYMENT_SECTION_PAID
    assert [p.session_id for p in pro.list_payments("pro-1", "paid").payments] == [session_id]
    assert pro.get_payment(session_id).session_id == session_id
    audit = [r for r in db_snapshot(server)["audit_log"] if r["action"] == "CANCEL"]
    assert [(r["actor"], r["principal"]) for r in audit] == [("PROFESSIONAL", "professional:pro-1")]
    refuse(server, lambda: pro.get_credit_account("cl-1"), DENIED, "PERMISSION_DENIED")
    refuse(server, lambda: pro.list_payments("pro-2", "paid"), DENIED, "PERMISSION_DENIED")
    refuse(server, lambda: pro.list_sessions("", "cl-1", None), DENIED, "PERMISSION_DENIED")


def test_a_client_cancels_their_own_session_and_sees_their_credits(
    server: RunningServer, as_: Callable[[str], SessionsClient], session_of_pro1: str
) -> None:
    client = as_("client:cl-1")
    done = client.cancel(session_of_pro1, "client", reason="can't make it")
    assert done.session.state == 2  # SESSION_STATE_CANCELLED_VOIDED: three days' notice
    account = client.get_credit_account("cl-1")
    assert (account.available, account.held) == (3, 0)
    audit = db_snapshot(server)["audit_log"]
    assert [(r["action"], r["principal"]) for r in audit] == [
        ("BOOK", "service:workstation"),
        ("CANCEL", "client:cl-1"),
    ]
    refuse(server, lambda: client.complete(session_of_pro1), DENIED, "PERMISSION_DENIED")
    refuse(server, lambda: client.list_payments("pro-1", "unpaid"), DENIED, "PERMISSION_DENIED")


def test_a_request_id_replays_only_for_the_principal_that_sent_it(
    server: RunningServer, as_: Callable[[str], SessionsClient], session_of_pro1: str
) -> None:
    first = as_("service:workstation").cancel(session_of_pro1, "client", request_id="rid-1")
    assert as_("service:workstation").cancel(session_of_pro1, "client", request_id="rid-1") == first
    refused = refuse(
        server,
        lambda: as_("client:cl-1").cancel(session_of_pro1, "client", request_id="rid-1"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
    )
    # The same parameters from another caller: the message must not claim they differ.
    assert "by another caller" in refused.message, refused.message


def _routable_address() -> str:
    """An address of this machine that is not loopback, or skip."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1; nothing is sent
            return str(s.getsockname()[0])
        except OSError:
            return "0.0.0.0"


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "HOST:0"])
def test_no_plaintext_unauthenticated_listening_beyond_loopback(tmp_path: Path, listen: str) -> None:
    listen = listen.replace("HOST", _routable_address())
    settings = Settings(listen=listen, database_url=f"sqlite:///{tmp_path / 'k.db'}")
    with pytest.raises(ValueError, match=r"refusing to listen .* without TLS"):
        start(settings)
    assert not (tmp_path / "k.db").exists(), "refused before touching the database"
    running = start(
        Settings(listen=listen.replace(":0", ":0"), database_url=settings.database_url, insecure=True)
    )
    running.stop(grace=0)


def test_a_malformed_tokens_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "tokens.toml"
    bad.write_text('[[tokens]]\nprincipal = "admin:root"\nsha256 = "' + "0" * 64 + '"\n')
    with pytest.raises(ValueError, match="not a principal"):
        TokenTable.load(bad)
    bad.write_text('[[tokens]]\nprincipal = "service"\nsha256 = "plaintext-token"\n')
    with pytest.raises(ValueError, match="64 hex digits"):
        TokenTable.load(bad)


def test_an_oversized_message_is_refused_before_it_is_read(
    server: RunningServer, as_: Callable[[str], SessionsClient], session_of_pro1: str
) -> None:
    with pytest.raises(KaraError) as err:
        as_("service:workstation").cancel(session_of_pro1, "client", reason="x" * (2 * 1024 * 1024))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_token_new_prints_a_token_and_the_entry_that_admits_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    from kara_sessions_server.domain.principal import Principal

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kara_sessions_client.cli",
            "token",
            "new",
            "client:cl-9",
            "--note",
            'say "hi"',
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token = done.stdout.strip()
    (tmp_path / "tokens.toml").write_text(done.stderr)
    table = TokenTable.load(tmp_path / "tokens.toml")
    assert table.principal_for(token) == Principal.parse("client:cl-9")
    assert table.principal_for(token + "x") is None
    assert token not in (tmp_path / "tokens.toml").read_text()


@pytest.mark.parametrize("rpc", ["GetInvoice", "AddToInvoice", "RemoveFromInvoice", "SubmitInvoice"])
def test_a_refusal_does_not_tell_whether_the_invoice_exists(
    server: RunningServer,
    as_: Callable[[str], SessionsClient],
    session_of_pro1: str,
    invoice_of_pro1: str,
    rpc: str,
) -> None:
    other = as_("professional:pro-2")
    missing = "00000000-0000-0000-0000-000000000000"
    theirs = refuse(server, lambda: every_rpc(session_of_pro1, invoice_of_pro1)[rpc](other), DENIED, None)
    nobodys = refuse(server, lambda: every_rpc(session_of_pro1, missing)[rpc](other), DENIED, None)
    assert theirs.message.replace(invoice_of_pro1, "ID") == nobodys.message.replace(missing, "ID")


def test_a_professional_invoices_only_their_own_sessions(
    server: RunningServer, as_: Callable[[str], SessionsClient], clock: FakeClock
) -> None:
    """Another professional's paid session reads, to pro-1, like one that does not exist."""
    svc = as_("service:workstation")
    svc.grant_credits("cl-2", 1)
    theirs = svc.book("cl-2", "pro-2", clock.now() + timedelta(hours=5)).session_id
    svc.cancel(theirs, "client")
    pro = as_("professional:pro-1")
    missing = "00000000-0000-0000-0000-000000000000"
    denied = refuse(server, lambda: pro.create_invoice("pro-1", [theirs]), DENIED, "PERMISSION_DENIED")
    nobodys = refuse(server, lambda: pro.create_invoice("pro-1", [missing]), DENIED, "PERMISSION_DENIED")
    assert denied.message.replace(theirs, "ID") == nobodys.message.replace(missing, "ID")
    refuse(server, lambda: as_("client:cl-2").create_invoice("pro-2", [theirs]), DENIED, "PERMISSION_DENIED")


def test_a_professional_manages_their_own_invoices(
    server: RunningServer, as_: Callable[[str], SessionsClient], invoice_of_pro1: str
) -> None:
    pro = as_("professional:pro-1")
    assert [i.invoice_id for i in pro.list_invoices("pro-1").invoices] == [invoice_of_pro1]
    assert pro.submit_invoice(invoice_of_pro1).state == 2  # INVOICE_STATE_SUBMITTED
    audit = db_snapshot(server)["invoice_audit"]
    assert [(r["action"], r["principal"]) for r in audit] == [
        ("CREATE", "professional:pro-1"),
        ("SUBMIT", "professional:pro-1"),
    ]
    refuse(server, lambda: pro.list_invoices("pro-2"), DENIED, "PERMISSION_DENIED")
    refuse(server, lambda: as_("client:cl-1").get_invoice(invoice_of_pro1), DENIED, "PERMISSION_DENIED")
