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
