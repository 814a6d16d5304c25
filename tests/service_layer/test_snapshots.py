"""Stored results (a request_id's replay, an event's data) written by earlier versions still load."""

from __future__ import annotations

import json

from kara_sessions_server.domain.model import Payment, Session
from kara_sessions_server.entrypoints.records import sample
from kara_sessions_server.service_layer import snapshots


def test_a_settlement_is_stored_without_its_payment_and_loads_with_it() -> None:
    session = sample(Session, 0)
    raw = snapshots.dump_settlement((session, Payment.of(session)))
    assert set(json.loads(raw)) == {"session"}
    assert snapshots.load_settlement(raw) == (session, Payment.of(session))


def test_a_settlement_stored_by_0_10_with_its_payment_loads_the_same() -> None:
    session = sample(Session, 1)
    # 0.10.0 stored the payment beside the session (a part of it shown here); it is not read.
    stored = {"session": json.loads(snapshots.dump_session(session)), "payment": {"state": "PAID"}}
    assert snapshots.load_settlement(json.dumps(stored)) == (session, Payment.of(session))
