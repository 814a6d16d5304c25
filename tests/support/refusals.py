"""Asserting a refusal: its status code, its reason, a message a person can act on, and that the
database is exactly as it was."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from kara_sessions_client.client import KaraError
from kara_sessions_server.entrypoints.grpc.server import RunningServer

from .database import db_snapshot

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def refuse(
    server: RunningServer, call: Callable[[], Any], code: grpc.StatusCode, reason: str | None
) -> KaraError:
    before = db_snapshot(server)
    with pytest.raises(KaraError) as refused:
        call()
    assert refused.value.code == code, refused.value
    if reason is not None:
        assert refused.value.reason == reason, refused.value
    assert refused.value.message, "a person needs a message to act on"
    assert "Traceback" not in refused.value.message
    assert db_snapshot(server) == before, "a refused request changed the database"
    return refused.value
