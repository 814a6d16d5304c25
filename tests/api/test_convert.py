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
