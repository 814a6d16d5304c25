"""The API as callers no one here wrote use it: grpcurl, Go, Java and Node send no deadline by
default, no metadata unless told, and bursts larger than the server's worker pool. Nothing a
caller can send on purpose is answered INTERNAL or UNKNOWN, or logged as an ERROR."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor

from kara_sessions_client.client import SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer

from ..support.clock import FakeClock
from ..support.foreign import SERVER_FAULTS, World, api_methods, make_world, outcome, raw_call, valid_request

WORKERS = 8  # the `server` fixture's max_workers
BURST = 3 * WORKERS


@pytest.fixture
def world(kara: SessionsClient, clock: FakeClock) -> World:
    return make_world(kara, clock, spare_credits=BURST)


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("method", api_methods(), ids=lambda m: m.name)
def test_a_burst_without_deadlines_above_the_worker_count_is_served(
    channel: grpc.Channel, world: World, method: MethodDescriptor, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 23: a call with no deadline that waited for a worker got INTERNAL (OverflowError
    from a 9.2e18-second wait). Every call of the burst shares one connection, as a client
    library's channel does."""
    call = raw_call(channel, method)
    with futures.ThreadPoolExecutor(BURST) as pool:
        codes = list(
            pool.map(
                lambda _: outcome(call, valid_request(method, world), method.server_streaming),
                range(BURST),
            )
        )
    counted = Counter(code.name for code in codes)
    assert not SERVER_FAULTS & set(codes), counted
    assert errors_logged(caplog) == []
    if not method.server_streaming:
        # At least one of the burst did what it asked (a cancel, say, wins once).
        assert counted["OK"] >= 1, counted
