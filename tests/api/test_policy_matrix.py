"""The help-centre article's five rows, end to end through the gRPC server on SQLite and
PostgreSQL. Each case is named after the article's scenario so it can be checked against it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import pytest
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer

from ..support.booking import book
from ..support.clock import FakeClock
from ..support.database import assert_ledger_balances


@dataclass(frozen=True)
class Row:
    cancelled_by: str
    notice: timedelta
    charge_client: bool
    session_state: int
    payment_state: int
    section: int
    # client's balance after the cancellation: (available, held, used), from one granted credit
    balance_after: tuple[int, int, int]


VOIDED_RETURNED = (
    pb.SESSION_STATE_CANCELLED_VOIDED,
    pb.PAYMENT_STATE_VOIDED,
    pb.PAYMENT_SECTION_UNPAID,
    (1, 0, 0),
)
PAID_TAKEN = (pb.SESSION_STATE_CANCELLED_PAID, pb.PAYMENT_STATE_PAID, pb.PAYMENT_SECTION_PAID, (0, 0, 1))

ARTICLE = {
    "client cancels with more than 24 hours notice: voided, credit returned": Row(
        "client", timedelta(hours=30), False, *VOIDED_RETURNED
    ),
    "professional cancels with more than 24 hours notice, box not ticked: voided, credit returned": Row(
        "professional", timedelta(hours=30), False, *VOIDED_RETURNED
    ),
    "client cancels with less than 24 hours notice: paid, credit taken automatically": Row(
        "client", timedelta(hours=3), False, *PAID_TAKEN
    ),
    "scenario 1: client emailed late, professional ticks the charge box: paid, credit taken": Row(
        "professional", timedelta(hours=3), True, *PAID_TAKEN
    ),
    "scenario 2: professional cancels late, box not ticked: voided, credit returned": Row(
        "professional", timedelta(hours=3), False, *VOIDED_RETURNED
    ),
}


@pytest.mark.parametrize("row", ARTICLE.values(), ids=ARTICLE.keys())
def test_article_row(kara: SessionsClient, clock: FakeClock, server: RunningServer, row: Row) -> None:
    session_id = book(kara, clock, starts_in=timedelta(days=5))
    account = kara.get_credit_account("client-1")
    assert (account.available, account.held, account.used) == (0, 1, 0)
    assert kara.get_payment(session_id).state == pb.PAYMENT_STATE_PENDING

    starts_at = kara.get_session(session_id).starts_at.ToDatetime().replace(tzinfo=clock.now().tzinfo)
    clock.set(starts_at - row.notice)
    result = kara.cancel(session_id, row.cancelled_by, charge_client=row.charge_client, reason="article")

    assert result.session.state == row.session_state
    assert result.payment.state == row.payment_state
    assert result.payment.section == row.section
    assert result.session.cancellation.notice_seconds == int(row.notice.total_seconds())
    assert result.session.cancellation.late == (row.notice < timedelta(hours=24))
    # Sessions tab: the session is visibly cancelled; Payments tab: it is in the right section.
    assert kara.get_session(session_id).state == row.session_state
    details = kara.get_payment(session_id)
    assert (details.state, details.section, details.credits) == (row.payment_state, row.section, 1)
    assert details.cancellation.cancelled_by == pb.Party.Value(f"PARTY_{row.cancelled_by.upper()}")
    assert details.cancellation.charge_client == row.charge_client
    listed = kara.list_payments("pro-1", "paid" if row.section == pb.PAYMENT_SECTION_PAID else "unpaid")
    assert [p.session_id for p in listed.payments] == [session_id]

    account = kara.get_credit_account("client-1")
    assert (account.available, account.held, account.used) == row.balance_after
    expected_move = "LEDGER_ENTRY_KIND_TAKE" if row.balance_after[2] else "LEDGER_ENTRY_KIND_RETURN"
    kinds = [pb_kind_name(e.kind) for e in account.entries]
    assert kinds == [expected_move, "LEDGER_ENTRY_KIND_HOLD", "LEDGER_ENTRY_KIND_GRANT"]
    assert_ledger_balances(server)


def pb_kind_name(kind: int) -> str:
    from kara.sessions.v1 import credits_pb2

    return str(credits_pb2.LedgerEntryKind.Name(kind))


@pytest.mark.parametrize("row", ARTICLE.values(), ids=ARTICLE.keys())
def test_preview_predicts_the_article_row_and_changes_nothing(
    kara: SessionsClient, clock: FakeClock, row: Row
) -> None:
    session_id = book(kara, clock, starts_in=timedelta(days=5))
    clock.advance(timedelta(days=5) - row.notice)
    preview = kara.preview(session_id, row.cancelled_by, charge_client=row.charge_client)
    assert (preview.session_state, preview.payment_state, preview.payment_section) == (
        row.session_state,
        row.payment_state,
        row.section,
    )
    assert preview.late == (row.notice < timedelta(hours=24))
    assert preview.notice_seconds == int(row.notice.total_seconds())
    assert (preview.credits_returned, preview.credits_taken) == (
        (1, 0) if row.payment_state == pb.PAYMENT_STATE_VOIDED else (0, 1)
    )
    assert kara.get_session(session_id).state == pb.SESSION_STATE_BOOKED
    account = kara.get_credit_account("client-1")
    assert (account.available, account.held, account.used) == (0, 1, 0)
