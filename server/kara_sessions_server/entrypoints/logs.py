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

    def head(self, created: float, level: str, logger: str, message: str) -> dict[str, Any]:
        """A line's first keys, in order; its fields follow (the access line's too)."""
        return {"time": self._time(created), "level": level, "logger": logger, "message": message}

    def format(self, record: logging.LogRecord) -> str:
        line = self.head(record.created, record.levelname, record.name, record.getMessage())
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES:
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return _encode(line)


# One encoder for every line: json.dumps with an option builds a new one per call.
_encode = json.JSONEncoder(default=str).encode


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


class _AccessLine:
    """The access line written straight to the JSON handler's stream: the same line logging
    would write (the formatter's keys in its order), without a LogRecord, the handler's filters
    and a walk of the record's attributes: 62 K of a cancellation's 1,873 K instructions
    (BENCHMARKS.md, issue 35). Used only while the root logger still has just the handler
    `configure()` installed, with only its own filter, and the access logger adds nothing of its
    own (a test's caplog, another handler or filter sends the line through logging again)."""

    def __init__(self, handler: logging.StreamHandler[TextIO], formatter: JsonLineFormatter, pid: int | None):
        self.handler = handler
        self.formatter = formatter
        self.pid = pid

    def applies(self, logger: logging.Logger) -> bool:
        root = logging.getLogger()
        return (
            len(root.handlers) == 1
            and root.handlers[0] is self.handler
            and len(self.handler.filters) == (0 if self.pid is None else 1)
            and not logger.handlers
            and not logger.filters
            and logger.propagate
        )

    def write(self, logger: logging.Logger, message: str, fields: dict[str, Any]) -> None:
        line = self.formatter.head(time.time(), "INFO", logger.name, message)
        line.update(fields)
        if self.pid is not None:
            line["pid"] = self.pid
        text = _encode(line) + self.handler.terminator
        with self.handler.lock:  # type: ignore[union-attr]
            self.handler.stream.write(text)
            self.handler.flush()


class _Installed:
    # Set by configure() when it installs the JSON handler; None: every line goes through logging.
    access_line: _AccessLine | None = None


def access(logger: logging.Logger, message: str, fields: dict[str, Any]) -> None:
    """Logs an RPC's access line at INFO: `message`, with `fields` as its `extra` fields."""
    if not logger.isEnabledFor(logging.INFO):
        return
    direct = _Installed.access_line
    if direct is not None and direct.applies(logger):
        try:
            direct.write(logger, message, fields)
            return
        except Exception:  # a closed or broken stream: logging reports it, as for any record
            pass
    logger.info("%s", message, extra=fields)


def configure(
    level: str = "INFO", fmt: LogFormat = "auto", stream: TextIO | None = None, with_pid: bool = False
) -> None:
    stream = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    handler = logging.StreamHandler(stream)
    formatter = JsonLineFormatter() if as_json else KeyValueFormatter()
    handler.setFormatter(formatter)
    process = _ProcessId() if with_pid else None
    if process is not None:
        handler.addFilter(process)
    _Installed.access_line = (
        _AccessLine(handler, formatter, process.pid if process else None)
        if isinstance(formatter, JsonLineFormatter)
        else None
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
