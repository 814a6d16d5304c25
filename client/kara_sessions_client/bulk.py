"""`kara-sessions bulk-cancel`: cancel (or preview) many sessions from a CSV or JSON Lines file.

Each row's request_id comes from the row itself (or its request_id column), so running the same
file again after a crash or Ctrl-C completes what is missing and charges nothing twice: rows
that already went through get their first result back from the server.
"""

from __future__ import annotations

import contextvars
import csv
import io
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import grpc
from kara.sessions.v1 import sessions_pb2 as pb

from . import exit_codes
from .client import PARTIES, KaraError, SessionsClient

# Fixed namespace: the same row always maps to the same request_id, on any machine.
REQUEST_ID_NAMESPACE = uuid.UUID("6f1d2a8e-4b7c-5e19-9a3d-0c8b7e6f5a41")
COLUMNS = ("session_id", "cancelled_by", "charge_client", "notified_at", "reason", "request_id")
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f", ""}


@dataclass(frozen=True)
class Row:
    line: int
    session_id: str
    cancelled_by: str
    charge_client: bool
    notified_at: datetime | None
    reason: str
    request_id: str


class BadHeader(ValueError):
    """A CSV file whose first line does not name the columns: no row of it can be read."""


@dataclass(frozen=True)
class Malformed:
    line: int
    session_id: str
    message: str


@dataclass
class Result:
    line: int
    session_id: str
    cancelled_by: str
    # OK, a gRPC code name (refused/failed), MALFORMED, NOT_SENT (stopped before it started) or
    # UNKNOWN (stopped while its call was unanswered: run the file again to settle it).
    status: str
    reason: str = ""  # the server's ErrorInfo reason, e.g. SESSION_NOT_BOOKED
    outcome: str = ""  # VOIDED or PAID
    notice_seconds: int | None = None
    credits_returned: int = 0
    credits_taken: int = 0
    message: str = ""
    request_id: str = ""
    # The server answered with this row's first result (an earlier run made the change).
    replayed: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "OK"


def derive_request_id(
    session_id: str, cancelled_by: str, charge_client: bool, notified_at: datetime | None, reason: str
) -> str:
    canonical = "\x1f".join(
        [
            "bulk-cancel/v1",
            session_id,
            cancelled_by,
            str(charge_client).lower(),
            notified_at.isoformat() if notified_at else "",
            reason,
        ]
    )
    return f"bulk-{uuid.uuid5(REQUEST_ID_NAMESPACE, canonical)}"


# --- reading ---------------------------------------------------------------------------------


def read_rows(stream: IO[str], fmt: str) -> tuple[list[Row], list[Malformed]]:
    """Parses every row; malformed ones are returned separately with their line numbers. A CSV
    header that does not name the columns raises BadHeader."""
    text = stream.read()
    if fmt == "auto":
        fmt = "jsonl" if text.lstrip().startswith("{") else "csv"
    records = _jsonl_records(text) if fmt == "jsonl" else _csv_records(text)
    rows: list[Row] = []
    bad: list[Malformed] = []
    for line, record in records:
        if isinstance(record, str):
            bad.append(Malformed(line, "", record))
            continue
        try:
            rows.append(_parse(line, record))
        except ValueError as exc:
            bad.append(Malformed(line, str(record.get("session_id") or ""), str(exc)))
    return rows, bad


def _csv_records(text: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    if not text.strip():
        return  # an empty file has no rows, not a malformed header
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    expected = ", ".join(COLUMNS)
    missing = ", ".join(sorted({"session_id", "cancelled_by"} - set(header)))
    if missing:
        raise BadHeader(f"line 1: the header must name the columns {expected}; missing: {missing}")
    unknown = ", ".join(sorted(set(header) - set(COLUMNS)))
    if unknown:
        raise BadHeader(f"line 1: unknown column(s) {unknown}; expected {expected}")
    reader.fieldnames = header
    for record in reader:
        if None in record:
            yield reader.line_num, "more fields than the header names"
        elif any(v is None for v in record.values()):
            yield reader.line_num, "fewer fields than the header names"
        elif any(v.strip() for v in record.values()):
            yield reader.line_num, record


def _jsonl_records(text: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            yield line, f"not valid JSON: {exc.msg}"
            continue
        if not isinstance(record, dict):
            yield line, "each line must be a JSON object"
            continue
        unknown = set(record) - set(COLUMNS)
        yield (line, f"unknown field(s) {', '.join(sorted(unknown))}") if unknown else (line, record)


def _parse(line: int, record: dict[str, Any]) -> Row:
    session_id = str(record.get("session_id") or "").strip()
    if not session_id:
        raise ValueError("session_id is missing")
    who = str(record.get("cancelled_by") or "").strip().lower().removeprefix("party_")
    if who not in PARTIES:
        raise ValueError(f"cancelled_by must be client or professional, not {record.get('cancelled_by')!r}")
    charge = _parse_bool(record.get("charge_client"))
    notified_at = _parse_time(record.get("notified_at"))
    reason = str(record.get("reason") or "")
    request_id = str(record.get("request_id") or "").strip() or derive_request_id(
        session_id, who, charge, notified_at, reason
    )
    return Row(line, session_id, who, charge, notified_at, reason, request_id)


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value if value is not None else "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"charge_client must be true or false, not {value!r}")


def _parse_time(value: Any) -> datetime | None:
    text = str(value or "").strip()
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"notified_at {text!r} is not an ISO-8601 time") from None
    if parsed.tzinfo is None:
        raise ValueError(f"notified_at {text!r} has no timezone (add Z or +00:00)")
    return parsed


# --- running ---------------------------------------------------------------------------------


class RateLimiter:
    """At most `per_second` starts per second across threads (None: unlimited)."""

    def __init__(self, per_second: float | None, stop: threading.Event | None = None):
        self.interval = 1.0 / per_second if per_second else 0.0
        self.next_start = time.monotonic()
        self.lock = threading.Lock()
        self.stop = stop or threading.Event()

    def wait(self) -> bool:
        """Waits for this thread's turn; False if a stop came first."""
        if not self.interval:
            return not self.stop.is_set()
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        return not self.stop.wait(max(0.0, start - now))


_OUTCOME = {pb.PAYMENT_STATE_VOIDED: "VOIDED", pb.PAYMENT_STATE_PAID: "PAID"}


def _run_row(client: SessionsClient, row: Row, dry_run: bool) -> Result:
    result = Result(row.line, row.session_id, row.cancelled_by, "OK", request_id=row.request_id)
    kwargs: dict[str, Any] = {
        "charge_client": row.charge_client,
        "notified_at": row.notified_at,
        "reason": row.reason,
    }
    try:
        if dry_run:
            preview = client.preview(row.session_id, row.cancelled_by, **kwargs)
            payment_state, notice = preview.payment_state, preview.notice_seconds
        else:
            done, replayed = client.cancel_replayed(
                row.session_id, row.cancelled_by, request_id=row.request_id, **kwargs
            )
            payment_state, notice = done.payment.state, done.session.cancellation.notice_seconds
            result.replayed = replayed
    except KaraError as exc:
        result.status = exc.code.name
        result.reason = exc.reason
        result.message = exc.message
        return result
    result.outcome = _OUTCOME.get(payment_state, str(payment_state))
    result.notice_seconds = notice
    result.credits_returned = int(result.outcome == "VOIDED")
    result.credits_taken = int(result.outcome == "PAID")
    return result


NOT_SENT, UNKNOWN, MALFORMED = "NOT_SENT", "UNKNOWN", "MALFORMED"
# A stop lets the calls in flight finish for this long before they are reported UNKNOWN.
STOP_GRACE_SECONDS = 5.0


def run(
    client: SessionsClient,
    rows: Iterable[Row],
    *,
    dry_run: bool,
    concurrency: int,
    rate: float | None,
    on_result: Callable[[Result], None],
    stop: threading.Event | None = None,
    grace: float = STOP_GRACE_SECONDS,
) -> list[Result]:
    """Runs every row, `concurrency` at a time, starting at most `rate` a second. Once `stop`
    is set no row starts; the calls in flight get `grace` seconds to be answered. Every row
    gets a result: its outcome, NOT_SENT, or UNKNOWN (its call unanswered when time ran out).
    `on_result` is told of each on the calling thread, so it may print."""
    stop = stop or threading.Event()
    limiter = RateLimiter(rate, stop)
    todo = list(rows)
    feed = iter(todo)
    lock = threading.Lock()
    finished: queue.Queue[Result] = queue.Queue()
    started: dict[int, Row] = {}

    def work() -> None:
        while not stop.is_set():
            with lock:
                row = next(feed, None)
            if row is None or not limiter.wait():
                return
            with lock:
                started[row.line] = row
            finished.put(_run_row(client, row, dry_run))

    # Daemon threads, so a call still unanswered after the grace cannot hold the process up; each
    # runs in the caller's context, so a trace the caller is in reaches the server with every row.
    workers = [
        threading.Thread(target=contextvars.copy_context().run, args=(work,), name=f"bulk-{n}", daemon=True)
        for n in range(min(concurrency, len(todo)) or 1)
    ]
    for worker in workers:
        worker.start()
    results: dict[int, Result] = {}
    give_up: float | None = None
    while any(w.is_alive() for w in workers) or not finished.empty():
        try:
            result = finished.get(timeout=0.1)
        except queue.Empty:
            if stop.is_set() and give_up is None:
                give_up = time.monotonic() + grace
            if give_up is not None and time.monotonic() >= give_up:
                break
            continue
        results[result.line] = result
        on_result(result)
    for row in todo:
        if row.line not in results:
            status = UNKNOWN if row.line in started else NOT_SENT
            results[row.line] = Result(
                row.line, row.session_id, row.cancelled_by, status, request_id=row.request_id
            )
    return sorted(results.values(), key=lambda r: r.line)


def malformed_results(bad: Iterable[Malformed]) -> list[Result]:
    return [Result(b.line, b.session_id, "", MALFORMED, message=b.message) for b in bad]


# --- reporting -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Totals:
    rows: int
    voided: int
    paid: int
    refused: int
    failed: int
    malformed: int
    credits_returned: int
    credits_taken: int
    # Left by a stop: never started, or started and not answered in time (run the file again).
    not_sent: int = 0
    unknown: int = 0
    # Of the done rows, those an earlier run had made (their first result, replayed).
    replayed: int = 0

    @classmethod
    def of(cls, results: list[Result]) -> Totals:
        ok = [r for r in results if r.ok]
        errors = [r for r in results if not r.ok and r.status not in (MALFORMED, NOT_SENT, UNKNOWN)]
        return cls(
            rows=len(results),
            voided=sum(r.outcome == "VOIDED" for r in ok),
            paid=sum(r.outcome == "PAID" for r in ok),
            refused=sum(_refused(r) for r in errors),
            failed=sum(not _refused(r) for r in errors),
            malformed=sum(r.status == MALFORMED for r in results),
            credits_returned=sum(r.credits_returned for r in ok),
            credits_taken=sum(r.credits_taken for r in ok),
            not_sent=sum(r.status == NOT_SENT for r in results),
            unknown=sum(r.status == UNKNOWN for r in results),
            replayed=sum(r.replayed for r in ok),
        )


def _refused(result: Result) -> bool:
    return exit_codes.for_code(grpc.StatusCode[result.status]) == exit_codes.REFUSED


def write_results(path: Path, results: list[Result]) -> None:
    """CSV, or JSON Lines when the name ends in .jsonl/.ndjson."""
    fields = [
        "line",
        "session_id",
        "cancelled_by",
        "status",
        "reason",
        "outcome",
        "notice_seconds",
        "credits_returned",
        "credits_taken",
        "message",
        "request_id",
        "replayed",
    ]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as out:
        if path.suffix in (".jsonl", ".ndjson"):
            for r in results:
                out.write(json.dumps({k: asdict(r)[k] for k in fields}) + "\n")
        else:
            writer = csv.DictWriter(out, fieldnames=fields)
            writer.writeheader()
            for r in results:
                writer.writerow({k: asdict(r)[k] for k in fields})
    tmp.replace(path)  # never leave a half-written results file behind
