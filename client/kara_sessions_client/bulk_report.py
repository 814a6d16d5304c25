"""What `bulk-cancel` shows: a progress bar on a terminal, one plain line per row otherwise, a
table for --dry-run, and the totals."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import bulk, exit_codes
from .client import SessionsClient
from .render import duration


def _describe(r: bulk.Result) -> str:
    if r.ok:
        moved = "credit returned" if r.outcome == "VOIDED" else "credit taken"
        earlier = ", done by an earlier run: replayed, nothing changed" if r.replayed else ""
        return f"{r.outcome} ({moved}, notice {duration(r.notice_seconds)}{earlier})"
    if r.status == bulk.NOT_SENT:
        return "NOT_SENT (stopped before it started)"
    if r.status == bulk.UNKNOWN:
        return "UNKNOWN (no answer before the stop: run the file again to settle it)"
    reason = f" [{r.reason}]" if r.reason else ""
    return f"{r.status}{reason}: {r.message}"


@contextmanager
def _progress(
    console: Console, total: int, verb: str, lines: bool
) -> Iterator[Callable[[bulk.Result], None]]:
    if console.is_terminal:
        with Progress(
            TextColumn(f"{verb}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as bar:
            task = bar.add_task(verb, total=total)
            yield lambda _result: bar.advance(task)
    elif not lines:
        yield lambda _result: None
    else:
        # One line per finished row, flushed, so a log or a supervising script sees progress.
        def line(r: bulk.Result) -> None:
            print(f"line {r.line} {r.session_id}: {_describe(r)}", flush=True)

        yield line


def _table(results: list[bulk.Result]) -> Table:
    table = Table(title="Preview (nothing was changed)")
    for column in ("line", "session", "who", "notice", "outcome", "credit"):
        table.add_column(column, no_wrap=True)
    table.add_column("error (full text in --results)", overflow="fold")
    for r in results:
        credit = "returned" if r.credits_returned else "taken" if r.credits_taken else ""
        error = "" if r.ok else r.reason or f"{r.status}: {r.message}"
        table.add_row(
            str(r.line), r.session_id, r.cancelled_by, duration(r.notice_seconds), r.outcome, credit, error
        )
    return table


def _summary(totals: bulk.Totals, dry_run: bool) -> str:
    would = "would be " if dry_run else ""
    extra = ""
    if totals.not_sent or totals.unknown:
        extra = f", {totals.not_sent} not sent, {totals.unknown} unknown"
    if totals.replayed:
        extra += f" ({totals.replayed} done by an earlier run, replayed)"
    return (
        f"{totals.rows} rows: {totals.voided} {would}voided, {totals.paid} {would}paid, "
        f"{totals.refused} refused, {totals.failed} failed (transient), {totals.malformed} malformed"
        f"{extra}; credits {would}returned {totals.credits_returned}, {would}taken {totals.credits_taken}"
    )


@contextmanager
def _stoppable() -> Iterator[tuple[threading.Event, list[int]]]:
    """The first SIGINT (Ctrl-C) or SIGTERM sets the event: no new row starts. A second one
    ends the process at once. Yields the event and the signal numbers received."""
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        if stop.is_set():
            print("\nstopped at once: no results file was written", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        stop.set()
        print(
            f"\nstopping: no new rows; waiting up to {bulk.STOP_GRACE_SECONDS:.0f} s for the calls in "
            "flight (again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, on_signal) for signum in handled}
    try:
        yield stop, received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_bulk(
    client: SessionsClient,
    file: TextIO,
    fmt: str,
    dry_run: bool,
    concurrency: int,
    rate: float | None,
    results_path: str | None,
    strict: bool,
) -> int:
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a log or a pipe: don't squeeze the table into 80 columns
    try:
        rows, bad = bulk.read_rows(file, fmt)
    except bulk.BadHeader as exc:
        print(f"error: {exc}: nothing was sent", file=sys.stderr)
        return exit_codes.USAGE
    if not rows and not bad:
        print("error: the file holds no rows: nothing to cancel", file=sys.stderr)
        return exit_codes.USAGE
    malformed = bulk.malformed_results(bad)
    for m in bad:
        print(f"line {m.line}: malformed, not sent: {m.message}", file=sys.stderr)
    if strict and bad:
        print(f"--strict: {len(bad)} malformed row(s); nothing was sent.", file=sys.stderr)
        return exit_codes.REFUSED

    verb = "previewing" if dry_run else "cancelling"
    # A dry run ends with a table of every row; a real run reports each row as it finishes.
    with (
        _stoppable() as (stop, received),
        _progress(console, len(rows), verb, lines=not dry_run) as on_result,
    ):
        done = bulk.run(
            client, rows, dry_run=dry_run, concurrency=concurrency, rate=rate, on_result=on_result, stop=stop
        )
    results = sorted(done + malformed, key=lambda r: r.line)
    if dry_run:
        console.print(_table(results))
    if results_path:
        bulk.write_results(Path(results_path), results)
    totals = bulk.Totals.of(results)
    print(_summary(totals, dry_run), flush=True)
    if received:
        print(
            "Stopped: rows not sent or unknown are settled by running the same file again "
            "(rows already done are replayed, never charged twice).",
            file=sys.stderr,
        )
        return exit_codes.stopped_by(received[0])
    if totals.failed:
        print(
            "Some rows failed for a transient reason: run the same file again to finish them.",
            file=sys.stderr,
        )
        return exit_codes.FAILED
    return exit_codes.REFUSED if totals.refused or totals.malformed else exit_codes.OK
