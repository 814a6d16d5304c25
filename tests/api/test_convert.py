"""Protobuf conversion shortcuts agree with protobuf's own, over the whole range of times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from kara_sessions_server.entrypoints.grpc.convert import timestamp

# A day inside each end of datetime's range, so that no offset takes the UTC time outside it.
aware = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30, 23, 59, 59, 999999),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]),
)


@given(aware)
def test_timestamp_is_what_from_datetime_makes(value: datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(value)
    assert timestamp(value) == expected
    assert timestamp(value).ToDatetime(tzinfo=UTC) == value


def test_timestamp_before_the_epoch_keeps_nanos_positive() -> None:
    ts = timestamp(datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC))
    assert (ts.seconds, ts.nanos) == (-1, 500_000_000)


def test_every_domain_enum_value_has_its_protobuf_value_of_the_same_name_and_back() -> None:
    from kara.sessions.v1 import sessions_pb2 as pb

    from kara_sessions_server.domain.model import SessionState
    from kara_sessions_server.entrypoints.grpc import convert

    maps = [v for k, v in vars(convert).items() if k.endswith("_TO_PB")]
    # A programme's terms are written by their own plan (fill_terms), drawn from Terms.
    assert len(maps) == 8
    for mapping in maps:
        domain = type(next(iter(mapping)))
        # Every domain value, each to a value of its own that is not the protobuf default.
        assert set(mapping) == set(domain)
        assert 0 not in mapping.values() and len(set(mapping.values())) == len(mapping)
    assert convert.SESSION_STATE_TO_PB[SessionState.NO_SHOW] == pb.SESSION_STATE_NO_SHOW
    assert convert.SESSION_STATE_FROM_PB[pb.SESSION_STATE_NO_SHOW] is SessionState.NO_SHOW


def test_an_unknown_enum_value_is_refused_with_every_value_the_field_takes() -> None:
    import pytest
    from kara.sessions.v1 import sessions_pb2 as pb

    from kara_sessions_server.domain.errors import InvalidRequest
    from kara_sessions_server.entrypoints.grpc.convert import PARTY_FROM_PB, RequestReader

    r = RequestReader(pb.CancelSessionRequest(session_id="s", cancelled_by=9))
    r.enum("cancelled_by", PARTY_FROM_PB, required=True)
    with pytest.raises(InvalidRequest) as refused:
        r.done()
    [violation] = refused.value.violations
    assert violation.description == "must be one of PARTY_CLIENT, PARTY_PROFESSIONAL"


# What 0.10.0's conversion (each part built, then copied in) made of three sessions and their
# payments, as SHA-256 of the bytes: the session, the payment, a CancelSessionResponse of both.
# "plain" has the epoch for every time and no grace: fields set to zero must still be present.
# A field added to Session changes the samples, and these with it: recompute them with the
# conversion of the commit before yours. Fields added to the terms since (issue 36) are cleared
# before hashing, and checked on their own.
TERMS_SINCE_0_10 = (
    "client_late_cancel",
    "max_reschedules",
    "free_late_cancellations",
    "forgiveness_period",
    "settle_unmarked_after",
    "unmarked_outcome",
)
# And the fields the session, the payment and a cancellation gained with them.
SINCE_0_10 = ("no_show_forgiven", "settled_automatically", "credit_expire_time", "decision")
CANCELLATION_SINCE_0_10 = ("forgiven",)
BUILT_AND_COPIED = {
    "sample0": (
        "5469b3180f9922bbec973dcdbe4f893bd851966eaf49c79ee878a7c57b26984d",
        "4a14627bc9fc1b23fa49143092e4c1dd0be8ed3ea0865019b5a32c5084ee6969",
        "cdd7858bc255f88776e0145314aabff79092dbe47e19b90cc2b21eac8ae22e6a",
    ),
    "sample1": (
        "220ca63c59323050a40559bc821a743bc4b33e456890cad0e44ce5b3bde21618",
        "1d9b9603320a8c37ccf9151f7b8ffbb3dba6b5035a0f667afe07291c41edd4a3",
        "ac8cd0a3c7da8457d63cb188b001c997b02f2c9d1e714f25ec7f60c4a8dc45a4",
    ),
    "plain": (
        "fc0228c2a9e3ea42bfb052abf716f2261cac58727daa9bd3d5bb35341949aafe",
        "9966231e0bf5d29d48b847606248687940fb49d6f1c75fe3ae525c40e4fb97d8",
        "d5a86a27052f64a109ce923765eb54139384b1d7882fe8e243e586cf738ab278",
    ),
}


def test_writing_in_place_makes_the_bytes_building_and_copying_made() -> None:
    import dataclasses
    import hashlib

    from google.protobuf.message import Message
    from kara.sessions.v1 import programmes_pb2 as ppb
    from kara.sessions.v1 import sessions_pb2 as pb

    from kara_sessions_server.adapters.storage import EPOCH
    from kara_sessions_server.domain.decisions import decision_of
    from kara_sessions_server.domain.model import Payment, Session, SessionState
    from kara_sessions_server.domain.programme import DEFAULT_TERMS
    from kara_sessions_server.entrypoints.grpc.convert import decision_pb, payment_pb, session_pb
    from kara_sessions_server.entrypoints.grpc.servicers import _settled
    from kara_sessions_server.entrypoints.records import sample

    def digest(message: Message) -> str:
        parts = [
            getattr(message, name)
            for name in ("session", "payment")
            if name in message.DESCRIPTOR.fields_by_name
        ]
        for part in parts or [message]:
            for name in TERMS_SINCE_0_10:
                part.terms.ClearField(name)
            for name in SINCE_0_10:
                if name in part.DESCRIPTOR.fields_by_name:
                    part.ClearField(name)
            for name in CANCELLATION_SINCE_0_10:
                if part.HasField("cancellation"):
                    part.cancellation.ClearField(name)
        return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()

    sessions = {
        "sample0": sample(Session, 0),
        "sample1": sample(Session, 1),
        "plain": Session("s", "c", "p", EPOCH, EPOCH, EPOCH, SessionState.BOOKED, 0, terms=DEFAULT_TERMS),
    }
    for name, session in sessions.items():
        paid = (
            dataclasses.replace(session, state=SessionState.CANCELLED_PAID)
            if session.cancellation
            else session
        )
        payment = Payment.of(paid)
        response = _settled(pb.CancelSessionResponse(), (session, payment))
        for terms in (session_pb(session).terms, payment_pb(payment).terms, response.session.terms):
            assert terms.max_reschedules == session.terms.max_reschedules
            assert terms.free_late_cancellations == session.terms.free_late_cancellations
            assert terms.forgiveness_period.ToTimedelta() == session.terms.forgiveness_period
            assert terms.client_late_cancel == ppb.ClientLateCancel.Value(
                f"CLIENT_LATE_CANCEL_{session.terms.client_late_cancel.value}"
            )
        for message in (session_pb(session), payment_pb(payment), response.session):
            assert message.no_show_forgiven == session.no_show_forgiven
        if session.cancellation:
            assert session_pb(session).cancellation.forgiven == session.cancellation.forgiven
        decision = decision_of(session)
        for message in (session_pb(session), response.session):
            assert message.HasField("decision") == (decision is not None)
            if decision is not None:
                assert message.decision == decision_pb(decision)
                assert message.decision.forgiveness_used == session.forgiveness_used
        assert (
            digest(session_pb(session)),
            digest(payment_pb(payment)),
            digest(response),
        ) == BUILT_AND_COPIED[name], name
