"""What `kara-sessions relay` needs of a message broker, and nothing of any one broker: the
relay's loop (relay.py) speaks only this; nats_broker.py is the JetStream one. Another broker
(RabbitMQ with publisher confirms and message_id, Kafka with idempotent producers) would be a
module beside it answering the same five calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Stored:
    """The newest event the broker holds: the relay resumes after its cursor."""

    event_id: str
    cursor: str


class Unavailable(Exception):
    """The broker cannot be reached or cannot store right now; the same publish may be retried
    (the event id makes a repeat harmless)."""


class OutOfOrder(Exception):
    """The broker's newest event is not the one this publish follows: another relay got there
    first. The relay resumes from what the broker holds."""


class Broker(Protocol):
    #: Where it is, for log lines ("nats://127.0.0.1:4222").
    where: str
    #: How an operator empties what the relay publishes to, to start over ("purge the stream ...").
    empty_it: str

    async def connect(self) -> None:
        """Raises Unavailable."""

    async def ensure_stream(self) -> None:
        """Creates the stream if it is missing; an existing one is used as it is configured."""

    async def last(self) -> Stored | None:
        """The newest event stored, or None for an empty stream."""

    async def publish(self, subject: str, body: bytes, event: Stored, after: str | None) -> bool:
        """Stores `body` once per event id, only directly after the event `after` (None: no such
        check). True if the broker had it already. Raises Unavailable or OutOfOrder."""

    async def close(self) -> None: ...
