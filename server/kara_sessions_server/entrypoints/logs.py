"""Logging set-up: one JSON object per line when stderr is not a terminal (for collectors),
readable lines with key=value fields on a terminal. Tokens are never logged: nothing here or in
the interceptor ever sees more of a token than the principal it stands for."""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

from pythonjsonlogger.json import JsonFormatter

# Fields the RPC log line carries (as `extra`), in the order the text format shows them.
RPC_FIELDS = (
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


class KeyValueFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{k}={getattr(record, k)}" for k in RPC_FIELDS if getattr(record, k, "") not in ("", None)]
        return f"{line} {' '.join(fields)}" if fields else line


def configure(level: str = "INFO", fmt: LogFormat = "auto", stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
        if as_json
        else KeyValueFormatter()
    )
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
