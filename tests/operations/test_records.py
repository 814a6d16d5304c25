"""Each domain record is declared once, by its dataclass; entrypoints/records.py checks that its
table row, stored snapshot and protobuf message keep every field (issue 34). `make lint` and
every server start run that check; here it is shown to pass, and to catch a field forgotten by
a row, a snapshot or a message."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_server.domain.model import Waiver
from kara_sessions_server.entrypoints import records
from kara_sessions_server.entrypoints.grpc import convert


def test_every_record_keeps_every_field_in_its_rows_snapshots_and_messages() -> None:
    assert records.problems() == []


@dataclasses.dataclass(frozen=True)
class _GrownWaiver:
    """Waiver with a field added to the record and to nothing else."""

    waived_at: datetime
    waived_by: str
    reason: str
    appeal_until: timedelta = timedelta(0)


def test_a_field_a_mapping_forgets_is_named() -> None:
    def to_row(w: _GrownWaiver) -> tuple[object, ...]:
        return (w.waived_at, w.waived_by, w.reason)

    def from_row(row: tuple[datetime, str, str]) -> _GrownWaiver:
        return _GrownWaiver(*row)

    assert records.round_trip("waiver row", _GrownWaiver, to_row, from_row) == [
        "waiver row: appeal_until is not kept"
    ]

    def to_message(w: _GrownWaiver) -> pb.Waiver:
        return convert.waiver_pb(Waiver(w.waived_at, w.waived_by, w.reason))

    assert records.unsent("Waiver message", _GrownWaiver, to_message) == [
        "Waiver message: appeal_until is not sent (as appeal_until)"
    ]
    # The real Waiver is whole in both.
    assert records.unsent("Waiver message", Waiver, convert.waiver_pb) == []


def test_the_samples_differ_in_every_field() -> None:
    from kara_sessions_server.domain.model import Session

    first, second = records.sample(Session, 0), records.sample(Session, 1)
    for path in records._leaves(Session):
        assert records._at(first, path) != records._at(second, path), path
