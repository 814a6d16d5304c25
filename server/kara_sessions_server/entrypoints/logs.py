"""Logging set-up: one JSON object per line when stderr is not a terminal (for collectors),
readable lines with key=value fields on a terminal. Tokens are never logged: nothing here or in
the interceptor ever sees more of a token than the principal it stands for."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Literal, TextIO

# Fields the RPC log line carries (as `extra`), in the order the text format shows them.
RPC_FIELDS = (
    "pid",
    "method",
    "code",
    "duration_ms",
    "principal",
    "session_id",
    "invoice_id",
    "request_id",
    "peer",
    "incident",
)

LogFormat = Literal["auto", "json", "text"]

# Libraries that log routine work at INFO: `transitions` writes three lines per state change,
# which tripled the log and cost a fifth of a cancellation's time (BENCHMARKS.md).
QUIET_LIBRARIES = ("transitions",)


# What every LogRecord carries; anything else on a record came as `extra` and is logged as a field.
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime", "taskName"}
)


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, then every `extra` field.

    Written for the access line every RPC writes (issue 15): the generic JSON formatter it
    replaces cost several times as much per line. The time's second is formatted once per
    second, not once per record."""

    def __init__(self) -> None:
        super().__init__()
        # (second, its text), replaced as one object so that threads never see a mixed pair.
        self._second: tuple[int, str] = (-1, "")

    def _time(self, created: float) -> str:
        second = int(created)
        cached, text = self._second
        if second != cached:
            text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = (second, text)
        return f"{text},{int((created - second) * 1000):03d}"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self._time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES:
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


class KeyValueFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{k}={getattr(record, k)}" for k in RPC_FIELDS if getattr(record, k, "") not in ("", None)]
        return f"{line} {' '.join(fields)}" if fields else line


class _ProcessId(logging.Filter):
    """Adds `pid` to every record: with `serve --processes N`, which process wrote the line."""

    def __init__(self) -> None:
        super().__init__()
        self.pid = os.getpid()

    def filter(self, record: logging.LogRecord) -> bool:
        record.pid = self.pid
        return True


def configure(
    level: str = "INFO", fmt: LogFormat = "auto", stream: TextIO | None = None, with_pid: bool = False
) -> None:
    stream = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLineFormatter() if as_json else KeyValueFormatter())
    if with_pid:
        handler.addFilter(_ProcessId())
    # The logging HOWTO's "Optimization": our formats show no caller, thread or process, so
    # skip collecting them (finding the caller walks the stack on every record).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
