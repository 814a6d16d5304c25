"""The test databases, and reading every row back: to prove a refusal changed nothing and that
no credit was created or lost."""

from __future__ import annotations

import os
from typing import Any

import psycopg

from kara_sessions_server.adapters.storage import TABLES
from kara_sessions_server.entrypoints.grpc.server import RunningServer
from kara_sessions_server.service_layer.unit_of_work import UnitOfWork

POSTGRES_URL = os.environ.get("KARA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
ON_CI = os.environ.get("CI", "").lower() == "true"


def reset_postgres(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for table in TABLES:
            conn.execute(f'DROP TABLE IF EXISTS "{table._meta.table_name}" CASCADE')


def db_snapshot(server: RunningServer) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table, to prove a refused request changed nothing."""
    with UnitOfWork(server.storage, write=False):
        return {t._meta.table_name: list(t.select().order_by(*t._meta.sorted_fields).dicts()) for t in TABLES}


def assert_ledger_balances(server: RunningServer) -> None:
    """No credit created or lost: for every account, the balances equal the ledger's sums."""
    snapshot = db_snapshot(server)
    sums: dict[str, dict[str, int]] = {}
    for entry in snapshot["ledger_entries"]:
        acc = sums.setdefault(entry["client_id"], {"available": 0, "held": 0, "used": 0})
        n = entry["credits"]
        kind = entry["kind"]
        if kind == "GRANT":
            acc["available"] += n
        elif kind == "HOLD":
            acc["available"] -= n
            acc["held"] += n
        elif kind == "RETURN":
            acc["held"] -= n
            acc["available"] += n
        elif kind == "TAKE":
            acc["held"] -= n
            acc["used"] += n
    for account in snapshot["credit_accounts"]:
        expected = sums.get(account["client_id"], {"available": 0, "held": 0, "used": 0})
        actual = {k: account[k] for k in ("available", "held", "used")}
        assert actual == expected, f"account {account['client_id']} disagrees with its ledger"
    held_sessions = sum(1 for s in snapshot["sessions"] if s["state"] == "BOOKED")
    assert sum(a["held"] for a in snapshot["credit_accounts"]) == held_sessions
