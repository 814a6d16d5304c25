"""How the CLI shows a result.

- `--json`: the message as JSON (proto field names), for scripts.
- On a terminal: a list is a table with the columns a person scans; one object is an aligned
  two-column view, with any list inside it (ledger entries, invoice lines) as a table below.
  Enum values lose their type prefix (CANCELLED_PAID, not SESSION_STATE_CANCELLED_PAID), times
  show to the minute in UTC and figures (credits, counts) are right-aligned.
- Otherwise (a pipe, a file): indented `key: value` lines, kept stable for the scripts that
  read them (tests/api/snapshots holds what they look like).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import click
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from kara.sessions.v1 import credits_pb2, events_pb2, invoices_pb2, programmes_pb2, sessions_pb2
from rich.console import Console, Group
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text


def _short_enum_names() -> dict[str, str]:
    """Every enum value of the API by its short name: each starts with its type's name (AIP-126:
    SESSION_STATE_CANCELLED_PAID), and a person reads the rest. Drawn from the descriptors, so a
    new enum needs no edit here, and free text that merely looks like one is left alone."""
    short = {}
    for module in (sessions_pb2, credits_pb2, invoices_pb2, programmes_pb2, events_pb2):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
            short.update({v.name: v.name.removeprefix(prefix) for v in enum.values})
    return short


_SHORT_ENUM_NAMES = _short_enum_names()
# A programme's report's counts, in the order ProgrammeUsage declares them.
USAGE_COUNTS = tuple(
    f.name
    for f in programmes_pb2.ProgrammeUsage.DESCRIPTOR.fields
    if f.message_type is programmes_pb2.Count.DESCRIPTOR
)
# Shown as 24 h or 15 min: every Duration and the seconds of notice (script_data makes them seconds).
_DURATIONS = frozenset(
    {"notice_window", "notice_seconds", "cancellation_grace", "forgiveness_period", "settle_unmarked_after"}
    | {"notice"}
)
_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
# Fields that hold amounts or counts: right-aligned, as figures are in a ledger.
_FIGURES = frozenset(
    {"credits", "available", "held", "used", "line_count", "total_credits", "granted", "expired"}
    | {"credits_returned", "credits_taken"}
)


def visible(text: str) -> str:
    """`text` with every character a terminal would act on (escape sequences, bells, carriage
    returns, newlines) written out as its Python escape, `\\x1b`: free text comes from other
    people, and must not clear the reader's screen, retitle their window or forge a line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def script_data(message: Message) -> dict[str, Any]:
    """What `--json` prints and the plain lines show, one shape per message: protobuf's JSON
    (field names as in the .proto, enum values by name, times as RFC 3339 in UTC) with every
    field present, zeros and false included, 64-bit integers as numbers (not strings) and
    durations as seconds (a number, not "86400s")."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _numbers(message.DESCRIPTOR, data)


_INT64 = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def _numbers(descriptor: Any, data: dict[str, Any]) -> dict[str, Any]:
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        many = isinstance(value, list)
        items = value if many else [value]
        if field.type in _INT64:
            items = [int(v) for v in items]
        elif field.message_type is not None and field.message_type.full_name == "google.protobuf.Duration":
            items = [_seconds(v) for v in items]
        elif field.message_type is not None:
            items = [_numbers(field.message_type, v) if isinstance(v, dict) else v for v in items]
        data[field.name] = items if many else items[0]
    return data


def _seconds(duration: str) -> int | float:
    seconds = float(duration.rstrip("s"))
    return int(seconds) if seconds.is_integer() else seconds


def show(message: Message, as_json: bool, console: Console | None = None) -> None:
    data = script_data(message)
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=False))
        return
    console = console or Console()
    listing = _LISTS.get(message.DESCRIPTOR.name)
    if listing is not None and not data.get(listing[0]):
        # Said on stderr: a script reading stdout still finds an empty list there.
        click.echo(f"no {listing[1].lower()}", err=True)
        return
    if not console.is_terminal:
        _print_plain(_in_field_order(message.DESCRIPTOR, data))
        return
    # On a terminal every field shows too, false and zero included: a missing line reads as unknown.
    for view in _views(message.DESCRIPTOR.name, _in_field_order(message.DESCRIPTOR, data)):
        console.print(_stacked(view) if isinstance(view, Table) and _too_wide(console, view) else view)


def _too_wide(console: Console, table: Table) -> bool:
    """Whether the table needs more columns than the terminal has (then rich would wrap every
    cell mid-word: CANC/ELLE/D_PA/ID)."""
    if not table.row_count or not table.columns:
        return False
    unbounded = console.options.update_width(1_000_000)
    return Measurement.get(console, unbounded, table).maximum > console.width


def _stacked(table: Table) -> Group:
    """A table too wide for the terminal, as one block of `column  value` lines per row: every
    word whole at any width."""
    headers = [str(column.header) for column in table.columns]
    cells = [list(column.cells) for column in table.columns]
    blocks: list[Any] = [Text(str(table.title or ""), style="italic")] if table.title else []
    for index in range(table.row_count):
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(overflow="fold")
        for header, column in zip(headers, cells, strict=True):
            grid.add_row(header, column[index])
        blocks += [grid, Text("")]
    return Group(*blocks)


def _in_field_order(descriptor: Any, data: dict[str, Any]) -> dict[str, Any]:
    """`data` (from MessageToDict, set fields first) in the .proto's field order, as a person
    reading the API expects."""
    ordered: dict[str, Any] = {}
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.message_type is not None and isinstance(value, dict):
            value = _in_field_order(field.message_type, value)
        elif field.message_type is not None and isinstance(value, list):
            value = [_in_field_order(field.message_type, v) if isinstance(v, dict) else v for v in value]
        ordered[field.name] = value
    return ordered


# --- plain: the stable form for pipes and files ---


def _print_plain(data: Any, indent: int = 0) -> None:
    pad = "  " * indent
    if isinstance(data, dict):
        for key, value in data.items():
            if value == []:
                click.echo(f"{pad}{key}: []")
            elif isinstance(value, dict | list):
                click.echo(f"{pad}{key}:")
                _print_plain(value, indent + 1)
            else:
                click.echo(f"{pad}{key}: {_scalar(value)}".rstrip())
    elif isinstance(data, list):
        for item in data:
            click.echo(f"{pad}-")
            _print_plain(item, indent + 1)
    else:
        click.echo(f"{pad}{_scalar(data)}")


def _scalar(value: Any) -> str:
    """As --json writes it (true, false, 3), but text unquoted and made visible."""
    return visible(value) if isinstance(value, str) else json.dumps(value)


# --- terminal: tables and aligned views ---

Column = tuple[str, Callable[[dict[str, Any]], str]]


def _views(kind: str, data: dict[str, Any]) -> list[Any]:
    if kind == "ProgrammeUsage":
        return _usage([("value", data)])
    if kind == "SimulateTermsResponse":
        current, proposed = data.get("current", {}), data.get("proposed", {})
        side_by_side = _usage([("current", current), ("proposed", proposed)], changes=True)
        k = current.get("min_count", 1)
        return side_by_side + [
            f"{n.replace('_', ' ')}: {_count(data.get(n), k)}" for n in ("decisions_changed", "refused")
        ]
    listing = _LISTS.get(kind)
    if listing is not None:
        key, title, columns = listing
        views: list[Any] = [_table(title, columns, data.get(key, []))]
        if data.get("next_page_token"):
            views.append(f"more: --page-token {data['next_page_token']}")
        return views
    nested = _NESTED.get(kind, [])
    # Each list inside goes in its own table, and a page token under the last.
    inside = {key for key, _, _ in nested}
    scalars = {k: v for k, v in data.items() if k not in inside and k != "next_page_token"}
    views = [_pairs(scalars)]
    for key, title, columns in nested:
        views.append(_table(title, columns, data.get(key, [])))
    if nested and data.get("next_page_token"):
        views.append(f"more: --page-token {data['next_page_token']}")
    return views


def _count(count: dict[str, Any] | None, k: int) -> str:
    """A report's count; one suppressed (some month's was under k) says so."""
    count = count or {}
    value = int(count.get("value", 0))
    if not count.get("suppressed"):
        return str(value)
    return f"under {k}" if value == 0 else f"{value} + months under {k}"


def _usage(reports: list[tuple[str, dict[str, Any]]], *, changes: bool = False) -> list[Any]:
    """Programme usage side by side: one column per report (current, proposed), a row per count."""
    first = reports[0][1]
    k = int(first.get("min_count", 1))
    period = f"{_when(first.get('start_time', ''))} to {_when(first.get('end_time', ''))}"
    title = f"Programme {first.get('programme_id', '')}, {period}" + (
        f" (counts under {k} hidden)" if k > 1 else ""
    )
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("count")
    for name, _ in reports:
        table.add_column(name, justify="right")
    if changes:
        table.add_column("change", justify="right")
    for name in USAGE_COUNTS:
        cells = [_count(report.get(name), k) for _, report in reports]
        if changes:
            values = [int((report.get(name) or {}).get("value", 0)) for _, report in reports]
            cells.append(f"{values[-1] - values[0]:+d}" if values[-1] != values[0] else "")
        table.add_row(name.replace("_", " "), *cells)
    return [table]


def _table(title: str, columns: list[Column], rows: Iterable[dict[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    for index, (name, _) in enumerate(columns):
        # The row's own id stays whole, to copy into the next command (a UUID is 36 characters);
        # other cells wrap on a narrow terminal.
        if index == 0 and name in _ID_HEADERS:
            table.add_column(name, no_wrap=True, min_width=36)
        else:
            table.add_column(name, justify="right" if name in _FIGURE_HEADERS else "left", overflow="fold")
    for row in rows:
        table.add_row(*(cell(row) for _, cell in columns))
    return table


def _pairs(data: dict[str, Any]) -> Table:
    """One object as `field  value` lines; nested messages flatten to dotted names."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for key, value in _flatten(data):
        field = key.rpartition(".")[2]
        is_duration = field in _DURATIONS and value != ""
        shown = duration(float(value)) if is_duration else _value(value)
        grid.add_row(key, f"{shown:>6}" if field in _FIGURES else shown)
    return grid


def _flatten(data: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            yield f"{prefix}{key}", ", ".join(_value(v) for v in value) if value else "-"
        elif isinstance(value, dict):
            continue  # an unset message
        else:
            yield f"{prefix}{key}", value


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        if _TIMESTAMP.match(value):
            return _when(value)
        if not value:
            return "-"
        # Rich reads [brackets] as markup: a value is shown as it is, never as styling.
        return escape(visible(_SHORT_ENUM_NAMES.get(value, value)))
    return str(value)


def _when(value: str) -> str:
    """An RFC 3339 time in UTC, to the minute: what a person compares at a glance."""
    if not value:
        return "-"
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment.strftime("%Y-%m-%d %H:%M") + "Z"


def _field(*path: str) -> Callable[[dict[str, Any]], str]:
    def cell(row: dict[str, Any]) -> str:
        value: Any = row
        for key in path:
            value = value.get(key, "") if isinstance(value, dict) else ""
        return _value(value)

    return cell


def duration(seconds: float | None) -> str:
    """A notice, a window or a grace as people speak of the article's 24 hours: 48 h, 26.5 h,
    15 min, 45 s; a week or more in days, as a forgiveness period is spoken of (bulk-cancel's
    lines and table use it too)."""
    if seconds is None:
        return ""
    if seconds >= 7 * 86400:
        return f"{round(seconds / 86400, 1):g} d"
    if seconds >= 3600:
        return f"{round(seconds / 3600, 1):g} h"
    if seconds >= 60 or seconds == 0:
        return f"{round(seconds / 60, 1):g} min"
    return f"{round(seconds, 1):g} s"


def _notice(row: dict[str, Any]) -> str:
    """How much notice a cancellation gave, and whether it was late ("" before one)."""
    cancellation = row.get("cancellation") or {}
    if not cancellation.get("cancelled_at"):
        return ""
    given = duration(float(cancellation.get("notice_seconds", 0)))
    if cancellation.get("forgiven"):
        return f"late, forgiven ({given})"
    return f"late ({given})" if cancellation.get("late") else f"on time ({given})"


def _payment(row: dict[str, Any]) -> str:
    """PAID (Paid), VOIDED (Unpaid): the state and the Payments tab's section, as the article
    writes them."""
    state, section = _value(row.get("state", "")), _value(row.get("section", ""))
    return f"{state} ({section.title()})" if section != "-" else state


def _window(row: dict[str, Any]) -> str:
    window = row.get("notice_window", "")
    return duration(float(window)) if window != "" else ""


_FIGURE_HEADERS = frozenset({"credits", "available", "held", "used", "lines", "granted", "expired"})
_ID_HEADERS = frozenset({"session", "invoice"})

_SESSION_COLUMNS: list[Column] = [
    ("session", _field("session_id")),
    ("client", _field("client_id")),
    ("professional", _field("professional_id")),
    ("starts", _field("starts_at")),
    ("state", _field("state")),
    ("credits", _field("credits")),
    ("notice", _notice),
]
_PAYMENT_COLUMNS: list[Column] = [
    ("session", _field("session_id")),
    ("client", _field("client_id")),
    ("starts", _field("session_starts_at")),
    ("payment (section)", _payment),
    ("credits", _field("credits")),
    ("reason", _field("paid_reason")),
    ("notice", _notice),
    ("invoice", _field("invoice_id")),
]
_INVOICE_COLUMNS: list[Column] = [
    ("invoice", _field("invoice_id")),
    ("professional", _field("professional_id")),
    ("state", _field("state")),
    ("lines", _field("line_count")),
    ("credits", _field("total_credits")),
    ("created", _field("created_at")),
    ("submitted", _field("submitted_at")),
]
_PROGRAMME_COLUMNS: list[Column] = [
    ("programme", _field("programme_id")),
    ("name", _field("display_name")),
    ("notice window", _window),
    ("professional may charge late", _field("professional_may_charge_late")),
    ("no-show takes credit", _field("no_show_takes_credit")),
]
_LOT_COLUMNS: list[Column] = [
    ("expires", lambda row: _when(row["expire_time"]) if row.get("expire_time") else "never"),
    ("granted", _field("granted")),
    ("available", _field("available")),
    ("held", _field("held")),
    ("used", _field("used")),
    ("expired", _field("expired")),
]
_LEDGER_COLUMNS: list[Column] = [
    ("entry", _field("entry_id")),
    ("kind", _field("kind")),
    ("credits", _field("credits")),
    ("session", _field("session_id")),
    ("at", _field("created_at")),
]
_LINE_COLUMNS: list[Column] = [
    ("session", _field("session_id")),
    ("client", _field("client_id")),
    ("starts", _field("session_starts_at")),
    ("reason", _field("paid_reason")),
    ("credits", _field("credits")),
    ("added", _field("added_at")),
]

# message name -> (its repeated field, the table's title, the columns)
_LISTS: dict[str, tuple[str, str, list[Column]]] = {
    "ListSessionsResponse": ("sessions", "Sessions", _SESSION_COLUMNS),
    "ListPaymentsResponse": ("payments", "Payments", _PAYMENT_COLUMNS),
    "ListInvoicesResponse": ("invoices", "Invoices", _INVOICE_COLUMNS),
    "ListProgrammesResponse": ("programmes", "Programmes", _PROGRAMME_COLUMNS),
}
# One object with lists inside: the object as pairs, then each list as a table.
_NESTED: dict[str, list[tuple[str, str, list[Column]]]] = {
    "CreditAccount": [
        ("lots", "Lots (soonest to expire first)", _LOT_COLUMNS),
        ("entries", "Ledger (newest first)", _LEDGER_COLUMNS),
    ],
    "Invoice": [("lines", "Lines", _LINE_COLUMNS)],
}
