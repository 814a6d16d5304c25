"""`kara-sessions relay`: the event feed, published to a message broker exactly once and in feed
order (README, "Events on the bus").

It keeps no state of its own. At start, and whenever it must resynchronise, it asks the broker
for the newest event it holds and follows StreamEvents from that event's cursor. Each event is
published with its id as the broker's dedupe key and the previous event's id as the expected
last one, and the next event is read only once the broker has acknowledged it. So a restart
repeats at most what the broker then drops as a duplicate, and a second relay running at once
only ever publishes duplicates or is refused and resynchronises. Outages of either side are
retried with capped backoff and logged once when they start and once when they end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import grpc
import grpc.aio
from kara.sessions.v1 import events_pb2 as epb
from kara.sessions.v1 import events_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from .broker import Broker, OutOfOrder, Stored, Unavailable
from .client import TLS
from .cloud_events import cloud_event

log = logging.getLogger("kara_sessions_client.relay")
R = TypeVar("R")

TYPE_PREFIX = "kara.sessions.v1."
# Exit codes: 0 stopped by a signal; 1 cannot go on without an operator (see the log line).
STOPPED, NEEDS_OPERATOR = 0, 1
# gRPC codes that no retry cures: the relay's configuration or the feed's retention.
_FATAL = {
    grpc.StatusCode.UNAUTHENTICATED: "the server refused the relay's credentials (--token / KARA_TOKEN)",
    grpc.StatusCode.PERMISSION_DENIED: "the relay's principal may not read the event feed",
    grpc.StatusCode.INVALID_ARGUMENT: "the server refused the request",
    grpc.StatusCode.UNIMPLEMENTED: "the server has no event feed (is it kara-sessions?)",
}


@dataclass(frozen=True)
class RelaySettings:
    server: str
    token: str | None = None
    tls: TLS | None = None
    types: Sequence[str] = ()
    subject_prefix: str = "kara.sessions"
    metrics_port: int | None = None
    progress_seconds: float = 30.0
    max_backoff_seconds: float = 10.0


@dataclass
class RelayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.relayed = Counter("kara_relay_events_relayed", "Events the broker stored", registry=r)
        self.duplicates = Counter(
            "kara_relay_duplicates", "Publishes the broker acknowledged as duplicates", registry=r
        )
        self.reconnects = Counter(
            "kara_relay_reconnects",
            "Outages of the server or the broker recovered from",
            ["peer"],
            registry=r,
        )
        self.lag = Gauge(
            "kara_relay_lag_seconds",
            "From the last relayed event's commit to its acknowledgement",
            registry=r,
        )


class _Outage:
    """One log line when a peer stops answering, one when it answers again."""

    def __init__(self, peer: str, where: str, metrics: RelayMetrics):
        self.peer, self.where, self.metrics = peer, where, metrics
        self.since: float | None = None
        self.failures = 0

    def failed(self, why: str) -> None:
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
            log.warning("cannot reach %s at %s (%s); retrying with backoff", self.peer, self.where, why)

    def recovered(self) -> None:
        if self.since is not None:
            log.info(
                "%s at %s answers again after %.1f s", self.peer, self.where, time.monotonic() - self.since
            )
            self.metrics.reconnects.labels(self.peer).inc()
        self.since, self.failures = None, 0

    def backoff(self, cap: float) -> float:
        return float(min(cap, 0.2 * 2 ** min(self.failures, 10)))


def subject(prefix: str, event_type: str) -> str:
    return f"{prefix}.{event_type.removeprefix(TYPE_PREFIX)}"


def body(event: epb.Event) -> bytes:
    """Exactly the line `kara-sessions events` prints for it."""
    return json.dumps(cloud_event(event), separators=(",", ":")).encode()


class Relay:
    def __init__(self, settings: RelaySettings, broker: Broker, metrics: RelayMetrics | None = None):
        self.settings = settings
        self.broker = broker
        self.metrics = metrics or RelayMetrics()
        self.stopping = asyncio.Event()
        self._call: grpc.aio.UnaryStreamCall[epb.StreamEventsRequest, epb.Event] | None = None
        self._kara = _Outage("the kara-sessions server", settings.server, self.metrics)
        self._bus = _Outage("the broker", broker.where, self.metrics)
        self._count = 0
        self._lag = 0.0

    def stop(self) -> None:
        """Finish the publish in flight, then return from run()."""
        self.stopping.set()
        if self._call is not None:
            self._call.cancel()  # wakes a wait for the next event; never cuts a publish

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        if self.settings.metrics_port is not None:
            try:
                start_http_server(self.settings.metrics_port, registry=self.metrics.registry)
            except OSError as exc:
                log.error("cannot serve metrics on port %d: %s", self.settings.metrics_port, exc.strerror)
                await self.broker.close()
                return NEEDS_OPERATOR
        progress = asyncio.create_task(self._progress())
        try:
            return await self._relay()
        finally:
            progress.cancel()
            await self.broker.close()

    async def _relay(self) -> int:
        if not await self._until_broker_ready():
            return STOPPED
        credentials = self.settings.tls.credentials() if self.settings.tls else None
        async with (
            grpc.aio.secure_channel(self.settings.server, credentials)
            if credentials
            else grpc.aio.insecure_channel(self.settings.server)
        ) as channel:
            feed = events_pb2_grpc.EventServiceStub(channel)
            while not self.stopping.is_set():
                done, stored = await self._on_broker(self.broker.last)
                if not done:
                    break
                try:
                    await self._follow(feed, stored)
                except OutOfOrder:
                    log.info("another relay published first; resuming from what the broker holds")
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                    if code == grpc.StatusCode.OUT_OF_RANGE:
                        return self._cursor_expired(stored, exc)
                    if code in _FATAL:
                        log.error("%s: %s %s", _FATAL[code], code.name, exc.details())
                        return NEEDS_OPERATOR
                    if self.stopping.is_set():
                        break
                    self._kara.failed(f"{code.name}: {exc.details()}")
                    await self._sleep(self._kara.backoff(self.settings.max_backoff_seconds))
        log.info("stopped after relaying %d events", self._count)
        return STOPPED

    async def _follow(self, feed: events_pb2_grpc.EventServiceStub, stored: Stored | None) -> None:
        after = stored.cursor if stored else ""
        previous = stored.event_id if stored else None
        metadata = (("authorization", f"Bearer {self.settings.token}"),) if self.settings.token else None
        self._call = feed.StreamEvents(
            epb.StreamEventsRequest(after=after, types=list(self.settings.types)), metadata=metadata
        )
        try:
            await self._call.wait_for_connection()
            self._kara.recovered()
            async for event in self._call:
                await self._publish(event, previous)
                previous = event.event_id
                if self.stopping.is_set():
                    return
        except asyncio.CancelledError:
            # stop() cancels the call that waits for the next event; grpc.aio raises this then.
            if not self.stopping.is_set():
                raise
        finally:
            self._call.cancel()
            self._call = None

    async def _publish(self, event: epb.Event, previous: str | None) -> None:
        """Until the broker acknowledges it (or the relay is told to stop while the broker is
        away: the event is then not in the stream, and the next relay starts with it)."""
        stored = Stored(event.event_id, event.cursor)
        payload = body(event)
        where = subject(self.settings.subject_prefix, event.type)
        done, duplicate = await self._on_broker(lambda: self.broker.publish(where, payload, stored, previous))
        if not done:
            return
        if duplicate:
            self.metrics.duplicates.inc()
        else:
            self.metrics.relayed.inc()
            self._count += 1
        committed = event.time.ToDatetime(tzinfo=UTC)
        self._lag = max(0.0, (datetime.now(UTC) - committed).total_seconds())
        self.metrics.lag.set(self._lag)

    async def _until_broker_ready(self) -> bool:
        while not self.stopping.is_set():
            try:
                # A stop while connecting ends the wait at once: nothing is in flight yet.
                if not await self._unless_stopped(self._connect()):
                    return False
                self._bus.recovered()
                return True
            except Unavailable as exc:
                self._bus.failed(str(exc))
                await self.broker.close()
                await self._sleep(self._bus.backoff(self.settings.max_backoff_seconds))
        return False

    async def _connect(self) -> None:
        await self.broker.connect()
        await self.broker.ensure_stream()

    async def _unless_stopped(self, work: Coroutine[object, object, None]) -> bool:
        """Runs `work` to its end (True), or until stop() is called (False: `work` cancelled)."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self.stopping.wait())
        done, _ = await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if task in done:
            task.result()  # its exception, if any
            return True
        task.cancel()
        return False

    async def _on_broker(self, ask: Callable[[], Awaitable[R]]) -> tuple[bool, R | None]:
        """(True, the answer) once the broker gives one, retried through its outages; (False,
        None) if stop() is called while it is away."""
        while True:
            try:
                answer = await ask()
            except Unavailable as exc:
                self._bus.failed(str(exc))
                if self.stopping.is_set():
                    return False, None
                await self._sleep(self._bus.backoff(self.settings.max_backoff_seconds))
            else:
                self._bus.recovered()
                return True, answer

    def _cursor_expired(self, stored: Stored | None, exc: grpc.aio.AioRpcError) -> int:
        log.error(
            "the server no longer keeps the events after the broker's newest (cursor %s): %s. The events "
            "between were pruned before they were relayed, so the stream cannot be completed. To "
            "resynchronise: %s, restart the relay (it then relays from the oldest event the server "
            "keeps), and have consumers rebuild from the current state (ListSessions, ListPayments, "
            "GetCreditAccount)",
            stored.cursor if stored else "",
            exc.details(),
            self.broker.empty_it,
        )
        return NEEDS_OPERATOR

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(self.settings.progress_seconds)
            log.info("relayed %d events so far (lag %.2f s)", self._count, self._lag)
