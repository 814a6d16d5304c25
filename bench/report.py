"""The benchmark's readable output."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

NAMES = {
    "ceiling": "ceiling: Health.Check",
    "book": "BookSession",
    "cancel": "CancelSession",
    "get_payment": "GetPayment",
    "list_payments": "ListPayments (50)",
}


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _growth_table(rows: list[dict[str, Any]]) -> Table:
    growth = Table(title="Growth: the same reads on a small and a large database (8 in flight)")
    for col in ("database", "RPC", "sessions", "req/s", "p50 ms", "p50 large/small"):
        growth.add_column(col, justify="left" if col in ("database", "RPC") else "right")
    for g in rows:
        growth.add_row(
            g["database"],
            g["workload"],
            f"{g['small']:,} -> {g['large']:,}",
            f"{g['rps_small']:.0f} -> {g['rps_large']:.0f}",
            f"{g['p50_ms_small']:.2f} -> {g['p50_ms_large']:.2f}",
            f"{g['ratio']:.2f}",
        )
    return growth


def _reports_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(
        title="A programme's report over a year of the growth data (issue 37), as a service asks it"
    )
    for col in ("database", "RPC", "sessions", "decided", "seconds"):
        table.add_column(col, justify="left" if col in ("database", "RPC") else "right")
    for r in rows:
        table.add_row(
            r["database"], r["rpc"], f"{r['sessions']:,}", f"{r['decisions']:,}", f"{r['seconds']:.2f}"
        )
    return table


def _processes_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(
        title="serve --processes N on PostgreSQL (the load generator shares the same 2 cores)",
    )
    for col in ("RPC", "processes", "in flight", "req/s", "p50 ms", "p99 ms", "server CPU us/call"):
        table.add_column(col, justify="left" if col == "RPC" else "right")
    for r in rows:
        table.add_row(
            NAMES.get(r["workload"], r["workload"]),
            str(r["processes"]),
            str(r["concurrency"]),
            _num(r["rps"], ".0f"),
            _num(r["p50_ms"], ".2f"),
            _num(r["p99_ms"], ".2f"),
            _num(r.get("server_cpu_us"), ".0f"),
        )
    return table


def _runs_table(title: str, runs: list[dict[str, Any]]) -> Table:
    """Load-generator runs (bench.Run as dicts), one row each."""
    table = Table(title=title)
    for col in (
        "database",
        "RPC",
        "in flight",
        "req/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "of ceiling",
        "server CPU us/call",
        "CPU x ceiling",
        "errors",
    ):
        table.add_column(col, justify="left" if col in ("database", "RPC", "errors") else "right")
    for r in runs:
        table.add_row(
            r["database"],
            NAMES.get(r["workload"], r["workload"]),
            str(r["concurrency"]),
            _num(r["rps"], ".0f"),
            _num(r["p50_ms"], ".2f"),
            _num(r["p95_ms"], ".2f"),
            _num(r["p99_ms"], ".2f"),
            _num(r["ratio_to_ceiling"], ".0%"),
            _num(r.get("server_cpu_us"), ".0f"),
            _num(r.get("server_cpu_ratio_to_ceiling"), ".2f"),
            ", ".join(f"{k} {v}" for k, v in r["errors"].items()),
        )
    return table


def _floor_table(rows: list[dict[str, Any]]) -> Table:
    """Our server (SQLite, defaults) against each floor (bench/floor.py), call for call."""
    table = Table(
        title="Against the floors: bare = grpcio + sqlite3, six statements (issue 24); "
        "stack = + peewee, one transitions event, a JSON access line through logging (issue 35)"
    )
    for col in (
        "floor",
        "RPC",
        "in flight",
        "floor req/s",
        "ours req/s",
        "ours / floor",
        "floor CPU us",
        "ours CPU us",
        "CPU x floor",
        "floor cs/call",
        "ours cs/call",
        "cs x floor",
        "p99 x floor",
    ):
        table.add_column(col, justify="left" if col in ("floor", "RPC") else "right")
    for r in rows:
        for workload in ("cancel", "get_payment", "list_payments"):
            got = r[workload]
            floor, ours = got["floor"], got["ours"] or {}
            table.add_row(
                r["floor"],
                NAMES[workload],
                str(r["concurrency"]),
                _num(floor["rps"], ".0f"),
                _num(ours.get("rps"), ".0f"),
                _num(got["rps_ratio"], ".2f"),
                _num(floor.get("server_cpu_us"), ".0f"),
                _num(ours.get("server_cpu_us"), ".0f"),
                _num(got["cpu_ratio"], ".2f"),
                _num(floor.get("server_switches"), ".1f"),
                _num(ours.get("server_switches"), ".1f"),
                _num(got["switches_ratio"], ".2f"),
                _num(got["p99_ratio"], ".2f"),
            )
    return table


def _instructions_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Instructions per call, in-process (callgrind; SQLite synchronous=normal)")
    for col in ("RPC", "ours", "the stack's floor", "ours x floor"):
        table.add_column(col, justify="left" if col == "RPC" else "right")
    for r in rows:
        table.add_row(
            NAMES[r["rpc"]],
            f"{r['ours'] / 1000:,.0f} K",
            f"{r['stack'] / 1000:,.0f} K",
            _num(r["ratio"], ".2f"),
        )
    return table


def _relay_table(r: dict[str, Any]) -> Table:
    relay = Table(title="kara-sessions relay: the feed into NATS JetStream (SQLite server)")
    for col in ("backlog events", "events/s", "live events", "commit -> subscriber p50 ms", "p99 ms"):
        relay.add_column(col, justify="right")
    relay.add_row(
        str(r["backlog_events"]),
        _num(r["events_per_s"], ".0f"),
        str(r["live_events"]),
        _num(r["p50_ms"], ".2f"),
        _num(r["p99_ms"], ".2f"),
    )
    return relay


def _delivery_table(rows: list[dict[str, Any]]) -> Table:
    delivery = Table(title="From a committed cancellation to its arrival on an open StreamEvents")
    for col in ("database", "events", "p50 ms", "p99 ms", "max ms"):
        delivery.add_column(col, justify="left" if col == "database" else "right")
    for d in rows:
        delivery.add_row(
            d["database"],
            str(d["events"]),
            _num(d["p50_ms"], ".2f"),
            _num(d["p99_ms"], ".2f"),
            _num(d["max_ms"], ".2f"),
        )
    return delivery


def _durability_table(rows: list[dict[str, Any]]) -> Table:
    durable = Table(title="SQLite durability: synchronous=NORMAL against FULL (the default), same run")
    for col in ("RPC", "in flight", "synchronous", "req/s", "p50 ms", "p99 ms", "req/s vs normal"):
        durable.add_column(col, justify="left" if col in ("RPC", "synchronous") else "right")
    normal = {r["workload"]: r["rps"] for r in rows if r["synchronous"] == "normal"}
    for r in rows:
        base = normal.get(r["workload"])
        durable.add_row(
            NAMES.get(r["workload"], r["workload"]),
            str(r["concurrency"]),
            r["synchronous"],
            _num(r["rps"], ".0f"),
            _num(r["p50_ms"], ".2f"),
            _num(r["p99_ms"], ".2f"),
            _num(r["rps"] / base if base else None, ".0%"),
        )
    return durable


def print_report(results: dict[str, Any]) -> None:
    console = Console(width=130)
    m = results["machine"]
    console.print(
        f"[bold]kara-sessions benchmark[/] on {m['cpu']} ({m['cores']} cores, {m['memory']}), "
        f"Python {m['python']}, grpcio {m['grpcio']}, SQLite {m['sqlite']}; "
        f"{results['settings']['duration_s']} s per run; server: {results['settings']['server']}"
    )
    for note in results.get("skipped", []):
        console.print(f"[yellow]{note}[/]")

    title = "Throughput and latency (load generator in its own process)"
    console.print(_runs_table(title, results.get("runs", [])))

    for key, table in (
        ("floor", _floor_table),
        ("instructions", _instructions_table),
        ("processes", _processes_table),
    ):
        if results.get(key):
            console.print(table(results[key]))

    if results.get("pinned"):
        pinned = results["pinned"]
        title = f"serve --cpus {pinned[0]['cpus']}: SQLite again, every server thread on one CPU"
        console.print(_runs_table(title, pinned))

    sections: tuple[tuple[str, Callable[[Any], Table]], ...] = (
        ("growth", _growth_table),
        ("reports", _reports_table),
        ("event_delivery", _delivery_table),
        ("relay", _relay_table),
        ("durability", _durability_table),
    )
    for key, draw in sections:
        if results.get(key):
            console.print(draw(results[key]))

    if results.get("profile"):
        _print_profile(console, results["profile"])

    if results.get("targets"):
        t = Table(title="Targets")
        for col in ("target", "value", "goal", "met"):
            t.add_column(col)
        for row in results["targets"]:
            value = row["value"]
            shown = "-" if value is None else (f"{value:.0%}" if "share" in row["target"] else f"{value:.2f}")
            t.add_row(row["target"], shown, row["goal"], "yes" if row["met"] else "[red]NO[/]")
        console.print(t)


def _print_profile(console: Console, p: dict[str, Any]) -> None:
    console.print(
        f"[bold]One cancellation, in-process on SQLite:[/] state machine transition "
        f"{p['transition_us']:.0f} us; whole service call (domain, ORM, database, commit) "
        f"{p['service_cancel_us']:.0f} us; over gRPC at 1 in flight p50 "
        f"{_num(p['rpc_cancel_p50_us_at_c1'], '.0f')} us (the difference is transport and interceptor)."
    )
    handler = p.get("handler_cpu_us") or {}
    if handler:
        console.print(
            "[bold]CPU per call through interceptor, servicer and service, in-process[/] (no transport, "
            "no other thread; best of 5 rounds): "
            + ", ".join(f"{name} {us:.0f} us" for name, us in handler.items())
            + ". The server's CPU per call is this plus gRPC's share, both inflated by sharing the cores."
        )
    shares = Table(title="Where the service call's time goes (cProfile, own time)")
    shares.add_column("component")
    shares.add_column("share", justify="right")
    for component, share in p["shares"].items():
        shares.add_row(component, f"{share:.0%}")
    console.print(shares)
