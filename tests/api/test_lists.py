"""The Sessions and Payments tabs and the ledger: filters and keyset paging across pages."""

from __future__ import annotations

from datetime import timedelta

from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import SessionsClient

from ..support.clock import FakeClock


def _all_pages(fetch, items: str) -> list:  # type: ignore[no-untyped-def]
    out, token = [], ""
    while True:
        page = fetch(token)
        out.extend(getattr(page, items))
        token = page.next_page_token
        if not token:
            return out


def test_sessions_and_payments_page_through_every_row_once(kara: SessionsClient, clock: FakeClock) -> None:
    kara.grant_credits("c", 7)
    kara.grant_credits("other", 1)
    ids = [kara.book("c", "pro", clock.now() + timedelta(days=2, hours=n)).session_id for n in range(7)]
    kara.book("other", "someone-else", clock.now() + timedelta(days=2))
    clock.advance(timedelta(days=2) - timedelta(hours=1))
    for session_id in ids[:3]:
        kara.cancel(session_id, "client")  # late: paid
    kara.cancel(ids[3], "professional")  # late, not charged: voided

    sessions = _all_pages(
        lambda t: kara.list_sessions(professional_id="pro", page_size=2, page_token=t), "sessions"
    )
    assert [s.session_id for s in sessions] == ids  # oldest start first
    cancelled = _all_pages(
        lambda t: kara.list_sessions(client_id="c", state="cancelled-paid", page_size=1, page_token=t),
        "sessions",
    )
    assert [s.session_id for s in cancelled] == ids[:3]

    paid = _all_pages(lambda t: kara.list_payments("pro", "paid", page_size=2, page_token=t), "payments")
    assert [p.session_id for p in paid] == list(reversed(ids[:3]))  # most recent session first
    assert all(p.state == pb.PAYMENT_STATE_PAID for p in paid)
    unpaid = _all_pages(lambda t: kara.list_payments("pro", "unpaid", page_size=2, page_token=t), "payments")
    assert [p.session_id for p in unpaid] == list(reversed(ids[3:]))
    assert [p.state for p in unpaid] == [pb.PAYMENT_STATE_PENDING] * 3 + [pb.PAYMENT_STATE_VOIDED]


def test_sessions_with_equal_start_times_page_by_id(kara: SessionsClient, clock: FakeClock) -> None:
    kara.grant_credits("c", 5)
    when = clock.now() + timedelta(days=1)
    ids = sorted(kara.book("c", "pro", when).session_id for _ in range(5))
    listed = _all_pages(
        lambda t: kara.list_sessions(professional_id="pro", page_size=2, page_token=t), "sessions"
    )
    assert [s.session_id for s in listed] == ids


def test_ledger_pages_newest_first(kara: SessionsClient, clock: FakeClock) -> None:
    for n in range(5):
        kara.grant_credits("c", n + 1, request_id=f"g-{n}")
    entries = _all_pages(lambda t: kara.get_credit_account("c", page_size=2, page_token=t), "entries")
    assert [e.request_id for e in entries] == [f"g-{n}" for n in reversed(range(5))]
    assert kara.get_credit_account("c").available == 15
