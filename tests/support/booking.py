"""Booking a session through the client library, granting the credit it needs first."""

from __future__ import annotations

import uuid
from datetime import timedelta

from kara_sessions_client.client import SessionsClient

from .clock import FakeClock


def book(
    kara: SessionsClient,
    clock: FakeClock,
    starts_in: timedelta,
    client_id: str = "client-1",
    professional_id: str = "pro-1",
    grant: int = 1,
) -> str:
    if grant:
        kara.grant_credits(client_id, grant)
    return str(kara.book(client_id, professional_id, clock.now() + starts_in).session_id)


def new_programme(kara: SessionsClient, notice_window: timedelta, **terms: object) -> str:
    """A programme of its own (a fresh id), on `terms` as create_programme names them."""
    programme_id = f"p-{uuid.uuid4().hex[:10]}"
    kara.create_programme(programme_id, "Sponsor", notice_window, **terms)  # type: ignore[arg-type]
    return programme_id
