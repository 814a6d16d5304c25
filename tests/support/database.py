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
    """No credit created or lost: for every account (a client's, in one programme) and every lot
    in it (its credits that expire together), the balances equal the ledger's sums; every lot
    holds what it was granted; each session held its credit from the lot it names; and the
    credits held are those of the booked sessions."""
    snapshot = db_snapshot(server)
    columns = ("available", "held", "used", "expired")
    moves = {
        "GRANT": {"available": 1},
        "HOLD": {"available": -1, "held": 1},
        "RETURN": {"held": -1, "available": 1},
        "TAKE": {"held": -1, "used": 1},
        "REFUND": {"used": -1, "available": 1},
        "EXPIRE": {"available": -1, "expired": 1},
    }
    sums: dict[tuple[str, str], dict[str, int]] = {}
    lot_sums: dict[tuple[str, str, Any], dict[str, int]] = {}
    held_from: dict[str, Any] = {}
    for entry in snapshot["ledger_entries"]:
        key = (entry["client_id"], entry["programme_id"])
        lot = (*key, entry["expires_at"])
        for acc in (
            sums.setdefault(key, dict.fromkeys(columns, 0)),
            lot_sums.setdefault(lot, dict.fromkeys(columns, 0)),
        ):
            for column, sign in moves[entry["kind"]].items():
                acc[column] += sign * entry["credits"]
        if entry["kind"] == "HOLD":
            held_from[entry["session_id"]] = entry["expires_at"]
    for account in snapshot["credit_accounts"]:
        key = (account["client_id"], account["programme_id"])
        expected = sums.get(key, dict.fromkeys(columns, 0))
        actual = {k: account[k] for k in columns}
        assert actual == expected, f"account {key} disagrees with its ledger"
    lot_totals: dict[tuple[str, str], dict[str, int]] = {}
    for row in snapshot["credit_lots"]:
        lot = (row["client_id"], row["programme_id"], row["expires_at"])
        actual = {k: row[k] for k in columns}
        assert actual == lot_sums.get(lot, dict.fromkeys(columns, 0)), f"lot {lot} disagrees with its ledger"
        assert row["granted"] == sum(actual.values()), f"lot {lot} does not add up to its grants"
        totals = lot_totals.setdefault(lot[:2], dict.fromkeys(columns, 0))
        for k in columns:
            totals[k] += row[k]
    for account in snapshot["credit_accounts"]:
        # Credits that never expire have no lot row: they are what the lots leave of the account.
        key = (account["client_id"], account["programme_id"])
        in_lots = lot_totals.get(key, dict.fromkeys(columns, 0))
        never = {k: account[k] - in_lots[k] for k in columns}
        assert never == lot_sums.get((*key, None), dict.fromkeys(columns, 0)), (
            f"{key}'s credits that never expire"
        )
        assert account["expiring_available"] == in_lots["available"], f"{key}'s count of expiring credits"
    for session in snapshot["sessions"]:
        if session["session_id"] in held_from:
            assert held_from[session["session_id"]] == session["credit_expires_at"], session["session_id"]
    held_sessions = sum(1 for s in snapshot["sessions"] if s["state"] == "BOOKED")
    assert sum(a["held"] for a in snapshot["credit_accounts"]) == held_sessions
