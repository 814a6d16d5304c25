"""A reused request_id with any one field changed is refused, for every mutation of the API
(issue 34). The mutations and their fields come from the protobuf descriptors, so a new RPC or a
new field is tried here without an edit: a field the server leaves out of the fingerprint would
replay the first result instead of being refused, and fail this test.

Each request is made once (it commits), then again under the same request_id with one field
changed: INVALID_ARGUMENT, reason REQUEST_ID_REUSED, and the database as it was. SQLite only:
the fingerprint is made above the database, which only stores it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from kara_sessions_client.client import SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer

from ..support.clock import FakeClock
from ..support.database import db_snapshot
from ..support.foreign import World, api_methods, make_world, message_class, raw_call, valid_request

# Every RPC whose request carries a request_id changes something; the previews share their
# request messages with CancelSession and RescheduleSession, and change nothing.
MUTATIONS = [
    m
    for m in api_methods()
    if "request_id" in m.input_type.fields_by_name and not m.name.startswith("Preview")
]
# Fields a request may carry that the server ignores by design (AIP-203: output only), so a
# change to them is the same request.
IGNORED = {
    "CreateProgramme": {
        "programme.programme_id",
        "programme.etag",
        "programme.create_time",
        "programme.update_time",
    },
    "UpdateProgramme": {"programme.create_time", "programme.update_time"},
}
# Fields of which a request sets exactly one: the other is tried from a request that sets it.
ONE_OF = {"CreateInvoice": {"session_ids", "up_to"}}
OTHER_PROGRAMME = "fp-other"


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'kara.db'}"


@pytest.fixture
def world(kara: SessionsClient, clock: FakeClock) -> Iterator[World]:
    kara.create_programme(OTHER_PROGRAMME, "Another programme", timedelta(hours=48))
    yield make_world(kara, clock, spare_credits=4)


def _bases(method: MethodDescriptor, w: World, kara: SessionsClient) -> list[Callable[[], Message]]:
    """The requests to vary, each made when its turn comes: the suite's valid one, and for a
    one-of, one setting each."""
    base = valid_request(method, w)
    if method.name == "CreateInvoice":
        return [
            lambda: base,
            lambda: type(base)(professional_id=w.professional, session_ids=[_paid_session(w, kara)]),
        ]
    if method.name == "UpdateProgramme":
        # Every mutable field under the mask, so that each one changed is a change.
        base.update_mask.paths[:] = ["*"]
        base.programme.notice_window.FromTimedelta(timedelta(hours=24))
        base.programme.professional_may_charge_late = True
        base.programme.no_show_takes_credit = True
        base.programme.late_reschedule = 1
    return [lambda: base]


def _paths(
    message: Message, descriptor: Descriptor, prefix: str = ""
) -> Iterator[tuple[str, FieldDescriptor]]:
    """Each field to change, by its path: a message field's own fields, but not the well-known
    values (times, durations, masks), which change as a whole."""
    for field in descriptor.fields:
        name = f"{prefix}{field.name}"
        kind = field.message_type
        if kind is not None and kind.full_name.startswith("kara."):
            yield from _paths(getattr(message, field.name), kind, f"{name}.")
        elif name != "request_id":
            yield name, field


def _changed(request: Message, path: str, field: FieldDescriptor, w: World, kara: SessionsClient) -> Message:
    """`request` with the field at `path` given another valid value."""
    changed = type(request)()
    changed.CopyFrom(request)
    *parents, name = path.split(".")
    holder = changed
    for parent in parents:
        holder = getattr(holder, parent)
    value = getattr(holder, name)
    if field.is_repeated:
        other = next(s for s in (w.paid, w.booked, w.started) if s not in value)
        value[:] = [other]
    elif field.message_type is not None:
        _changed_value(value, w)
    elif field.enum_type is not None:
        # The last value: never the one UNSPECIFIED stands for (the first), which is no change.
        choices = [v.number for v in field.enum_type.values if v.number not in (0, value)]
        setattr(holder, name, choices[-1])
    elif field.type == FieldDescriptor.TYPE_BOOL:
        setattr(holder, name, not value)
    elif field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64):
        setattr(holder, name, value + 1)
    else:
        setattr(holder, name, _other_string(name, value, w, kara))
    return changed


def _changed_value(value: Message, w: World) -> None:
    if isinstance(value, Timestamp):
        # Unset (notified_at): a minute ago, after every booking of the world.
        value.FromDatetime(
            value.ToDatetime(tzinfo=UTC) + timedelta(hours=1)
            if value.seconds
            else w.now - timedelta(minutes=1)
        )
    elif isinstance(value, Duration):
        # Unset: a day, which every duration term allows (a grace of at most one, a period of
        # at least one).
        value.FromTimedelta(value.ToTimedelta() + timedelta(hours=1) if value.seconds else timedelta(days=1))
    elif isinstance(value, FieldMask):
        value.paths[:] = ["display_name"]
    else:
        raise AssertionError(f"no other value for a {type(value).__name__}")


def _other_string(name: str, value: str, w: World, kara: SessionsClient) -> str:
    """Another id of something that exists (a missing one is NOT_FOUND whatever the fingerprint
    says), or other text."""
    others = {
        "session_id": lambda: w.booked if value != w.booked else w.paid,
        "client_id": lambda: f"{w.client}-2",
        "professional_id": lambda: f"{w.professional}-2",
        "programme_id": lambda: OTHER_PROGRAMME if value != OTHER_PROGRAMME else "default",
        "invoice_id": lambda: kara.create_invoice(w.professional, [_paid_session(w, kara)]).invoice_id,
        "etag": lambda: kara.get_programme("default").etag,
    }
    return others.get(name, lambda: f"{value} (changed)")()


def _paid_session(w: World, kara: SessionsClient) -> str:
    """Another session of the world's professional, cancelled late by the client: PAID."""
    late = kara.book(w.client, w.professional, w.now + timedelta(hours=4)).session_id
    kara.cancel(late, "client")
    return late


def _unset(request: Message, name: str) -> bool:
    field = request.DESCRIPTOR.fields_by_name[name]
    if field.is_repeated:
        return not getattr(request, name)
    return not request.HasField(name)


def _refusal(call: object, request: Message) -> tuple[grpc.StatusCode, str]:
    try:
        call(request)  # type: ignore[operator]
    except grpc.RpcError as exc:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
        reasons = [
            info.reason
            for detail in (status.details if status else [])
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)
            and detail.Unpack(info := error_details_pb2.ErrorInfo())
        ]
        return exc.code(), (reasons or [""])[0]  # type: ignore[no-any-return]
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("method", MUTATIONS, ids=lambda m: m.name)
def test_a_reused_request_id_with_any_one_field_changed_is_refused_and_changes_nothing(
    method: MethodDescriptor, server: RunningServer, kara: SessionsClient, world: World
) -> None:
    tried: set[str] = set()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = raw_call(channel, method)
        for n, make in enumerate(_bases(method, world, kara)):
            base = make()
            base.request_id = f"reuse-{method.name}-{n}"
            call(base)  # the first use commits
            for path, field in _paths(base, method.input_type):
                if path in IGNORED.get(method.name, ()) or (
                    path in ONE_OF.get(method.name, ()) and _unset(base, path)
                ):
                    continue
                changed = _changed(base, path, field, world, kara)
                before = db_snapshot(server)
                assert _refusal(call, changed) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED"), (
                    path
                )
                assert db_snapshot(server) == before, path
                tried.add(path)
            # And the very same request again is its first answer.
            assert _refusal(call, base) == (grpc.StatusCode.OK, "")
    every = {path for path, _ in _paths(message_class(method.input_type.full_name)(), method.input_type)}
    assert tried == every - IGNORED.get(method.name, set())
