"""A full disk says so (issue 33): SQLite on a real filesystem that runs out of space (a small
tmpfs this test mounts, as root). A failed COMMIT is followed by a failed ROLLBACK ("cannot
rollback - no transaction is active"); the first error says what happened, and the caller
gets RESOURCE_EXHAUSTED DATABASE_FULL, not "the database could not be reached"."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import peewee as pw
import psycopg
import pytest
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import NO_RETRY, KaraError, SessionsClient
from kara_sessions_server.adapters import faults
from kara_sessions_server.entrypoints.grpc.server import Settings, start

from ..support.clock import FakeClock
from ..support.database import ON_CI, assert_ledger_balances

DISK_BYTES = 3 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        message = f"cannot mount a small tmpfs (needs root): {done.stderr.strip()}"
        if ON_CI:
            pytest.fail(f"CI=true requires the full-disk test: {message}")
        pytest.skip(message)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    """Writes a file until the filesystem has no byte left; returns it (removing it frees the space)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as out:
        chunk = b"\0" * 65536
        while True:
            try:
                out.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return filler
                chunk = chunk[: len(chunk) // 2]


def test_a_full_disk_is_resource_exhausted_database_full_and_heals_without_a_restart(
    small_disk: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    running = start(
        Settings(listen="127.0.0.1:0", database_url=f"sqlite:///{small_disk / 'kara.db'}"), clock=clock
    )
    try:
        with SessionsClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as kara:
            kara.grant_credits("client-1", 2)
            session_id = kara.book("client-1", "pro-1", clock.now() + timedelta(days=3)).session_id
            filler = _fill(small_disk)
            caplog.set_level(logging.WARNING, logger="kara_sessions_server.rpc")
            refused: list[KaraError] = []
            # WAL pages already on disk take a few changes before one needs a new page.
            for i in range(400):
                try:
                    kara.grant_credits("client-1", 1, request_id=f"grant-{i}")
                except KaraError as exc:
                    refused.append(exc)
                    if len(refused) == 3:
                        break
            assert len(refused) == 3, "the disk never filled"
            for exc in refused:
                assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                assert exc.reason == "DATABASE_FULL", exc
                assert "disk is full" in exc.message and "same request_id" in exc.message
            with pytest.raises(KaraError) as cancel:
                kara.cancel(session_id, "client", request_id="cancel-1")
            assert cancel.value.reason == "DATABASE_FULL"
            assert running.metrics.registry.get_sample_value("kara_database_full") == 1
            warned = [r for r in caplog.records if "DATABASE_FULL" in r.getMessage()]
            assert len(warned) == 1, "one WARNING a minute, not one per refused call"
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

            os.unlink(filler)
            # Nothing refused was applied; the same request_ids now succeed, without a restart.
            assert kara.get_session(session_id).state == pb.SESSION_STATE_BOOKED
            cancelled = kara.cancel(session_id, "client", request_id="cancel-1")
            assert cancelled.session.state == pb.SESSION_STATE_CANCELLED_VOIDED
            assert running.metrics.registry.get_sample_value("kara_database_full") == 0
            before = kara.get_credit_account("client-1").available
            for retried in range(i - 2, i + 1):
                kara.grant_credits("client-1", 1, request_id=f"grant-{retried}")
            assert kara.get_credit_account("client-1").available == before + 3
            assert any("accepts changes again" in r.getMessage() for r in caplog.records)
        assert_ledger_balances(running)
    finally:
        running.stop(grace=1)


@pytest.mark.parametrize(
    "first",
    [
        sqlite3.OperationalError("database or disk is full"),
        psycopg.errors.DiskFull("could not extend file: No space left on device"),
    ],
)
def test_the_first_error_classifies_the_fault_not_the_failed_rollback_after_it(first: Exception) -> None:
    """PostgreSQL's disk_full (53100) as SQLite's SQLITE_FULL, each followed by the error of the
    ROLLBACK that the failed COMMIT leaves nothing to undo."""
    try:
        try:
            raise pw.OperationalError(first) from first
        except pw.OperationalError:  # as peewee's rollback raises it: no `from`, only the context
            raise pw.OperationalError(  # noqa: B904
                sqlite3.OperationalError("cannot rollback - no transaction is active")
            )
    except pw.OperationalError as raised:
        fault = faults.classify(raised)
    assert fault is not None
    assert (fault.reason, fault.transient) == ("DATABASE_FULL", False)
