"""Requests no careful caller would send, generated from the protobuf descriptors for every RPC:
any field set or not, unknown enum numbers, timestamps and durations out of range, huge,
control-character and NUL strings, forged page tokens and cursors, raw bytes. Whatever comes,
the answer is never INTERNAL or UNKNOWN, nothing is logged as an ERROR, and a refused mutation
changes nothing."""

from __future__ import annotations

import base64
import json
import logging
import threading
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kara_sessions_client.client import SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer

from ..support.clock import FakeClock
from ..support.database import assert_ledger_balances, db_snapshot
from ..support.foreign import (
    SERVER_FAULTS,
    World,
    api_methods,
    make_world,
    message_class,
    raw_bytes_call,
    raw_call,
    valid_request,
)

METHODS = api_methods()
EXAMPLES = 300


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["q", "k", "x"]), inner, max_size=3)
    ),
    max_leaves=6,
)
FORGED = st.one_of(
    JSON.map(lambda v: _b64(json.dumps(v).encode())),
    st.binary(max_size=24).map(_b64),
    st.from_regex(r"[0-9+_ .-]{0,24}", fullmatch=True).map(lambda t: _b64(t.encode())),
)
ODD = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "a\x00b",
        "\x1b[2J\x1b]0;owned\x07",
        "\r\n",
        "\u202e",
        "💥",
        "'; DROP TABLE sessions;--",
    ]
)


def strings(world: World) -> st.SearchStrategy[str]:
    ids = [
        world.booked,
        world.started,
        world.paid,
        world.invoiced,
        world.invoice,
        world.client,
        world.professional,
    ]
    real = st.sampled_from([*ids, "default", "kara.sessions.v1.session.cancelled", "display_name", "*"])
    return st.one_of(
        real,
        ODD,
        ODD,
        FORGED,
        FORGED,
        st.text(max_size=30),
        # Around the 1000-character limit, and far past it (past the 128 of an id too).
        st.integers(990, 1010).map(lambda n: "é" * n),
        st.integers(10_000, 200_000).map(lambda n: "x" * n),
    )


INT = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}


def scalar(field: FieldDescriptor, text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return text
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    if field.type in INT:
        low, high = INT[field.type]
        small = st.integers(max(low, -5), min(high, 2_000))
        return st.one_of(small, st.integers(low, high), st.sampled_from([low, high]))
    raise AssertionError(f"no strategy for {field.full_name}")


@st.composite
def message(draw: st.DrawFn, descriptor: Descriptor, text: st.SearchStrategy[str], depth: int = 0) -> Message:
    msg = message_class(descriptor.full_name)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2:
                continue
            count = draw(st.integers(1, 3)) if field.is_repeated else 1
            for _ in range(count):
                sub = draw(message(field.message_type, text, depth + 1))
                if field.is_repeated:
                    getattr(msg, field.name).add().CopyFrom(sub)
                else:
                    getattr(msg, field.name).CopyFrom(sub)
        elif field.is_repeated:
            getattr(msg, field.name).extend(draw(st.lists(scalar(field, text), max_size=4)))
        else:
            setattr(msg, field.name, draw(scalar(field, text)))
    return msg


def _set(draw: st.DrawFn, msg: Message, field: FieldDescriptor, text: st.SearchStrategy[str]) -> None:
    msg.ClearField(field.name)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        count = draw(st.integers(1, 3)) if field.is_repeated else 1
        for _ in range(count):
            sub = draw(message(field.message_type, text, 1))
            target = getattr(msg, field.name)
            (target.add() if field.is_repeated else target).CopyFrom(sub)
    elif field.is_repeated:
        getattr(msg, field.name).extend(draw(st.lists(scalar(field, text), max_size=4)))
    else:
        setattr(msg, field.name, draw(scalar(field, text)))


def _leaves(msg: Message) -> list[tuple[Message, FieldDescriptor]]:
    """Every field of `msg` and of the sub-messages it has set, with the message holding it."""
    found: list[tuple[Message, FieldDescriptor]] = []
    for field in msg.DESCRIPTOR.fields:
        found.append((msg, field))
        if field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated and msg.HasField(field.name):
            found.extend(_leaves(getattr(msg, field.name)))
    return found


@st.composite
def perturbed(
    draw: st.DrawFn, method: MethodDescriptor, world: World, text: st.SearchStrategy[str]
) -> Message:
    """A well-formed request with one to three fields, at any depth, made odd: the kind of
    request that passes the easy checks and reaches the database. Text fields are chosen most
    often: they carry free text, ids, tokens and cursors."""
    msg = valid_request(method, world)
    for _ in range(draw(st.integers(1, 3))):
        leaves = _leaves(msg)
        texts = [leaf for leaf in leaves if leaf[1].type == FieldDescriptor.TYPE_STRING]
        holder, field = draw(st.sampled_from(texts if texts and draw(st.integers(0, 3)) else leaves))
        _set(draw, holder, field, text)
    return msg


def _status(call: Any, request: object, streaming: bool) -> grpc.StatusCode:
    try:
        result = call(request, timeout=30)
        if streaming:
            # A well-formed stream would wait for events for ever: its first answer is enough.
            timer = threading.Timer(0.3, result.cancel)
            timer.start()
            try:
                next(result, None)
            finally:
                timer.cancel()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _is_mutation(method: MethodDescriptor) -> bool:
    return "request_id" in method.input_type.fields_by_name and not method.name.startswith("Preview")


def test_every_request_message_has_a_strategy() -> None:
    """The generator covers every field type the API uses, so a new field cannot slip past."""
    for method in METHODS:
        stack = [method.input_type]
        while stack:
            descriptor = stack.pop()
            for field in descriptor.fields:
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    stack.append(field.message_type)
                else:
                    scalar(field, st.just(""))


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streams"])
def test_generated_requests_never_fail_the_server(
    server: RunningServer,
    kara: SessionsClient,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    streaming: bool,
) -> None:
    world = make_world(kara, clock, spare_credits=50)
    methods = [m for m in METHODS if m.server_streaming == streaming]
    text = strings(world)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    refused_mutations = 0

    @settings(
        max_examples=EXAMPLES if not streaming else EXAMPLES // 5,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )
    @given(data=st.data())
    def one(data: st.DataObject) -> None:
        nonlocal refused_mutations
        method = data.draw(st.sampled_from(methods), label="method")
        kind = data.draw(st.sampled_from(["perturbed", "perturbed", "random", "bytes"]), label="kind")
        if kind == "bytes":
            request: object = data.draw(st.binary(min_size=1, max_size=64), label="bytes")
            call = raw_bytes_call(channel, method)
        else:
            shape = (
                perturbed(method, world, text) if kind == "perturbed" else message(method.input_type, text)
            )
            request = data.draw(shape, label="request")
            call = raw_call(channel, method)
        mutation = _is_mutation(method)
        before = db_snapshot(server) if mutation else None
        code = _status(call, request, method.server_streaming)
        assert code not in SERVER_FAULTS, (method.name, code, request)
        if mutation and code != grpc.StatusCode.OK:
            refused_mutations += 1
            assert db_snapshot(server) == before, f"a refused {method.name} changed the database"

    try:
        one()
    finally:
        channel.close()
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert_ledger_balances(server)
    if not streaming:
        assert refused_mutations > 0, "the generator never reached a refusal"
