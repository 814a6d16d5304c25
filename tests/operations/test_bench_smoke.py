"""A smoke run of `make bench` with tiny sizes: every part runs and reports. (The benchmark's
numbers are checked by reading them, never asserted here.) Its own target, `make test-bench`,
which `.ci/run` calls: at about 45 s it is the slowest test, and make test keeps to its time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.bench


def test_the_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--duration",
            "0.3",
            "--concurrency",
            "2",
            "--no-postgres",
            "--growth-sizes",
            "200,2000",
            "--event-count",
            "20",
            "--relay-count",
            "30",
            # Counted by callgrind, a run takes minutes: test_instructions_runs_each_call below.
            "--no-instructions",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    runs = {(r["workload"], r["concurrency"]): r for r in results["runs"]}
    assert set(runs) == {(w, 2) for w in ("ceiling", "book", "cancel", "get_payment", "list_payments")}
    for run in runs.values():
        assert run["requests"] > 0 and not run["errors"], run
        assert run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
        assert run["server_cpu_us"] > 0, "the server's CPU per call is read from /proc"
    assert runs["cancel", 2]["requests"] == runs["book", 2]["requests"], (
        "every booked session is cancelled once"
    )
    assert [(g["workload"], g["small"], g["large"]) for g in results["growth"]] == [
        ("get_payment", 200, 2000),
        ("list_payments (deep)", 200, 2000),
    ]
    # A programme's report over each growth database: seven in ten sessions decided (populate).
    reports = [(r["database"], r["rpc"], r["sessions"], r["decisions"]) for r in results["reports"]]
    assert reports == [
        ("sqlite", rpc, size, size // 10 * 7)
        for size in (200, 2000)
        for rpc in ("GetProgrammeUsage", "SimulateTerms")
    ]
    assert all(r["seconds"] > 0 for r in results["reports"])
    assert any(t["target"].startswith("GetProgrammeUsage sqlite over 2,000") for t in results["targets"])
    profile = results["profile"]
    assert profile["transition_us"] > 0 and profile["service_cancel_us"] > profile["transition_us"]
    assert abs(sum(profile["shares"].values()) - 1) < 1e-6
    handler = profile["handler_cpu_us"]
    assert set(handler) == {"GetPayment", "CancelSession"}
    assert 0 < handler["GetPayment"] < handler["CancelSession"], "a write costs more than a read"
    assert "PostgreSQL skipped: --no-postgres" in results["skipped"][0]
    if len(os.sched_getaffinity(0)) > 1:  # else there is no other CPU to compare with
        pinned = {r["workload"]: r for r in results["pinned"]}
        assert set(pinned) == {"ceiling", "get_payment", "cancel"}
        assert all(r["requests"] > 0 and not r["errors"] and r["server_cpu_us"] > 0 for r in pinned.values())
    assert [(d["database"], d["events"]) for d in results["event_delivery"]] == [("sqlite", 20)]
    relay = results["relay"]
    assert (relay["backlog_events"], relay["live_events"]) == (30, 30)
    assert relay["events_per_s"] > 0 and 0 < relay["p50_ms"] <= relay["p99_ms"]
    assert 0 < results["event_delivery"][0]["p50_ms"] <= results["event_delivery"][0]["p99_ms"]
    durability = [(r["synchronous"], r["workload"]) for r in results["durability"]]
    assert durability == [("normal", "book"), ("normal", "cancel"), ("full", "book"), ("full", "cancel")]
    assert all(r["rps"] > 0 and not r["errors"] for r in results["durability"])
    assert "SQLite durability" in done.stdout
    assert "Throughput and latency" in done.stdout and "Targets" in done.stdout
    floors = {(r["floor"], r["concurrency"]): r for r in results["floor"]}
    assert set(floors) == {("bare", 2), ("stack", 2)}
    for row in floors.values():
        for workload in ("cancel", "get_payment", "list_payments"):
            theirs, ours = row[workload]["floor"], row[workload]["ours"]
            assert theirs["requests"] > 0 and not theirs["errors"], (row["floor"], workload, theirs)
            assert theirs["server_switches"] > 0 and ours["server_switches"] > 0
            assert row[workload]["cpu_ratio"] > 0 and row[workload]["switches_ratio"] > 0
    assert "Against the floors" in done.stdout


@pytest.mark.parametrize("server", ["ours", "stack"])
@pytest.mark.parametrize("rpc", ["cancel", "get_payment", "list_payments"])
def test_instructions_runs_each_call(rpc: str, server: str) -> None:
    """What `make bench` runs under callgrind, run plainly: every call answers."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.instructions", "30", rpc, server],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
