"""Behind a transaction-mode pooler, as production PostgreSQL usually is (issue 33): PgBouncer
with its default configuration but `pool_mode = transaction`, which hands each transaction
whichever server connection is free. Nothing of a connection may carry from one transaction to
the next: no server-side prepared statement, no per-connection timeout, no session lock.

The race tests, the generated histories and the lock-wait bounds also run through it
(`ALL_DATABASES` in their modules); this module holds what only a pooler can break."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta

import grpc
import pytest

from kara_sessions_client.client import NO_RETRY, KaraError, SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start

from ..support.clock import FakeClock
from ..support.concurrency import race
from ..support.database import assert_ledger_balances

pytestmark = pytest.mark.postgres

CLIENTS = 6
GRANTED = 20
# Server errors a caller could not have caused: none may answer any call.
SERVER_FAULTS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS)
# What a race may honestly answer besides success: the policy's refusals (a charge with notice,
# a move of a cancelled session, no credit left) and a lost race. Never a database fault.
REFUSALS = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED)


@pytest.fixture
def pooled_server(pooled_database: str, clock: FakeClock) -> Iterator[RunningServer]:
    running = start(Settings(listen="127.0.0.1:0", database_url=pooled_database, max_workers=48), clock=clock)
    yield running
    running.stop(grace=1)


def test_credits_are_conserved_through_the_pooler_under_48_way_races(
    pooled_server: RunningServer, clock: FakeClock
) -> None:
    """Rounds of 48 mixed calls at once (bookings, cancellations either way, moves, grants) on a
    few clients' accounts: each connection runs every statement far more than psycopg's five
    times before it would prepare one. Every call is answered by the policy or a lost race,
    never by a database fault, and every account equals its ledger and its grants."""
    rng = random.Random(33)
    booked: list[str] = []
    grants = {f"client-{c}": GRANTED for c in range(CLIENTS)}
    lock = threading.Lock()
    with SessionsClient(f"127.0.0.1:{pooled_server.port}", retry=NO_RETRY) as kara:
        for c in range(CLIENTS):
            kara.grant_credits(f"client-{c}", GRANTED, request_id=f"grant-{c}")

        def call(i: int) -> object:
            client = f"client-{i % CLIENTS}"
            kind = plan[i]
            if kind == "book" or not booked:
                hours = rng.choice((5, 30, 70))
                session = kara.book(client, f"pro-{i % 3}", clock.now() + timedelta(hours=hours, minutes=i))
                booked.append(session.session_id)
                return session
            target = rng.choice(booked)
            if kind == "cancel":
                by = rng.choice(("client", "professional"))
                return kara.cancel(target, by, charge_client=by == "professional" and rng.random() < 0.5)
            if kind == "move":
                to = clock.now() + timedelta(hours=rng.choice((3, 50, 90)), seconds=rng.randrange(1, 36_000))
                return kara.reschedule(target, to, "client")
            granted = kara.grant_credits(client, 1)
            with lock:
                grants[client] += 1
            return granted

        outcomes: dict[str, int] = {}
        for _ in range(8):
            plan = [rng.choice(("book", "book", "cancel", "move", "grant")) for _ in range(48)]
            for result in race(48, call):
                if isinstance(result, KaraError):
                    assert result.code not in SERVER_FAULTS, result
                    assert result.code in REFUSALS and not result.reason.startswith("DATABASE_"), result
                    outcomes[result.reason] = outcomes.get(result.reason, 0) + 1
                else:
                    outcomes["ok"] = outcomes.get("ok", 0) + 1
        assert outcomes["ok"] > 200, outcomes
        with pooled_server.storage.db.connection_context():
            assert pooled_server.storage.db.connection().prepare_threshold is None, "never prepares"
        for client, granted in grants.items():
            account = kara.get_credit_account(client)
            assert account.available + account.held + account.used == granted, client
    assert_ledger_balances(pooled_server)


def test_serve_and_migrate_need_nothing_of_the_poolers_configuration(
    pooled_database: str, tmp_path: object
) -> None:
    """PgBouncer's stock configuration refuses a startup packet with `options`: neither `migrate`
    nor `serve` sends one. Three `migrate` runs at once all succeed (the lock is the
    transaction's own, never the connection's)."""
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "kara_sessions_client.cli", "migrate", "--database-url", pooled_database],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    for run in runs:
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, (out, err)
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "kara_sessions_client.cli",
            "migrate",
            "--check",
            "--database-url",
            pooled_database,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check
