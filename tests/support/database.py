"""The test databases, and reading every row back: to prove a refusal changed nothing and that
no credit was created or lost."""

from __future__ import annotations

import os
from typing import Any

import psycopg

from kara_sessions_server.adapters.storage import TABLES
from kara_sessions_server.entrypoints.grpc.server import RunningServer

POSTGRES_URL = os.environ.get("KARA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
ON_CI = os.environ.get("CI", "").lower() == "true"


def reset_postgres(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for table in TABLES:
            conn.execute(f'DROP TABLE IF EXISTS "{table._meta.table_name}" CASCADE')


def db_snapshot(server: RunningServer) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table, to prove a refused request changed nothing."""
    with server.storage.bound(), server.unit_of_work(write=False):
        return {t._meta.table_name: list(t.select().order_by(*t._meta.sorted_fields).dicts()) for t in TABLES}


def assert_ledger_balances(server: RunningServer) -> None:
    """No credit created or lost: for every account (a client's, in one programme), the balances
    equal the ledger's sums, and the credits held are those of its booked sessions."""
    snapshot = db_snapshot(server)
    sums: dict[tuple[str, str], dict[str, int]] = {}
    moves = {
        "GRANT": {"available": 1},
        "HOLD": {"available": -1, "held": 1},
        "RETURN": {"held": -1, "available": 1},
        "TAKE": {"held": -1, "used": 1},
        "REFUND": {"used": -1, "available": 1},
    }
    for entry in snapshot["ledger_entries"]:
        key = (entry["client_id"], entry["programme_id"])
        acc = sums.setdefault(key, {"available": 0, "held": 0, "used": 0})
        for column, sign in moves[entry["kind"]].items():
            acc[column] += sign * entry["credits"]
    for account in snapshot["credit_accounts"]:
        key = (account["client_id"], account["programme_id"])
        expected = sums.get(key, {"available": 0, "held": 0, "used": 0})
        actual = {k: account[k] for k in ("available", "held", "used")}
        assert actual == expected, f"account {key} disagrees with its ledger"
    held_sessions = sum(1 for s in snapshot["sessions"] if s["state"] == "BOOKED")
    assert sum(a["held"] for a in snapshot["credit_accounts"]) == held_sessions
