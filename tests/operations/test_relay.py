"""`kara-sessions relay` against a real nats-server -js the tests start themselves: every event of
the feed in the stream exactly once and in feed order, through kill -9, a second relay, a NATS
restart and a kara server restart; SIGTERM, outages and bad flags as an operator meets them."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import nats
import pytest

from kara_sessions_client.client import SessionsClient
from kara_sessions_client.cloud_events import cloud_event
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start

from ..support.clock import FakeClock
from ..support.nats_server import NatsServer, relay_command, stream_count, stream_messages
from ..support.processes import run_cli, start_server_process

STREAM = "KARA_TEST"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[NatsServer]:
    nats_server = NatsServer(tmp_path / "jetstream")
    nats_server.start()
    yield nats_server
    nats_server.kill()


@pytest.fixture
def kara_server(tmp_path: Path, clock: FakeClock) -> Iterator[RunningServer]:
    settings = Settings(listen="127.0.0.1:0", database_url=f"sqlite:///{tmp_path / 'kara.db'}", max_workers=4)
    running = start(settings, clock=clock)
    yield running
    running.stop(grace=1)


class Relays:
    """`kara-sessions relay` processes, each logging to its own file."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, target: str, nats_url: str, *extra: str) -> subprocess.Popen[bytes]:
        log = (self.folder / f"relay-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            relay_command(target, nats_url, STREAM, *extra),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def log(self, index: int) -> str:
        return (self.folder / f"relay-{index}.log").read_text()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[Relays]:
    started = Relays(tmp_path)
    yield started
    started.stop_all()


def feed(target: str) -> list[tuple[str, str]]:
    with SessionsClient(target) as kara:
        return [(e.event_id, e.cursor) for e in kara.events()]


def until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def relayed_all(target: str, nats_url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return stream_count(nats_url, STREAM) >= len(feed(target))
        except Exception:  # NATS restarting: not yet
            return False

    return check


def assert_exactly_once_in_order(target: str, nats_url: str) -> None:
    stored = [(m.event_id, m.cursor) for m in stream_messages(nats_url, STREAM)]
    assert stored == feed(target), "the stream must hold every event once, in feed order"


def grants(target: str, count: int, pause: float = 0.0, client: str = "c") -> None:
    with SessionsClient(target) as kara:
        for n in range(count):
            kara.grant_credits(f"{client}-{n}", 1)
            time.sleep(pause)


def test_a_burst_lands_once_in_feed_order_as_the_cli_prints_it(
    kara_server: RunningServer, broker: NatsServer, relays: Relays, clock: FakeClock
) -> None:
    target = f"127.0.0.1:{kara_server.port}"
    with SessionsClient(target) as kara:
        kara.grant_credits("client-1", 2)
        session = kara.book("client-1", "pro-1", clock.now() + timedelta(hours=3))
        kara.cancel(session.session_id, "client")
    grants(target, 20)
    relay = relays.start(target, broker.url)
    until(relayed_all(target, broker.url), 30, "the burst in the stream")
    assert_exactly_once_in_order(target, broker.url)
    with SessionsClient(target) as kara:
        events = {e.event_id: e for e in kara.events()}
    for message in stream_messages(broker.url, STREAM):
        event = events[message.event_id]
        assert message.subject == "kara.sessions." + event.type.removeprefix("kara.sessions.v1.")
        assert json.loads(message.body) == cloud_event(event)
    assert "kara.sessions.session.cancelled" in {m.subject for m in stream_messages(broker.url, STREAM)}

    started = time.monotonic()
    relay.send_signal(signal.SIGTERM)
    assert relay.wait(5) == 0
    assert time.monotonic() - started < 1.0, "SIGTERM must end the relay within a second"
    assert "Traceback" not in relays.log(0)


def test_kill_9_mid_burst_then_a_restart_misses_and_repeats_nothing(
    kara_server: RunningServer, broker: NatsServer, relays: Relays
) -> None:
    target = f"127.0.0.1:{kara_server.port}"
    producer = threading.Thread(target=grants, args=(target, 80, 0.01))
    producer.start()
    relay = relays.start(target, broker.url)
    until(lambda: stream_count(broker.url, STREAM) >= 15, 30, "some events relayed")
    relay.kill()  # kill -9, while changes keep coming
    relay.wait(10)
    relays.start(target, broker.url)
    producer.join(60)
    until(relayed_all(target, broker.url), 30, "every event after the restart")
    assert_exactly_once_in_order(target, broker.url)


def test_two_relays_at_once_keep_the_stream_once_and_in_order(
    kara_server: RunningServer, broker: NatsServer, relays: Relays
) -> None:
    target = f"127.0.0.1:{kara_server.port}"
    grants(target, 10)
    relays.start(target, broker.url)
    relays.start(target, broker.url)
    grants(target, 40, 0.005, client="d")
    until(relayed_all(target, broker.url), 30, "the burst from two relays")
    time.sleep(0.5)  # anything either would still add, it would have added by now
    assert_exactly_once_in_order(target, broker.url)
    for index in (0, 1):
        assert "Traceback" not in relays.log(index)


def test_a_nats_restart_mid_burst_loses_and_repeats_nothing(
    kara_server: RunningServer, broker: NatsServer, relays: Relays
) -> None:
    target = f"127.0.0.1:{kara_server.port}"
    relays.start(target, broker.url)
    producer = threading.Thread(target=grants, args=(target, 80, 0.01))
    producer.start()
    until(lambda: stream_count(broker.url, STREAM) >= 15, 30, "some events relayed")
    broker.kill()
    time.sleep(1.0)
    broker.start()  # same port, same store
    producer.join(60)
    until(relayed_all(target, broker.url), 40, "every event after NATS came back")
    assert_exactly_once_in_order(target, broker.url)
    log = relays.log(0)
    assert "NATS" in log or "broker" in log
    assert "Traceback" not in log


def test_a_kara_server_restart_is_retried_and_named_once(
    tmp_path: Path, broker: NatsServer, relays: Relays
) -> None:
    database = f"sqlite:///{tmp_path / 'restarting.db'}"
    proc, port = start_server_process(database)
    target = f"127.0.0.1:{port}"
    try:
        grants(target, 5)
        relays.start(target, broker.url)
        until(relayed_all(target, broker.url), 30, "the first events")
        proc.terminate()
        proc.wait(15)
        time.sleep(1.5)
        proc, _ = start_server_process(database, port=port)
        grants(target, 5, client="after")
        until(relayed_all(target, broker.url), 40, "the events after the restart")
        assert_exactly_once_in_order(target, broker.url)
        log = relays.log(0)  # before the server stops again, a second outage
    finally:
        proc.terminate()
        proc.wait(15)
    assert log.count("cannot reach the kara-sessions server") == 1, log
    assert "answers again" in log
    assert "Traceback" not in log


def test_an_unreachable_broker_is_named_retried_and_then_used(
    kara_server: RunningServer, tmp_path: Path, relays: Relays
) -> None:
    target = f"127.0.0.1:{kara_server.port}"
    grants(target, 3)
    later = NatsServer(tmp_path / "later")
    relay = relays.start(target, later.url)
    try:
        until(lambda: later.url in relays.log(0), 20, "the log to name the broker")
        assert "cannot reach the broker" in relays.log(0)
        time.sleep(1.5)
        assert relays.log(0).count("cannot reach the broker") == 1, "one line per outage"
        later.start()
        until(relayed_all(target, later.url), 30, "the events once NATS is up")
        assert_exactly_once_in_order(target, later.url)
        assert "answers again" in relays.log(0)
    finally:
        relay.kill()
        later.kill()
    assert "Traceback" not in relays.log(0)


@pytest.mark.parametrize(
    "args",
    [
        ["--nats-url", "http://127.0.0.1:4222"],
        ["--nats-url", "nats://host:port"],
        ["--stream", "has space"],
        ["--subject-prefix", "a..b"],
        ["--max-age", "0d"],
        ["--max-age", "forever"],
        ["--no-such-flag"],
    ],
)
def test_a_bad_flag_or_url_is_a_usage_error(args: list[str]) -> None:
    done = run_cli("relay", *args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr


def test_a_cursor_the_server_no_longer_has_exits_with_how_to_resynchronise(
    kara_server: RunningServer, broker: NatsServer, relays: Relays, clock: FakeClock
) -> None:
    target = f"127.0.0.1:{kara_server.port}"
    grants(target, 3)
    with SessionsClient(target) as kara:
        oldest = kara.list_events()[0]
        # The stream holds the oldest event only: a relay stopped long ago.
        asyncio.run(_publish_as_a_relay_did(broker.url, oldest.event_id, oldest.cursor))
        clock.advance(timedelta(days=31))
        kara.grant_credits("late", 1)
    assert kara_server.events.prune() == 3
    relay = relays.start(target, broker.url)
    assert relay.wait(30) == 1
    log = relays.log(0)
    assert "nats stream purge" in log and "resynchronise" in log
    assert "Traceback" not in log


async def _publish_as_a_relay_did(url: str, event_id: str, cursor: str) -> None:
    from nats.js.api import StreamConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=STREAM, subjects=["kara.sessions.>"]))
    await js.publish(
        "kara.sessions.credits.granted", b"{}", headers={"Nats-Msg-Id": event_id, "Kara-Cursor": cursor}
    )
    await nc.close()


def test_metrics_are_served_and_a_taken_port_is_named(
    kara_server: RunningServer, broker: NatsServer, relays: Relays
) -> None:
    import socket
    import urllib.request

    from ..support.processes import free_port

    target = f"127.0.0.1:{kara_server.port}"
    grants(target, 3)
    port = free_port()
    relays.start(target, broker.url, "--metrics-port", str(port))
    until(relayed_all(target, broker.url), 30, "the events relayed")
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "kara_relay_events_relayed_total 3.0" in page
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        second = relays.start(target, broker.url, "--metrics-port", str(taken.getsockname()[1]))
        assert second.wait(20) == 1
    assert "cannot serve metrics on port" in relays.log(1)
    assert "Traceback" not in relays.log(1)
