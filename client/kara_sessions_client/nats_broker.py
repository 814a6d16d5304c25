"""The relay's broker on NATS JetStream (the NATS project's nats-py). Exactly once rests on two
headers JetStream checks on every publish: `Nats-Msg-Id` (the event id; a repeat inside the
stream's duplicate window is acknowledged as a duplicate and not stored) and
`Nats-Expected-Last-Msg-Id` (the previous event's id; anything else is refused, so two relays
cannot interleave). Each message also carries its kara cursor, so the stream itself says where
to resume: the relay keeps no state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import Any

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

from .broker import OutOfOrder, Stored, Unavailable

log = logging.getLogger("kara_sessions_client.relay")

CURSOR_HEADER = "Kara-Cursor"
# JetStream's error code for a Nats-Expected-Last-Msg-Id that is not the stream's last.
_WRONG_LAST_MSG_ID = 10070
# At least this long, so a relay restarted within it repeats nothing into the stream.
DUPLICATE_WINDOW = timedelta(minutes=2)
CONNECT_SECONDS = 5.0


class NatsBroker:
    def __init__(self, urls: list[str], stream: str, subject_prefix: str, max_age: timedelta):
        self.urls = urls
        self.where = ",".join(urls)
        self.stream = stream
        self.empty_it = f"purge the stream (nats stream purge {stream})"
        self.subjects = [f"{subject_prefix}.>"]
        self.max_age = max_age
        self.reconnects = 0
        self._nc: Client | None = None
        self._js: nats.js.JetStreamContext | None = None
        self._closing = False
        # While a first connection is being made: its first failed attempt, said at once.
        self._first_failure: asyncio.Future[Exception] | None = None

    async def connect(self) -> None:
        self._closing = False
        self._first_failure = asyncio.get_running_loop().create_future()
        connecting = asyncio.ensure_future(
            nats.connect(
                servers=self.urls,
                connect_timeout=2,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                error_cb=self._error,
                disconnected_cb=self._disconnected,
                reconnected_cb=self._reconnected,
            )
        )
        # With reconnects unbounded, nats-py also retries a first connection for ever, telling
        # only error_cb: a refused connection (or any first failure) ends the wait at once, and
        # the relay's own backoff retries, so that the outage is logged when it begins.
        failure = self._first_failure
        waiting: set[asyncio.Future[Any]] = {connecting, failure}
        try:
            await asyncio.wait(waiting, timeout=CONNECT_SECONDS, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._first_failure = None
            gave_up = not connecting.done()
            if gave_up:
                connecting.cancel()  # also when the relay stops while it connects
        if gave_up:
            late = f"no answer within {CONNECT_SECONDS:.0f} s"
            raise Unavailable(_describe(failure.result()) if failure.done() else late)
        try:
            self._nc = connecting.result()
        except (NatsError, OSError) as exc:
            raise Unavailable(_describe(exc)) from None
        self._js = self._nc.jetstream(timeout=5)

    async def ensure_stream(self) -> None:
        js = self._jetstream()
        try:
            await js.stream_info(self.stream)
            return
        except NotFoundError:
            pass
        except (NatsError, OSError) as exc:
            raise Unavailable(_describe(exc)) from None
        config = StreamConfig(
            name=self.stream,
            subjects=self.subjects,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW.total_seconds(),
            max_age=self.max_age.total_seconds(),
        )
        try:
            await js.add_stream(config)
        except APIError as exc:
            if exc.err_code != 10058:  # created by another relay meanwhile: "stream name already in use"
                raise Unavailable(_describe(exc)) from None
        except (NatsError, OSError) as exc:
            raise Unavailable(_describe(exc)) from None
        log.info("created the JetStream stream %s (subjects %s)", self.stream, ", ".join(self.subjects))

    async def last(self) -> Stored | None:
        js = self._jetstream()
        try:
            info = await js.stream_info(self.stream)
            if not info.state.messages:
                return None
            message = await js.get_msg(self.stream, info.state.last_seq)
        except (NatsError, OSError) as exc:
            raise Unavailable(_describe(exc)) from None
        headers = message.headers or {}
        return Stored(headers.get("Nats-Msg-Id", ""), headers.get(CURSOR_HEADER, ""))

    async def publish(self, subject: str, body: bytes, event: Stored, after: str | None) -> bool:
        headers = {"Nats-Msg-Id": event.event_id, CURSOR_HEADER: event.cursor}
        if after is not None:
            headers["Nats-Expected-Last-Msg-Id"] = after
        try:
            ack = await self._jetstream().publish(subject, body, headers=headers, stream=self.stream)
        except APIError as exc:
            if exc.err_code == _WRONG_LAST_MSG_ID:
                raise OutOfOrder(exc.description or "wrong last msg id") from None
            raise Unavailable(_describe(exc)) from None
        except (NatsError, OSError) as exc:
            raise Unavailable(_describe(exc)) from None
        return bool(ack.duplicate)

    async def close(self) -> None:
        self._closing = True
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(NatsError, OSError):  # a connection already gone
                await self._nc.close()

    def _jetstream(self) -> nats.js.JetStreamContext:
        if self._js is None:
            raise Unavailable("not connected")
        return self._js

    async def _error(self, exc: Exception) -> None:
        # nats-py reports every failed reconnect attempt here; the outage is logged once.
        log.debug("NATS: %s", _describe(exc))
        if self._first_failure is not None and not self._first_failure.done():
            self._first_failure.set_result(exc)

    async def _disconnected(self) -> None:
        if self._closing:
            return  # our own close
        log.warning("lost the connection to NATS at %s; reconnecting", self.where)

    async def _reconnected(self) -> None:
        self.reconnects += 1
        log.info("reconnected to NATS at %s", self.where)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
