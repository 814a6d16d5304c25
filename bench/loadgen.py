"""The load generator: runs in its own process (`python -m bench.loadgen`), so it never shares
the server's interpreter. Reads one job as JSON on stdin, keeps `concurrency` calls in flight on
one channel (grpc.aio) for `duration` seconds or until its work runs out, and writes every
latency (seconds) as JSON on stdout, with the CPU time the server's processes (`server_pids`)
spent over exactly the measured window, read from /proc/PID/stat, and the context switches of
their threads (/proc/PID/task/*/status)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kara.sessions.v1 import sessions_pb2 as pb
from kara.sessions.v1 import sessions_pb2_grpc

Request = tuple[Callable[..., Any], Any]
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU time of these processes (all their threads) so far; None if unreadable."""
    total = 0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
                # Fields after the parenthesised command name; utime and stime are the 14th and 15th.
                fields = stat.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None
    return total / TICKS_PER_SECOND


def context_switches(pids: list[int]) -> int | None:
    """Voluntary and involuntary context switches of every thread of these processes so far (a
    thread that ended meanwhile takes its count with it); None if unreadable."""
    total = 0
    try:
        for pid in pids:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/status", encoding="ascii") as status:
                    for line in status:
                        key, _, value = line.partition(":")
                        if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                            total += int(value)
    except (OSError, ValueError):
        return None
    return total


def _timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def requests(job: dict[str, Any], channel: grpc.aio.Channel) -> Iterator[Request]:
    """The calls of one workload, in order; a finite workload (cancel) ends when its sessions do."""
    sessions = sessions_pb2_grpc.SessionServiceStub(channel)
    kind = job["workload"]
    if kind == "ceiling":
        check = health_pb2_grpc.HealthStub(channel).Check
        request = health_pb2.HealthCheckRequest()
        return ((check, request) for _ in itertools.count())
    if kind == "book":
        clients = itertools.cycle(job["clients"])
        starts = _timestamp(datetime.now(UTC) + timedelta(days=2))
        return (
            (
                sessions.BookSession,
                pb.BookSessionRequest(
                    client_id=next(clients),
                    professional_id=job["professional_id"],
                    starts_at=starts,
                    request_id=str(uuid.uuid4()),
                ),
            )
            for _ in itertools.count()
        )
    if kind == "cancel":
        return (
            (
                sessions.CancelSession,
                pb.CancelSessionRequest(
                    session_id=session_id, cancelled_by=pb.PARTY_CLIENT, request_id=str(uuid.uuid4())
                ),
            )
            for session_id in job["session_ids"]
        )
    if kind == "get_payment":
        ids = itertools.cycle(job["session_ids"])
        return ((sessions.GetPayment, pb.GetPaymentRequest(session_id=next(ids))) for _ in itertools.count())
    if kind == "list_payments":
        request = pb.ListPaymentsRequest(
            professional_id=job["professional_id"],
            section=pb.PAYMENT_SECTION_UNPAID,
            page_size=job.get("page_size", 50),
            page_token=job.get("page_token", ""),
        )
        return ((sessions.ListPayments, request) for _ in itertools.count())
    raise ValueError(f"unknown workload {kind!r}")


async def run(job: dict[str, Any]) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(job["target"]) as channel:
        await channel.channel_ready()
        work = requests(job, channel)
        warmup_end = time.perf_counter() + job.get("warmup", 0.0)
        while time.perf_counter() < warmup_end:  # not counted: connection, caches, JIT-less warm paths
            call, request = next(work)
            await call(request, timeout=job["timeout"])
        latencies: list[float] = []
        errors: dict[str, int] = {}
        collected: list[str] = []  # session ids a book run made, for the cancel run to use
        collect = bool(job.get("collect"))
        deadline = time.perf_counter() + job["duration"]

        async def worker() -> None:
            for call, request in work:
                if time.perf_counter() >= deadline:
                    return
                started = time.perf_counter()
                try:
                    response = await call(request, timeout=job["timeout"])
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    continue
                latencies.append(time.perf_counter() - started)
                if collect:
                    collected.append(response.session_id)

        pids = job.get("server_pids", [])
        cpu_before, switches_before = cpu_seconds(pids), context_switches(pids)
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(job["concurrency"])))
        elapsed = time.perf_counter() - began
        cpu_after, switches_after = cpu_seconds(pids), context_switches(pids)
    server_cpu = None if cpu_before is None or cpu_after is None or not pids else cpu_after - cpu_before
    switches = None
    if switches_before is not None and switches_after is not None and pids:
        switches = switches_after - switches_before
    return {
        "latencies": latencies,
        "elapsed": elapsed,
        "errors": errors,
        "session_ids": collected,
        "server_cpu_s": server_cpu,
        "server_switches": switches,
    }


def main() -> None:
    job = json.load(sys.stdin)
    json.dump(asyncio.run(run(job)), sys.stdout)


if __name__ == "__main__":
    main()
