"""`make bench` / `python -m bench`: CancelSession, BookSession, GetPayment and ListPayments next
to the ceiling (the health service's Check on the same server and transport), at several
concurrencies, on SQLite and PostgreSQL; growth from 10k to 1M sessions; and where a
cancellation's time goes. Prints a table; `--json FILE` writes everything for machines."""

from __future__ import annotations

import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import psycopg

from kara_sessions_client.client import DEFAULT_TIMEOUT, SessionsClient
from kara_sessions_server.entrypoints.settings import DEFAULT_WORKERS
from tests.support.processes import free_port, serve_command, server_children, wait_serving

from . import floor, instructions
from .populate import DEEP_PROFESSIONAL, POPULATED_FROM, POPULATED_TO, populate
from .profile import profile_cancellation
from .relay import bench_relay
from .report import print_report

DEFAULT_POSTGRES = os.environ.get("KARA_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
BENCH_PROFESSIONAL = "pro-bench"
CLIENTS = [f"bench-client-{i}" for i in range(32)]


@dataclass
class Run:
    database: str
    workload: str
    concurrency: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: dict[str, int] = field(default_factory=dict)
    ratio_to_ceiling: float | None = None
    # The server's CPU time (all its processes and threads) over the run, per call answered.
    server_cpu_us: float | None = None
    server_cpu_ratio_to_ceiling: float | None = None
    # Context switches of the server's threads over the run, per call answered.
    server_switches: float | None = None


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# Options every benchmarked server gets besides its defaults (server_options()).
SERVER_OPTIONS: list[str] = []


def server_options(max_workers: int | None, cpus: str = "") -> list[str]:
    """--max-workers N for every server, streams off so that N is all its threads; --cpus."""
    workers = [] if max_workers is None else ["--max-workers", str(max_workers), "--max-event-streams", "0"]
    return workers + (["--cpus", cpus] if cpus else [])


# The processes of each server `server()` started, by address: the load generator reads their CPU.
SERVER_PIDS: dict[str, list[int]] = {}


def load(
    target: str, workload: str, concurrency: int, duration: float, **job: Any
) -> tuple[dict[str, Any], Run]:
    """Runs one workload from a separate load-generator process."""
    spec = {
        "target": target,
        "server_pids": SERVER_PIDS.get(target, []),
        "workload": workload,
        "concurrency": concurrency,
        "duration": duration,
        # What our client sends by default (SessionsClient), so the bench pays what users pay.
        "timeout": DEFAULT_TIMEOUT,
        **job,
    }
    done = subprocess.run(
        [sys.executable, "-m", "bench.loadgen"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        check=False,
        timeout=duration + 300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed for {workload}: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    latencies = sorted(result["latencies"])
    seconds = result["elapsed"]
    run = Run(
        database="",
        workload=workload,
        concurrency=concurrency,
        requests=len(latencies),
        seconds=round(seconds, 3),
        rps=len(latencies) / seconds if seconds else 0.0,
        p50_ms=_percentile(latencies, 0.50) * 1000,
        p95_ms=_percentile(latencies, 0.95) * 1000,
        p99_ms=_percentile(latencies, 0.99) * 1000,
        errors=result["errors"],
    )
    answered = len(latencies) + sum(result["errors"].values())
    if result.get("server_cpu_s") is not None and answered:
        run.server_cpu_us = result["server_cpu_s"] / answered * 1e6
    if result.get("server_switches") is not None and answered:
        run.server_switches = result["server_switches"] / answered
    return result, run


def grant_and_book(target: str, concurrency: int, duration: float, credits: int) -> tuple[list[str], Run]:
    """Gives every benchmark client `credits`, then books sessions for `duration` seconds:
    the booked session ids (for a cancel run) and the booking run."""
    with SessionsClient(target, timeout=30) as kara:
        for client in CLIENTS:
            kara.grant_credits(client, credits)
    result, book = load(
        target, "book", concurrency, duration, clients=CLIENTS, professional_id=BENCH_PROFESSIONAL,
        collect=True,
    )  # fmt: skip
    return result["session_ids"], book


@contextmanager
def server(database_url: str, log_path: Path, *options: str, processes: int = 1) -> Iterator[str]:
    """`kara-sessions serve` as operators run it (defaults unless `options`; JSON log lines to a
    file), as `processes` server processes (`serve --processes`)."""
    port = free_port()
    if processes > 1:
        options = (*options, "--processes", str(processes))
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            serve_command(
                "--listen",
                f"127.0.0.1:{port}",
                "--database-url",
                database_url,
                "--log-format",
                "json",
                *SERVER_OPTIONS,
                *options,
            ),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        wait_serving(port, proc, deadline=60)
        pids = [proc.pid]
        if processes > 1:
            end = time.monotonic() + 60
            while len(children := server_children(proc.pid)) < processes and time.monotonic() < end:
                time.sleep(0.1)
            pids += children
        target = f"127.0.0.1:{port}"
        SERVER_PIDS[target] = pids
        yield target
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@contextmanager
def scratch_postgres(admin_url: str) -> Iterator[str]:
    name = f"kara_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{admin_url.rsplit('/', 1)[0]}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_reachable(url: str) -> str | None:
    """None if reachable, else why not."""
    try:
        with psycopg.connect(url, connect_timeout=3):
            return None
    except psycopg.OperationalError as exc:
        return str(exc).strip().splitlines()[0]


def bench_database(
    name: str, url: str, concurrencies: list[int], duration: float, workdir: Path
) -> list[Run]:
    runs: list[Run] = []
    with server(url, workdir / f"server-{name}.log") as target:
        with SessionsClient(target, timeout=30) as kara:
            for client in CLIENTS:
                for _ in range(10):
                    kara.grant_credits(client, 10_000)
        booked_all: list[str] = []
        for c in concurrencies:
            _, ceiling = load(target, "ceiling", c, duration, warmup=0.5)
            result, book = load(
                target, "book", c, duration, clients=CLIENTS, professional_id=BENCH_PROFESSIONAL, collect=True
            )
            booked = result.get("session_ids", [])
            _, cancel = load(target, "cancel", c, duration * 10, session_ids=booked)
            booked_all += booked
            _, get = load(target, "get_payment", c, duration, session_ids=booked_all[-20_000:], warmup=0.5)
            _, page = load(
                target, "list_payments", c, duration, professional_id=BENCH_PROFESSIONAL, warmup=0.5
            )
            for run in (ceiling, book, cancel, get, page):
                run.database = name
                compare(run, ceiling)
                runs.append(run)
                echo_run(run)
    return runs


# Sessions the floor books for each cancel run (at least): about as many seconds of work as ours gets.
FLOOR_SESSIONS_PER_RUN = 200


@contextmanager
def floor_server(workdir: Path, sessions: int, stack: bool) -> Iterator[str]:
    """bench/floor.py's server (the bare floor, or with `stack` the stack's floor), as many
    workers as ours on SQLite."""
    port = free_port()
    with (workdir / "server-floor.log").open("ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "bench.floor", "--port", str(port),
                "--database", str(workdir / f"floor-{uuid.uuid4().hex[:6]}.db"),
                "--sessions", str(sessions), "--workers", str(DEFAULT_WORKERS["sqlite"]),
                *(["--stack"] if stack else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )  # fmt: skip
    try:
        wait_serving(port, proc, deadline=120)
        target = f"127.0.0.1:{port}"
        SERVER_PIDS[target] = [proc.pid]
        yield target
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


# The floors, as the report and the JSON name them.
FLOORS = {"bare": False, "stack": True}


def bench_floor(
    workdir: Path, concurrencies: list[int], duration: float, ours: list[Run]
) -> list[dict[str, Any]]:
    """Each floor's Check, CancelSession, GetPayment and ListPayments at each concurrency, and
    ours against each: a row per floor and concurrency."""
    rows: list[dict[str, Any]] = []
    per_run = max(FLOOR_SESSIONS_PER_RUN, int(duration * 1000))
    for name, stack in FLOORS.items():
        with floor_server(workdir, per_run * len(concurrencies), stack) as target:
            for n, c in enumerate(concurrencies):
                _, check = load(target, "ceiling", c, duration, warmup=0.5)
                ids = [f"floor-{i}" for i in range(n * per_run, (n + 1) * per_run)]
                _, cancel = load(target, "cancel", c, duration * 10, session_ids=ids)
                _, get = load(target, "get_payment", c, duration, session_ids=ids, warmup=0.5)
                _, page = load(
                    target, "list_payments", c, duration, professional_id=floor.PROFESSIONAL, warmup=0.5
                )
                for run in (check, cancel, get, page):
                    run.database = name
                    compare(run, check)
                    echo_run(run)
                row: dict[str, Any] = {"floor": name, "concurrency": c, "floor_check": asdict(check)}
                for workload, theirs in (("cancel", cancel), ("get_payment", get), ("list_payments", page)):
                    mine = next((r for r in ours if _is(r, "sqlite", workload, c)), None)
                    row[workload] = {"floor": asdict(theirs), "ours": asdict(mine) if mine else None}
                    row[workload].update(_ratios(mine, theirs))
                rows.append(row)
    return rows


def _is(run: Run, database: str, workload: str, concurrency: int) -> bool:
    return (run.database, run.workload, run.concurrency) == (database, workload, concurrency)


def _ratios(mine: Run | None, theirs: Run) -> dict[str, float | None]:
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "rps_ratio": ratio(mine.rps if mine else None, theirs.rps),
        "cpu_ratio": ratio(mine.server_cpu_us if mine else None, theirs.server_cpu_us),
        "p99_ratio": ratio(mine.p99_ms if mine else None, theirs.p99_ms),
        "switches_ratio": ratio(mine.server_switches if mine else None, theirs.server_switches),
    }


def bench_instructions(workdir: Path) -> list[dict[str, Any]] | None:
    """Instructions per call, in-process (callgrind): CancelSession, GetPayment and
    ListPayments, ours and the stack's floor. None without valgrind."""
    rows = []
    for rpc in instructions.RPCS:
        row: dict[str, Any] = {"rpc": rpc}
        for server_name in instructions.SERVERS:
            click.echo(f"instructions: {rpc}, {server_name} (callgrind)", err=True)
            found = instructions.measure(rpc, server_name, workdir)
            if found is None:
                return None
            row[server_name] = found
        row["ratio"] = row["ours"] / row["stack"] if row["stack"] else None
        rows.append(row)
    return rows


def compare(run: Run, ceiling: Run) -> None:
    run.ratio_to_ceiling = run.rps / ceiling.rps if ceiling.rps else None
    if run.server_cpu_us and ceiling.server_cpu_us:
        run.server_cpu_ratio_to_ceiling = run.server_cpu_us / ceiling.server_cpu_us


def echo_run(run: Run) -> None:
    cpu = f", server CPU {run.server_cpu_us:5.0f} us/call" if run.server_cpu_us else ""
    click.echo(
        f"  {run.database:<10} {run.workload:<14} c={run.concurrency:<3} {run.rps:8.0f} req/s "
        f"p99 {run.p99_ms:7.2f} ms{cpu}",
        err=True,
    )


def bench_processes(make_url: Any, workdir: Path, duration: float, counts: list[int]) -> list[dict[str, Any]]:
    """CancelSession on PostgreSQL from `serve --processes N`, for each N, at 8 in flight. On a
    2-core machine the load generator competes with the server for the same cores."""
    click.echo("postgresql: serve --processes N", err=True)
    rows: list[dict[str, Any]] = []
    for n in counts:
        log = workdir / f"server-processes-{n}.log"
        with make_url() as url, server(url, log, processes=n) as target:
            booked, _ = grant_and_book(target, 8, duration, 1_000)
            _, cancel = load(target, "cancel", 8, duration * 10, session_ids=booked)
        cancel.database = "postgresql"
        echo_run(cancel)
        rows.append({**asdict(cancel), "processes": n})
    return rows


def bench_pinned(workdir: Path, duration: float, cpu: int, concurrency: int = 8) -> list[dict[str, Any]]:
    """The SQLite runs at `concurrency` in flight again, from a server with `serve --cpus CPU`
    (every thread on one CPU): what the option buys on this machine, beside the main table."""
    click.echo(f"sqlite: serve --cpus {cpu}", err=True)
    rows: list[dict[str, Any]] = []
    url = f"sqlite:///{workdir / f'bench-pinned-{uuid.uuid4().hex[:6]}.db'}"
    with server(url, workdir / "server-pinned.log", "--cpus", str(cpu)) as target:
        _, ceiling = load(target, "ceiling", concurrency, duration, warmup=0.5)
        booked, _ = grant_and_book(target, concurrency, duration, 1_000)
        _, get = load(target, "get_payment", concurrency, duration, session_ids=booked, warmup=0.5)
        _, cancel = load(target, "cancel", concurrency, duration * 10, session_ids=booked)
    for run in (ceiling, get, cancel):
        run.database = "sqlite"
        compare(run, ceiling)
        echo_run(run)
        rows.append({**asdict(run), "cpus": str(cpu)})
    return rows


def _spare_cpu() -> int | None:
    """The CPU for bench_pinned: this process's last (the first often takes more of the
    machine's interrupts); None with only one, where pinning would change nothing."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return allowed[-1] if len(allowed) > 1 else None


def bench_profile(workdir: Path, runs: list[Run]) -> dict[str, Any]:
    click.echo("profiling one cancellation in-process", err=True)
    profile = profile_cancellation(workdir)
    rpc_c1 = next(
        (r for r in runs if (r.database, r.workload, r.concurrency) == ("sqlite", "cancel", 1)), None
    )
    return {**asdict(profile), "rpc_cancel_p50_us_at_c1": rpc_c1.p50_ms * 1000 if rpc_c1 else None}


def bench_event_delivery(name: str, url: str, workdir: Path, count: int) -> dict[str, Any]:
    """How long a committed cancellation takes to reach a consumer's open StreamEvents: from the
    event's time (taken in the cancellation's transaction, just before its commit) to its arrival
    at the consumer. The cancellations go one at a time, a few milliseconds apart."""
    arrivals: list[float] = []
    log = workdir / f"server-{name}-events.log"
    with server(url, log) as target, SessionsClient(target) as kara, SessionsClient(target) as consumer:
        kara.grant_credits(CLIENTS[0], count)
        starts = datetime.now(UTC) + timedelta(days=3)
        sessions = [kara.book(CLIENTS[0], BENCH_PROFESSIONAL, starts).session_id for _ in range(count)]
        # No session has been cancelled yet: the stream's backlog is empty.
        stream = consumer.events("", ["kara.sessions.v1.session.cancelled"], follow=True)
        done = threading.Event()

        def consume() -> None:
            for event in stream:
                arrivals.append(time.time() - event.time.ToDatetime(tzinfo=UTC).timestamp())
                if len(arrivals) == count:
                    done.set()
                    return

        threading.Thread(target=consume, daemon=True).start()
        time.sleep(0.3)
        for session_id in sessions:
            kara.cancel(session_id, "client")
            time.sleep(0.005)
        done.wait(60)
    lags = sorted(arrivals)
    result = {
        "database": name,
        "events": len(lags),
        "p50_ms": _percentile(lags, 0.50) * 1000,
        "p99_ms": _percentile(lags, 0.99) * 1000,
        "max_ms": (lags[-1] * 1000) if lags else float("nan"),
    }
    p50, p99 = result["p50_ms"], result["p99_ms"]
    click.echo(f"  {name:<10} cancellation -> open stream: p50 {p50:.2f} ms, p99 {p99:.2f} ms", err=True)
    return result


def bench_durability(workdir: Path, duration: float, concurrency: int = 8) -> list[dict[str, Any]]:
    """BookSession and CancelSession on SQLite with synchronous NORMAL and FULL, one after the other
    in the same run: what syncing the WAL on every commit costs."""
    rows: list[dict[str, Any]] = []
    for mode in ("normal", "full"):
        url = f"sqlite:///{workdir / f'durability-{mode}.db'}"
        with server(url, workdir / f"server-durability-{mode}.log", "--sqlite-synchronous", mode) as target:
            booked, book = grant_and_book(target, concurrency, duration, 10_000)
            _, cancel = load(target, "cancel", concurrency, duration * 10, session_ids=booked)
        for run in (book, cancel):
            rows.append(
                {
                    "synchronous": mode,
                    "workload": run.workload,
                    "concurrency": concurrency,
                    "rps": run.rps,
                    "p50_ms": run.p50_ms,
                    "p99_ms": run.p99_ms,
                    "errors": run.errors,
                }
            )
            click.echo(
                f"  sqlite synchronous={mode:<6} {run.workload:<7} c={concurrency} {run.rps:8.0f} req/s "
                f"p99 {run.p99_ms:7.2f} ms",
                err=True,
            )
    return rows


@dataclass
class Growth:
    database: str
    workload: str
    small: int
    large: int
    rps_small: float
    rps_large: float
    p50_ms_small: float
    p50_ms_large: float

    @property
    def ratio(self) -> float:
        """How much slower the large database is (p50 latency, large / small)."""
        return self.p50_ms_large / self.p50_ms_small if self.p50_ms_small else float("nan")


@dataclass
class ReportTiming:
    """One programme report over a year of the growth data (issue 37), as a service asks it."""

    database: str
    rpc: str
    sessions: int
    decisions: int
    seconds: float


# A report's calls: a year of decisions is far more than one answer, so each gets time enough.
_REPORT_TIMEOUT = 300.0


def bench_reports(name: str, target: str, size: int) -> list[ReportTiming]:
    """GetProgrammeUsage (the best of three) and SimulateTerms (one: its window 48 h, so every
    decision made with 24-48 h of notice changes) over the year the growth data was booked in."""
    start, end = POPULATED_FROM, POPULATED_TO
    with SessionsClient(target, timeout=_REPORT_TIMEOUT) as client:
        times = []
        for _ in range(3):
            began = time.perf_counter()
            usage = client.get_programme_usage("default", start, end)
            times.append(time.perf_counter() - began)
        decided = sum(
            getattr(usage, f).value
            for f in ("sessions_completed", "cancelled_with_notice", "cancelled_late_charged",
                      "cancelled_late_not_charged", "no_shows_charged", "no_shows_not_charged")
        )  # fmt: skip
        began = time.perf_counter()
        simulated = client.simulate_terms("default", start, end, notice_window=timedelta(hours=48))
        simulate = time.perf_counter() - began
    click.echo(
        f"  {name}: {size:,} sessions, {decided:,} decided: GetProgrammeUsage {min(times):.2f} s, "
        f"SimulateTerms {simulate:.2f} s ({simulated.decisions_changed.value:,} changed)",
        err=True,
    )
    return [
        ReportTiming(name, "GetProgrammeUsage", size, decided, min(times)),
        ReportTiming(name, "SimulateTerms", size, decided, simulate),
    ]


def bench_growth(
    name: str, make_url: Any, sizes: tuple[int, int], duration: float, concurrency: int, workdir: Path
) -> tuple[list[Growth], list[ReportTiming]]:
    measured: dict[int, dict[str, Run]] = {}
    reports: list[ReportTiming] = []
    for size in sizes:
        with make_url(size) as url:
            started = time.perf_counter()
            sample, token = populate(url, size)
            click.echo(
                f"  {name}: {size:,} sessions loaded in {time.perf_counter() - started:.1f} s", err=True
            )
            with server(url, workdir / f"server-{name}-growth.log") as target:
                _, get = load(target, "get_payment", concurrency, duration, session_ids=sample, warmup=0.5)
                _, page = load(
                    target,
                    "list_payments",
                    concurrency,
                    duration,
                    professional_id=DEEP_PROFESSIONAL,
                    page_token=token,
                    warmup=0.5,
                )
                reports += bench_reports(name, target, size)
            measured[size] = {"get_payment": get, "list_payments (deep)": page}
    small, large = sizes
    return [
        Growth(
            name,
            workload,
            small,
            large,
            measured[small][workload].rps,
            measured[large][workload].rps,
            measured[small][workload].p50_ms,
            measured[large][workload].p50_ms,
        )
        for workload in measured[small]
    ], reports


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    from importlib.metadata import version

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": memory,
        "os": platform.platform(),
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "peewee": version("peewee"),
        "transitions": version("transitions"),
        "sqlite": sqlite3.sqlite_version,
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--duration", type=click.FloatRange(0.1), default=5.0, show_default=True, help="Seconds per run."
)
@click.option(
    "--concurrency",
    "concurrencies",
    type=click.IntRange(1, 256),
    multiple=True,
    default=(1, 8, 32),
    show_default=True,
    help="Calls in flight; repeat the option for several.",
)
@click.option(
    "--postgres-url",
    default=DEFAULT_POSTGRES,
    show_default=True,
    help="Admin URL; the benchmark creates and drops scratch databases on this server.",
)
@click.option("--no-postgres", is_flag=True, help="SQLite only.")
@click.option(
    "--growth-sizes",
    default="10000,1000000",
    show_default=True,
    help="SMALL,LARGE session counts for the growth runs; 'none' to skip them.",
)
@click.option("--no-profile", is_flag=True, help="Skip the in-process cancellation profile.")
@click.option("--no-floor", is_flag=True, help="Skip the floors (bench/floor.py).")
@click.option("--no-instructions", is_flag=True, help="Skip counting instructions per call (callgrind).")
@click.option("--no-durability", is_flag=True, help="Skip comparing SQLite synchronous=NORMAL with FULL.")
@click.option("--no-events", is_flag=True, help="Skip the event-delivery measurement.")
@click.option(
    "--no-pinned", is_flag=True, help="Skip the SQLite runs with the server on one CPU (serve --cpus)."
)
@click.option(
    "--max-workers",
    type=click.IntRange(1, 256),
    default=None,
    help="Run every server with this --max-workers instead of its default.",
)
@click.option(
    "--cpus",
    default="",
    help="Run every server with `serve --cpus` this list (e.g. 0: its threads on CPU 0 only).",
)
@click.option(
    "--processes",
    "process_counts",
    default="1,2",
    show_default=True,
    help="PostgreSQL only: CancelSession from `serve --processes N` for each N; 'none' to skip.",
)
@click.option(
    "--event-count",
    type=click.IntRange(1, 100_000),
    default=300,
    show_default=True,
    help="Cancellations whose delivery to an open stream is timed.",
)
@click.option(
    "--relay-count",
    type=click.IntRange(0, 100_000),
    default=1000,
    show_default=True,
    help="Events of the backlog `kara-sessions relay` moves to NATS JetStream (0: skip the relay).",
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, writable=True), help="Write results here."
)
def main(
    duration: float,
    concurrencies: tuple[int, ...],
    postgres_url: str,
    no_postgres: bool,
    growth_sizes: str,
    no_profile: bool,
    no_floor: bool,
    no_instructions: bool,
    no_durability: bool,
    no_events: bool,
    no_pinned: bool,
    max_workers: int | None,
    cpus: str,
    process_counts: str,
    event_count: int,
    relay_count: int,
    json_path: str | None,
) -> None:
    """Benchmark kara-sessions on this machine."""
    SERVER_OPTIONS[:] = server_options(max_workers, cpus)
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "duration_s": duration,
            "concurrency": list(concurrencies),
            "server": "kara-sessions serve defaults (JSON log line per RPC, no auth, no TLS)"
            + (f", --max-workers {max_workers}" if max_workers else "")
            + (f", --cpus {cpus}" if cpus else ""),
        },
        "skipped": [],
    }
    databases: list[tuple[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kara-bench-") as tmp:
        workdir = Path(tmp)

        @contextmanager
        def sqlite_url(size: int = 0) -> Iterator[str]:
            yield f"sqlite:///{workdir / f'bench-{size}-{uuid.uuid4().hex[:6]}.db'}"

        databases.append(("sqlite", sqlite_url))
        why = "--no-postgres" if no_postgres else postgres_reachable(postgres_url)
        if why is None:
            databases.append(("postgresql", lambda size=0: scratch_postgres(postgres_url)))
            with psycopg.connect(postgres_url) as conn:
                row = conn.execute("SHOW server_version").fetchone()
                results["machine"]["postgresql"] = row[0] if row else ""
        else:
            message = f"PostgreSQL skipped: {why} (set --postgres-url or KARA_BENCH_POSTGRES_URL)"
            click.echo(message, err=True)
            results["skipped"].append(message)

        runs: list[Run] = []
        for name, make_url in databases:
            click.echo(f"{name}: throughput and latency", err=True)
            with make_url() as url:
                runs += bench_database(name, url, list(concurrencies), duration, workdir)
        results["runs"] = [asdict(r) for r in runs]

        _floor_sections(results, workdir, list(concurrencies), duration, runs, no_floor, no_instructions)

        if process_counts != "none" and "postgresql" in dict(databases):
            results["processes"] = bench_processes(
                dict(databases)["postgresql"], workdir, duration, [int(n) for n in process_counts.split(",")]
            )

        if not no_pinned and not cpus and (cpu := _spare_cpu()) is not None:
            results["pinned"] = bench_pinned(workdir, duration, cpu)

        if not no_events:
            results["event_delivery"] = _event_section(databases, workdir, event_count)

        _relay_section(results, workdir / f"relay-{uuid.uuid4().hex[:6]}.db", workdir, relay_count)

        growth = _growth_section(results, databases, growth_sizes, duration, workdir)

        if not no_durability:
            click.echo("sqlite: synchronous=normal against full (durable commits)", err=True)
            results["durability"] = bench_durability(workdir, duration)

        if not no_profile:
            results["profile"] = bench_profile(workdir, runs)
    results["targets"] = targets(
        runs,
        growth,
        results.get("floor", []),
        results.get("instructions") or [],
        results.get("reports") or [],
    )
    print_report(results)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
        click.echo(f"results written to {json_path}", err=True)


def _growth_section(
    results: dict[str, Any], databases: Any, growth_sizes: str, duration: float, workdir: Path
) -> list[Growth]:
    """The growth runs and, on the same databases, a programme's report (issue 37)."""
    growth: list[Growth] = []
    reports: list[ReportTiming] = []
    if growth_sizes != "none":
        small, large = (int(x) for x in growth_sizes.split(","))
        for name, make_url in databases:
            click.echo(f"{name}: growth {small:,} -> {large:,} sessions", err=True)
            grown, reported = bench_growth(name, make_url, (small, large), duration, 8, workdir)
            growth += grown
            reports += reported
    results["growth"] = [{**asdict(g), "ratio": g.ratio} for g in growth]
    results["reports"] = [asdict(r) for r in reports]
    return growth


def _floor_sections(
    results: dict[str, Any],
    workdir: Path,
    concurrencies: list[int],
    duration: float,
    runs: list[Run],
    no_floor: bool,
    no_instructions: bool,
) -> None:
    if not no_floor:
        click.echo(
            "the floors: bare (grpcio + sqlite3), the stack's (peewee, transitions, logging)", err=True
        )
        results["floor"] = bench_floor(workdir, concurrencies, duration, runs)
    if not no_instructions:
        results["instructions"] = bench_instructions(workdir)
        if results["instructions"] is None:
            results["skipped"].append("instructions skipped: no valgrind on this machine")


def _event_section(databases: list[tuple[str, Any]], workdir: Path, count: int) -> list[dict[str, Any]]:
    delivered = []
    for name, make_url in databases:
        click.echo(f"{name}: from a committed cancellation to an open event stream", err=True)
        with make_url() as url:
            delivered.append(bench_event_delivery(name, url, workdir, count))
    return delivered


def _relay_section(results: dict[str, Any], database: Path, workdir: Path, count: int) -> None:
    if not count:
        return
    click.echo("sqlite: kara-sessions relay to NATS JetStream", err=True)
    with server(f"sqlite:///{database}", workdir / "server-relay.log") as target:
        relayed = bench_relay(target, workdir, count, live=min(200, count))
    if relayed is None:
        results["skipped"].append("relay skipped: no nats-server binary")
    else:
        results["relay"] = relayed


def targets(
    runs: list[Run],
    growth: list[Growth],
    floors: list[dict[str, Any]],
    counted: list[dict[str, Any]],
    reports: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    def run(db: str, workload: str, c: int) -> Run | None:
        return next((r for r in runs if _is(r, db, workload, c)), None)

    out: list[dict[str, Any]] = []

    def check(name: str, value: float | None, goal: str, met: bool | None) -> None:
        out.append({"target": name, "value": value, "goal": goal, "met": met})

    def share_of_ceiling(db: str, c: int, goal: float) -> None:
        r = run(db, "cancel", c)
        if r is not None:
            ratio = r.ratio_to_ceiling or 0.0
            check(f"CancelSession {db} c={c}, share of ceiling", ratio, f">= {goal:.2f}", ratio >= goal)

    def cpu_against_ceiling(workload: str, label: str, goal: float) -> None:
        r = run("sqlite", workload, 8)
        if r is not None and r.server_cpu_ratio_to_ceiling is not None:
            ratio = r.server_cpu_ratio_to_ceiling
            name = f"{label} sqlite c=8, server CPU per call x ceiling's"
            check(name, ratio, f"<= {goal:.1f}", ratio <= goal)

    def against(floor_name: str, workload: str, c: int, ratio: str) -> float | None:
        row = next((r for r in floors if (r["floor"], r["concurrency"]) == (floor_name, c)), None)
        found: float | None = row[workload][ratio] if row else None
        return found

    def at_most(name: str, value: float | None, goal: float) -> None:
        if value is not None:
            check(name, value, f"<= {goal:.2f}", value <= goal)

    # Issue 35: instructions, and against the stack's floor, measured in the same run.
    cancel_count = next((r["ours"] for r in counted if r["rpc"] == "cancel"), None)
    if cancel_count is not None:
        name = "CancelSession instructions per call, in-process (K)"
        check(name, cancel_count / 1000, "<= 1000", cancel_count <= 1_000_000)
    stack, bare = "stack", "bare"
    at_most(
        "CancelSession sqlite c=8, server CPU x the stack floor's",
        against(stack, "cancel", 8, "cpu_ratio"),
        1.3,
    )
    switches = against(stack, "cancel", 8, "switches_ratio")
    at_most("CancelSession sqlite c=8, context switches x the stack floor's", switches, 1.3)
    get = against(stack, "get_payment", 8, "cpu_ratio")
    at_most("GetPayment sqlite c=8, server CPU x the stack floor's", get, 1.3)
    # Issue 24: against the bare floor.
    at_most(
        "CancelSession sqlite c=8, server CPU x the bare floor's",
        against(bare, "cancel", 8, "cpu_ratio"),
        1.6,
    )
    if (rps := against(bare, "cancel", 8, "rps_ratio")) is not None:
        check("CancelSession sqlite c=8, share of the bare floor's throughput", rps, ">= 0.60", rps >= 0.6)
    at_most(
        "CancelSession sqlite c=32, p99 x the bare floor's", against(bare, "cancel", 32, "p99_ratio"), 2.0
    )
    cpu_against_ceiling("get_payment", "GetPayment", 2.0)
    share_of_ceiling("postgresql", 8, 0.22)
    for g in growth:
        check(f"growth {g.database} {g.workload}, p50 large/small", g.ratio, "< 2.0", g.ratio < 2.0)
    # Issue 37: a report over the largest database within our client's default deadline.
    largest = max((r["sessions"] for r in reports), default=0)
    for r in reports:
        if r["rpc"] == "GetProgrammeUsage" and r["sessions"] == largest:
            name = f"GetProgrammeUsage {r['database']} over {largest:,} sessions (s)"
            check(name, r["seconds"], f"<= {DEFAULT_TIMEOUT:.0f}", r["seconds"] <= DEFAULT_TIMEOUT)
    return out


if __name__ == "__main__":
    main()
