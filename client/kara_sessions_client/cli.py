"""`kara-sessions`: serve the API, or drive it from scripts.

Exit codes: 0 ok; 1 the server refused the request; 2 bad command-line usage;
3 the server could not be reached or failed (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, ...);
130 / 143 stopped by SIGINT / SIGTERM (bulk-cancel: results written, run it again to finish);
141 the work was done but the reader of the output went away (`| head -1`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TextIO
from urllib.parse import urlsplit

import click
import grpc
from google.protobuf.message import Message
from kara.sessions.v1 import invoices_pb2 as ipb
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_server.entrypoints import commands as server_commands
from kara_sessions_server.entrypoints.settings import Settings, click_options

from . import exit_codes, render
from .client import (
    CLIENT_LATE_CANCEL,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    INVOICE_STATES,
    LATE_RESCHEDULE,
    PARTIES,
    SECTIONS,
    SESSION_STATES,
    TLS,
    UNMARKED_OUTCOME,
    KaraError,
    RetryPolicy,
    SessionsClient,
)
from .cloud_events import cloud_event
from .invoice_export import write_csv
from .trace_context import continue_from_environment

# An amount and a unit, as in +3h (a relative time) and 30d (a duration).
_AMOUNT = r"(\d+(?:\.\d+)?)([smhdw])"
# One or more amounts, largest unit first as people write them: +2h30m, +1w, -90s.
_AMOUNTS = re.compile(rf"^(?:{_AMOUNT})+$")
_RELATIVE = re.compile(r"^([+-])(.+)$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _length(text: str) -> timedelta | None:
    """30d, 2h30m, 1w as a timedelta; None if `text` is not such a length."""
    if not _AMOUNTS.match(text):
        return None
    return sum(
        (timedelta(**{_UNITS[unit]: float(amount)}) for amount, unit in re.findall(_AMOUNT, text)),
        timedelta(),
    )


# The API's protobuf package: a breaking change would be a new one (v2), beside this.
API_PACKAGE = pb.DESCRIPTOR.package

# The server's page-size bound (0: the server's default), checked here so a typo is a usage error.
PAGE_SIZE = click.IntRange(0, 1000)


class ZeroOrRange(click.FloatRange):
    """0 (a term's "never"), or a number within the range."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if click.FLOAT.convert(value, param, ctx) == 0:
            return 0.0
        return super().convert(value, param, ctx)

    def _describe_range(self) -> str:
        return f"0 or {super()._describe_range()}"


SETTLE_AFTER_HOURS = ZeroOrRange(1, 60 * 24)
PAGE_SIZE_HELP = "at most 1000 (default: the server's, 50)."


class When(click.ParamType[datetime, str]):
    """An ISO-8601 time with a timezone (2026-12-01T10:00:00Z) or a time relative to now (+3h,
    -30m, +2d, +2h30m, +1w), to the minute unless it names seconds."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        match = _RELATIVE.match(value)
        try:
            delta = _length(match[2]) if match else None
            if match and delta is not None:
                moment = datetime.now(UTC) + (delta if match[1] == "+" else -delta)
                # To the minute (unless seconds were asked for): the same command run twice in a
                # minute means the same time (a second reschedule --to +5d is "unchanged").
                return moment if "s" in match[2] else moment.replace(second=0, microsecond=0)
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            self.fail(f"{value!r} is not an ISO-8601 time ({_example()}) or a relative time (+3h)")
        except OverflowError:
            self.fail(f"{value!r} is outside the years 0001-9999")
        if parsed.tzinfo is None:
            self.fail(f"{value!r} has no timezone; add Z or an offset like +00:00")
        try:
            # In UTC, as the API carries it: an offset can push a time past either end.
            return parsed.astimezone(UTC)
        except OverflowError:
            self.fail(f"{value!r} is outside the years 0001-9999 once in UTC")


def _example() -> str:
    """An example time a reader can use as it is: tomorrow at 10:00 UTC."""
    return (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT10:00:00Z")


WHEN = When()
# Every mutating command takes the same idempotency key; reusing it replays the first result.
request_id_option = click.option("--request-id", default=None, help="Idempotency key (default: a new UUID).")
programme_option = click.option(
    "--programme", "programme_id", default="", help="The programme sponsoring the credit (default: default)."
)

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class UpTo(When):
    """A TIME as for When, or a date (2026-11-30), meaning through the end of that day, UTC."""

    name = "DATE|TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, str) and _DATE.match(value):
            try:
                day = datetime.fromisoformat(value).replace(tzinfo=UTC)
            except ValueError:
                self.fail(f"{value!r} is not a date")
            return day + timedelta(days=1, microseconds=-1)
        return super().convert(value, param, ctx)


def _tls(ctx: click.Context) -> TLS | None:
    obj = ctx.obj
    if not obj["tls"]:
        return None
    return TLS(
        root_certificates=_read(obj["ca_file"]),
        certificate_chain=_read(obj["cert_file"]),
        private_key=_read(obj["key_file"]),
    )


def _client(ctx: click.Context) -> SessionsClient:
    obj = ctx.obj
    return SessionsClient(
        obj["target"],
        timeout=obj["timeout"],
        retry=RetryPolicy(attempts=obj["attempts"]),
        tls=_tls(ctx),
        token=obj["token"],
    )


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _run(ctx: click.Context, call: Callable[[SessionsClient], Message]) -> None:
    obj = ctx.obj
    with _client(ctx) as client:
        try:
            result = call(client)
        except KaraError as exc:
            _fail(ctx, exc)
    render.show(result, obj["json"])


def _version(ctx: click.Context) -> None:
    """The installed package's version (declared once, in pyproject.toml) and, where the server
    is installed, the schema version its `migrate` brings a database to."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("kara-sessions")
    except PackageNotFoundError:
        package = "unknown (not installed)"
    latest = server_commands.schema_version()
    schema = f"database schema version {latest}, API {API_PACKAGE}"
    if latest is None:
        schema = f'API {API_PACKAGE}; client only (pip install "kara-sessions[server]" for the server)'
    click.echo(f"kara-sessions {package}, {schema}")
    ctx.exit(exit_codes.OK)


def _fail(ctx: click.Context, exc: KaraError) -> NoReturn:
    click.echo(f"error: {render.visible(str(exc))}", err=True)
    for field_name, description in exc.field_violations:
        if f"{field_name}: {description}" in exc.message:
            continue  # the message says it already (one violation: the message is just it)
        click.echo(f"  {field_name}: {render.visible(description)}", err=True)
    violations = exc.precondition_violations
    if len(violations) > 1 or any(description != exc.message for _, _, description in violations):
        for kind, subject, description in violations:
            click.echo(f"  {subject}: {kind}: {render.visible(description)}", err=True)
    hint = _hint(ctx, exc)
    if hint:
        click.echo(f"hint: {hint}", err=True)
    ctx.exit(exit_codes.for_code(exc.code))


def _hint(ctx: click.Context, exc: KaraError) -> str:
    """What to change on this command line, for the failures a first run meets."""
    if exc.code is grpc.StatusCode.UNAVAILABLE and "connect" in exc.message:
        return (
            f"no server answers at {ctx.obj['target']}: start one (make run) or point at yours "
            "with --target HOST:PORT or KARA_TARGET"
        )
    if exc.code is grpc.StatusCode.UNAUTHENTICATED:
        return "pass a bearer token with --token TOKEN or KARA_TOKEN (kara-sessions token --help)"
    return ""


class _Commands(click.Group):
    """The command group: its options may also follow the command (`cancel S --by client
    --json`), and it exits as Unix tools do when the reader of its output goes away."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _global_options_first(self, args))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()
            return result
        except BrokenPipeError:
            # `kara-sessions book ... | head -1`: the work is done, only its report was not read.
            # click would exit 1 (the server refused), and a script under pipefail would book again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(exit_codes.BROKEN_PIPE)


def _takes_value(option: click.Parameter) -> bool:
    return isinstance(option, click.Option) and not option.is_flag and option.nargs != 0


def _options(command: click.Command) -> dict[str, click.Parameter]:
    return {name: p for p in command.params for name in (*p.opts, *p.secondary_opts) if name.startswith("-")}


def _global_options_first(group: click.Group, args: list[str]) -> list[str]:
    """`args` with the group's own options that follow the command moved before it, unless the
    command has an option of the same name (demo's --target) or they follow `--`."""
    ours = _options(group)
    start = 0
    while start < len(args) and args[start].split("=", 1)[0] in ours:
        option = ours[args[start].split("=", 1)[0]]
        start += 2 if _takes_value(option) and "=" not in args[start] else 1
    command: click.Command = group
    end = start
    while isinstance(command, click.Group) and end < len(args) and args[end] in command.commands:
        command = command.commands[args[end]]
        end += 1
    if command is group:
        return args
    theirs = _options(command)
    moved: list[str] = []
    kept: list[str] = []
    rest = args[end:]
    i = 0
    while i < len(rest):
        word = rest[i]
        if word == "--":
            kept += rest[i:]
            break
        name = word.split("=", 1)[0]
        found = theirs.get(name) or ours.get(name)
        width = 2 if found is not None and _takes_value(found) and "=" not in word else 1
        (moved if name in ours and name not in theirs else kept).extend(rest[i : i + width])
        i += width
    return [*args[:start], *moved, *args[start:end], *kept]


@click.group(
    cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "KARA"}
)
@click.option("--target", default=DEFAULT_TARGET, show_default=True, help="Server address host:port.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Deadline per attempt, s (more than 0).",
)
@click.option(
    "--attempts",
    type=click.IntRange(1, 20),
    default=4,
    show_default=True,
    help="Tries per call on UNAVAILABLE / DEADLINE_EXCEEDED (with backoff; the request_id is kept).",
)
@click.option("--tls", is_flag=True, help="Connect with TLS (implied by --ca-file/--cert-file).")
@click.option(
    "--ca-file", type=click.Path(exists=True, dir_okay=False), help="PEM CA bundle to verify the server."
)
@click.option(
    "--cert-file", type=click.Path(exists=True, dir_okay=False), help="PEM client certificate (mTLS)."
)
@click.option(
    "--key-file", type=click.Path(exists=True, dir_okay=False), help="PEM client private key (mTLS)."
)
@click.option("--token", envvar="KARA_TOKEN", default=None, help="Bearer token (env KARA_TOKEN).")
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=lambda ctx, _param, value: _version(ctx) if value else None,
    help="Show the package's version and the database schema version it works with, and exit.",
)
@click.pass_context
def main(
    ctx: click.Context,
    target: str,
    as_json: bool,
    timeout: float,
    attempts: int,
    tls: bool,
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
    token: str | None,
) -> None:
    """kara-sessions: sponsored-credit cancellations over gRPC.

    Options can also come from the environment: KARA_TARGET, KARA_TOKEN, KARA_JSON, ...
    (KARA_ + the option name). `serve --help` lists the server's, which also take a --config file.
    """
    if bool(cert_file) != bool(key_file):
        raise click.UsageError("--cert-file and --key-file go together")
    continue_from_environment()
    ctx.obj = {
        "target": target,
        "json": as_json,
        "timeout": timeout,
        "attempts": attempts,
        "tls": tls or bool(ca_file or cert_file),
        "ca_file": ca_file,
        "cert_file": cert_file,
        "key_file": key_file,
        "token": token,
    }


@main.command()
@click.option("--client", "client_id", required=True)
@click.option("--professional", "professional_id", required=True)
@click.option("--starts-at", type=WHEN, required=True, help="ISO-8601 with timezone, or relative (+3d).")
@programme_option
@request_id_option
@click.pass_context
def book(
    ctx: click.Context,
    client_id: str,
    professional_id: str,
    starts_at: datetime,
    programme_id: str,
    request_id: str | None,
) -> None:
    """Book a session, holding one of the client's sponsored credits of the programme."""
    _run(ctx, lambda c: c.book(client_id, professional_id, starts_at, request_id, programme_id))


def _change_options(
    f: Callable[..., None], party: str, who: str, notified: str, charge: str
) -> Callable[..., None]:
    """What a cancellation and a move both take: the reason, when notice came, the box, who."""
    f = click.option("--reason", default="", help="Free text, at most 1000 characters.")(f)
    f = click.option("--notified-at", type=WHEN, default=None, help=notified)(f)
    f = click.option("--charge-client", is_flag=True, help=charge)(f)
    return click.option("--by", party, type=click.Choice(sorted(PARTIES)), required=True, help=who)(f)


def _cancel_options(f: Callable[..., None]) -> Callable[..., None]:
    f = _change_options(
        f,
        "cancelled_by",
        "Who cancels.",
        "When notice was given (professionals only), e.g. when the client's email came.",
        "Tick 'Charge the client for this session'.",
    )
    return click.argument("session_id")(f)


@main.command()
@_cancel_options
@request_id_option
@click.pass_context
def cancel(
    ctx: click.Context,
    session_id: str,
    cancelled_by: str,
    charge_client: bool,
    notified_at: datetime | None,
    reason: str,
    request_id: str | None,
) -> None:
    """Cancel a booked session; prints the session and its payment."""
    _run(
        ctx,
        lambda c: c.cancel(
            session_id,
            cancelled_by,
            charge_client=charge_client,
            notified_at=notified_at,
            reason=reason,
            request_id=request_id,
        ),
    )


@main.command()
@_cancel_options
@click.pass_context
def preview(
    ctx: click.Context,
    session_id: str,
    cancelled_by: str,
    charge_client: bool,
    notified_at: datetime | None,
    reason: str,
) -> None:
    """Show what a cancellation would do, without doing it."""
    _run(
        ctx,
        lambda c: c.preview(
            session_id, cancelled_by, charge_client=charge_client, notified_at=notified_at, reason=reason
        ),
    )


def _reschedule_options(f: Callable[..., None]) -> Callable[..., None]:
    f = _change_options(
        f,
        "rescheduled_by",
        "Who moves it.",
        "When notice of the move was given (professionals only).",
        "Tick 'Charge the client for this session' (professionals, on a late move).",
    )
    f = click.option(
        "--to", "new_starts_at", type=WHEN, required=True, help="The new start: ISO-8601, or relative (+3d)."
    )(f)
    return click.argument("session_id")(f)


@main.command()
@_reschedule_options
@request_id_option
@click.pass_context
def reschedule(
    ctx: click.Context,
    session_id: str,
    new_starts_at: datetime,
    rescheduled_by: str,
    charge_client: bool,
    notified_at: datetime | None,
    reason: str,
    request_id: str | None,
) -> None:
    """Move a booked session to a new start. Prints the session at its new time and, when the
    move was charged (late), the old session it settled."""
    _run(
        ctx,
        lambda c: c.reschedule(
            session_id,
            new_starts_at,
            rescheduled_by,
            charge_client=charge_client,
            notified_at=notified_at,
            reason=reason,
            request_id=request_id,
        ),
    )


@main.command("preview-reschedule")
@_reschedule_options
@click.pass_context
def preview_reschedule(
    ctx: click.Context,
    session_id: str,
    new_starts_at: datetime,
    rescheduled_by: str,
    charge_client: bool,
    notified_at: datetime | None,
    reason: str,
) -> None:
    """Show what a reschedule would do, without doing it."""
    _run(
        ctx,
        lambda c: c.preview_reschedule(
            session_id,
            new_starts_at,
            rescheduled_by,
            charge_client=charge_client,
            notified_at=notified_at,
            reason=reason,
        ),
    )


@main.command()
@click.argument("session_id")
@request_id_option
@click.pass_context
def complete(ctx: click.Context, session_id: str, request_id: str | None) -> None:
    """Record that a session took place (its credit is taken)."""
    _run(ctx, lambda c: c.complete(session_id, request_id))


@main.command("no-show")
@click.argument("session_id")
@request_id_option
@click.pass_context
def no_show(ctx: click.Context, session_id: str, request_id: str | None) -> None:
    """Record that the client did not come (once the session has started).

    The session's programme says whether the credit is taken (PAID) or returned (VOIDED)."""
    _run(ctx, lambda c: c.mark_no_show(session_id, request_id))


@main.command()
@click.argument("session_id")
@click.option("--reason", required=True, help="Why the charge is waived (kept with the waiver).")
@request_id_option
@click.pass_context
def waive(ctx: click.Context, session_id: str, reason: str, request_id: str | None) -> None:
    """Waive a charge afterwards: the credit goes back to the client, the payment becomes VOIDED.

    Only a late cancellation's or a no-show's charge, and only while the session is on no invoice."""
    _run(ctx, lambda c: c.waive_charge(session_id, reason, request_id))


@main.command()
@click.argument("session_id")
@click.pass_context
def session(ctx: click.Context, session_id: str) -> None:
    """Show one session."""
    _run(ctx, lambda c: c.get_session(session_id))


@main.command()
@click.option("--professional", "professional_id", default="")
@click.option("--client", "client_id", default="")
@click.option("--state", type=click.Choice(sorted(SESSION_STATES)), default=None)
@click.option("--page-size", type=PAGE_SIZE, default=0, help=PAGE_SIZE_HELP)
@click.option("--page-token", default="")
@click.pass_context
def sessions(
    ctx: click.Context,
    professional_id: str,
    client_id: str,
    state: str | None,
    page_size: int,
    page_token: str,
) -> None:
    """List sessions (the Sessions tab), oldest start first.

    Give --professional or --client (or both): the list is always someone's."""
    if not professional_id and not client_id:
        raise click.UsageError("give --professional ID or --client ID (or both)")
    _run(ctx, lambda c: c.list_sessions(professional_id, client_id, state, page_size, page_token))


@main.command()
@click.option("--professional", "professional_id", required=True)
@click.option("--section", type=click.Choice(sorted(SECTIONS)), required=True)
@click.option("--page-size", type=PAGE_SIZE, default=0, help=PAGE_SIZE_HELP)
@click.option("--page-token", default="")
@click.pass_context
def payments(ctx: click.Context, professional_id: str, section: str, page_size: int, page_token: str) -> None:
    """List a professional's Unpaid or Paid payments (the Payments tab)."""
    _run(ctx, lambda c: c.list_payments(professional_id, section, page_size, page_token))


@main.command()
@click.argument("session_id")
@click.pass_context
def payment(ctx: click.Context, session_id: str) -> None:
    """Show one session's payment ("View details")."""
    _run(ctx, lambda c: c.get_payment(session_id))


@main.group()
def credits() -> None:
    """Clients' sponsored-credit accounts."""


@credits.command("grant")
@click.argument("client_id")
@click.argument("amount", type=click.IntRange(1, 10_000))
@programme_option
@click.option(
    "--expires",
    "expires_at",
    type=When(),
    default=None,
    help="When these credits expire (ISO-8601, or +365d); default: never. A session must start "
    "before then to use one.",
)
@request_id_option
@click.pass_context
def credits_grant(
    ctx: click.Context,
    client_id: str,
    amount: int,
    programme_id: str,
    expires_at: datetime | None,
    request_id: str | None,
) -> None:
    """Add AMOUNT sponsored credits of the programme to CLIENT_ID's account in it."""
    _run(ctx, lambda c: c.grant_credits(client_id, amount, request_id, programme_id, expires_at))


@credits.command("show")
@click.argument("client_id")
@programme_option
@click.option("--page-size", type=PAGE_SIZE, default=0, help=f"Ledger entries to show; {PAGE_SIZE_HELP}")
@click.option("--page-token", default="")
@click.pass_context
def credits_show(
    ctx: click.Context, client_id: str, programme_id: str, page_size: int, page_token: str
) -> None:
    """Show a client's balance and ledger in a programme, newest entry first."""
    _run(ctx, lambda c: c.get_credit_account(client_id, page_size, page_token, programme_id))


@main.group()
def programme() -> None:
    """The programmes that sponsor credits, and their terms (a service's to manage)."""


def _terms_options(f: Callable[..., None], *, create: bool, named: bool = True) -> Callable[..., None]:
    f = click.option(
        "--unmarked-outcome",
        type=click.Choice(sorted(UNMARKED_OUTCOME)),
        default="completed" if create else None,
        show_default=create,
        help="What the server makes of a session nobody marked: completed (credit taken) or no-show.",
    )(f)
    f = click.option(
        "--settle-unmarked-after-hours",
        type=SETTLE_AFTER_HOURS,
        default=0.0 if create else None,
        show_default=create,
        help="A session still booked this long after its start is settled by the server as "
        "--unmarked-outcome says (0: never; else 1 hour to 60 days).",
    )(f)
    f = click.option(
        "--forgiveness-period-days",
        type=click.FloatRange(1, 730),
        default=365.0 if create else None,
        show_default=create,
        help="The rolling period for --free-late-cancellations (1 to 730 days).",
    )(f)
    f = click.option(
        "--free-late-cancellations",
        type=click.IntRange(0, 10),
        default=0 if create else None,
        show_default=create,
        help="How many of a client's late cancellations and no-shows that would be charged are "
        "forgiven instead (credit returned) within the forgiveness period (0 to 10).",
    )(f)
    f = click.option(
        "--max-reschedules",
        type=click.IntRange(0, 50),
        default=0 if create else None,
        show_default=create,
        help="Moves in place a session may have before another is refused (0: no limit of the "
        "programme's; the server's own cap of 20 still applies).",
    )(f)
    f = click.option(
        "--client-late-cancel",
        type=click.Choice(sorted(CLIENT_LATE_CANCEL)),
        default="charge" if create else None,
        show_default=create,
        help="A client's own late cancellation: charged, or refused with 'contact your "
        "professional' (who can still cancel it and decides with the charge box).",
    )(f)
    f = click.option(
        "--cancellation-grace-minutes",
        type=click.FloatRange(0, 24 * 60),
        default=0.0 if create else None,
        show_default=create,
        help="A client's cancellation or move this soon after booking counts as enough notice "
        "(0 to 24 hours).",
    )(f)
    f = click.option(
        "--late-reschedule",
        type=click.Choice(sorted(LATE_RESCHEDULE)),
        default="charge" if create else None,
        show_default=create,
        help="A client's late move: charged as a late cancellation and booked again, free, or refused.",
    )(f)
    f = click.option(
        "--no-show-takes-credit/--no-show-returns-credit",
        "no_show_takes_credit",
        default=True if create else None,
        help="Whether a no-show is charged (PAID) or not (VOIDED)."
        + (" [default: charged]" if create else ""),
    )(f)
    f = click.option(
        "--professional-may-charge-late/--professional-may-not-charge-late",
        "may_charge_late",
        default=True if create else None,
        help="Whether a professional may tick the charge box on a late cancellation."
        + (" [default: may]" if create else ""),
    )(f)
    f = click.option(
        "--notice-window-hours",
        type=click.FloatRange(1, 14 * 24),
        default=24.0 if create else None,
        show_default=create,
        help="Notice at least this long is enough notice (1 hour to 14 days).",
    )(f)
    if not named:
        return f
    return click.option("--name", "display_name", required=create, help="Display name.")(f)


@programme.command("create")
@click.argument("programme_id")
@functools.partial(_terms_options, create=True)
@request_id_option
@click.pass_context
def programme_create(
    ctx: click.Context,
    programme_id: str,
    display_name: str,
    notice_window_hours: float,
    may_charge_late: bool,
    no_show_takes_credit: bool,
    late_reschedule: str,
    cancellation_grace_minutes: float,
    client_late_cancel: str,
    max_reschedules: int,
    free_late_cancellations: int,
    forgiveness_period_days: float,
    settle_unmarked_after_hours: float,
    unmarked_outcome: str,
    request_id: str | None,
) -> None:
    """Create a programme PROGRAMME_ID (lower-case letters, digits, hyphens)."""
    _run(
        ctx,
        lambda c: c.create_programme(
            programme_id,
            display_name,
            timedelta(hours=notice_window_hours),
            professional_may_charge_late=may_charge_late,
            no_show_takes_credit=no_show_takes_credit,
            late_reschedule=late_reschedule,
            cancellation_grace=timedelta(minutes=cancellation_grace_minutes),
            client_late_cancel=client_late_cancel,
            max_reschedules=max_reschedules,
            free_late_cancellations=free_late_cancellations,
            forgiveness_period=timedelta(days=forgiveness_period_days),
            settle_unmarked_after=timedelta(hours=settle_unmarked_after_hours),
            unmarked_outcome=unmarked_outcome,
            request_id=request_id,
        ),
    )


@programme.command("show")
@click.argument("programme_id")
@click.pass_context
def programme_show(ctx: click.Context, programme_id: str) -> None:
    """Show a programme and its terms."""
    _run(ctx, lambda c: c.get_programme(programme_id))


@programme.command("list")
@click.option("--page-size", type=PAGE_SIZE, default=0, help=PAGE_SIZE_HELP)
@click.option("--page-token", default="")
@click.pass_context
def programme_list(ctx: click.Context, page_size: int, page_token: str) -> None:
    """List the programmes, by id."""
    _run(ctx, lambda c: c.list_programmes(page_size, page_token))


@programme.command("update")
@click.argument("programme_id")
@functools.partial(_terms_options, create=False)
@request_id_option
@click.pass_context
def programme_update(
    ctx: click.Context, /, programme_id: str, display_name: str | None, request_id: str | None, **options: Any
) -> None:
    """Change the options given; sessions already booked keep the terms they were booked under."""
    given = _terms_given(options)
    if display_name is None and not given:
        raise click.UsageError("give at least one of --name, --notice-window-hours and the terms options")
    _run(
        ctx,
        lambda c: c.update_programme(programme_id, display_name=display_name, request_id=request_id, **given),
    )


def _terms_given(options: dict[str, Any]) -> dict[str, Any]:
    """The terms options given (not None), as the client library names and types them."""

    def span(name: str, unit: str) -> timedelta | None:
        value = options[name]
        return None if value is None else timedelta(**{unit: value})

    given = {
        "notice_window": span("notice_window_hours", "hours"),
        "professional_may_charge_late": options["may_charge_late"],
        "no_show_takes_credit": options["no_show_takes_credit"],
        "late_reschedule": options["late_reschedule"],
        "cancellation_grace": span("cancellation_grace_minutes", "minutes"),
        "client_late_cancel": options["client_late_cancel"],
        "max_reschedules": options["max_reschedules"],
        "free_late_cancellations": options["free_late_cancellations"],
        "forgiveness_period": span("forgiveness_period_days", "days"),
        "settle_unmarked_after": span("settle_unmarked_after_hours", "hours"),
        "unmarked_outcome": options["unmarked_outcome"],
    }
    return {name: value for name, value in given.items() if value is not None}


_PERIOD_HELP = (
    "ISO-8601 or relative (-30d); a sponsor's period is whole months (UTC), e.g. 2027-01-01T00:00:00Z"
)


@programme.command("usage")
@click.argument("programme_id")
@click.option("--from", "start", type=WHEN, required=True, help=f"The period's start: {_PERIOD_HELP}.")
@click.option("--to", "end", type=WHEN, required=True, help="The period's end (not included).")
@click.pass_context
def programme_usage(ctx: click.Context, programme_id: str, start: datetime, end: datetime) -> None:
    """What happened under a programme in a period (a service sees exact counts, its sponsor
    counts under --report-min-count hidden)."""
    _run(ctx, lambda c: c.get_programme_usage(programme_id, start, end))


@programme.command("simulate")
@click.argument("programme_id")
@click.option("--from", "start", type=WHEN, required=True, help=f"The period's start: {_PERIOD_HELP}.")
@click.option("--to", "end", type=WHEN, required=True, help="The period's end (not included).")
@functools.partial(_terms_options, create=False, named=False)
@click.pass_context
def programme_simulate(
    ctx: click.Context, /, programme_id: str, start: datetime, end: datetime, **options: Any
) -> None:
    """What the programme's terms, changed as the options say, would have decided of the period's
    cancellations, moves, no-shows and settlements, beside what was decided. Changes nothing."""
    given = _terms_given(options)
    if not given:
        raise click.UsageError("give at least one terms option to try (--notice-window-hours, ...)")
    _run(ctx, lambda c: c.simulate_terms(programme_id, start, end, **given))


@main.group()
def invoice() -> None:
    """A professional's invoices of paid sessions, for the accounts department."""


@invoice.command("create")
@click.option("--professional", "professional_id", required=True)
@click.option("--session", "session_ids", multiple=True, help="A paid session to invoice (repeatable).")
@click.option(
    "--up-to",
    type=UpTo(),
    default=None,
    help="Instead of --session: every uninvoiced paid session starting by then (a date means its end, UTC).",
)
@request_id_option
@click.pass_context
def invoice_create(
    ctx: click.Context,
    professional_id: str,
    session_ids: tuple[str, ...],
    up_to: datetime | None,
    request_id: str | None,
) -> None:
    """Create a DRAFT invoice of paid sessions."""
    if bool(session_ids) == (up_to is not None):
        raise click.UsageError("give either --session (one or more) or --up-to")
    _run(ctx, lambda c: c.create_invoice(professional_id, session_ids, up_to=up_to, request_id=request_id))


@invoice.command("show")
@click.argument("invoice_id")
@click.pass_context
def invoice_show(ctx: click.Context, invoice_id: str) -> None:
    """Show an invoice with its lines and total."""
    _run(ctx, lambda c: c.get_invoice(invoice_id))


@invoice.command("list")
@click.option("--professional", "professional_id", required=True)
@click.option("--state", type=click.Choice(sorted(INVOICE_STATES)), default=None)
@click.option("--page-size", type=PAGE_SIZE, default=0, help=PAGE_SIZE_HELP)
@click.option("--page-token", default="")
@click.pass_context
def invoice_list(
    ctx: click.Context, professional_id: str, state: str | None, page_size: int, page_token: str
) -> None:
    """List a professional's invoices, newest first (without their lines)."""
    _run(ctx, lambda c: c.list_invoices(professional_id, state, page_size, page_token))


@invoice.command("add")
@click.argument("invoice_id")
@click.argument("session_ids", nargs=-1, required=True)
@request_id_option
@click.pass_context
def invoice_add(
    ctx: click.Context, invoice_id: str, session_ids: tuple[str, ...], request_id: str | None
) -> None:
    """Add paid sessions to a DRAFT invoice."""
    _run(ctx, lambda c: c.add_to_invoice(invoice_id, session_ids, request_id))


@invoice.command("remove")
@click.argument("invoice_id")
@click.argument("session_ids", nargs=-1, required=True)
@request_id_option
@click.pass_context
def invoice_remove(
    ctx: click.Context, invoice_id: str, session_ids: tuple[str, ...], request_id: str | None
) -> None:
    """Take sessions off a DRAFT invoice."""
    _run(ctx, lambda c: c.remove_from_invoice(invoice_id, session_ids, request_id))


@invoice.command("submit")
@click.argument("invoice_id")
@request_id_option
@click.pass_context
def invoice_submit(ctx: click.Context, invoice_id: str, request_id: str | None) -> None:
    """Submit a DRAFT invoice; it is frozen from then on."""
    _run(ctx, lambda c: c.submit_invoice(invoice_id, request_id))


@invoice.command("export")
@click.argument("invoice_id")
@click.option("--format", "fmt", type=click.Choice(["csv"]), default="csv", show_default=True)
@click.option(
    "--output", type=click.File("w", encoding="utf-8", lazy=True), default="-", help="File (default: stdout)."
)
@click.pass_context
def invoice_export(ctx: click.Context, invoice_id: str, fmt: str, output: TextIO) -> None:
    """Write an invoice for the accounts department: a row per session, then the total."""
    with _client(ctx) as client:
        try:
            found = client.get_invoice(invoice_id)
        except KaraError as exc:
            _fail(ctx, exc)
    if found.state != ipb.INVOICE_STATE_SUBMITTED:
        click.echo(f"warning: invoice {invoice_id} is a draft; submit it before sending it", err=True)
    write_csv(found, output)


@main.command()
@click.option("--after", default="", help="Start just after this event's cursor (default: the oldest kept).")
@click.option(
    "--type",
    "types",
    multiple=True,
    help="Only events of this type (repeatable), e.g. kara.sessions.v1.session.cancelled.",
)
@click.option("--follow", is_flag=True, help="Keep running and print each new event as it commits.")
@click.pass_context
def events(ctx: click.Context, after: str, types: tuple[str, ...], follow: bool) -> None:
    """Print events as CloudEvents JSON, one object per line (pipe into jq).

    Each line carries its cursor as the `karacursor` attribute: store the last one you handled
    and pass it to --after to resume exactly after it. With --follow, a dropped connection is
    retried with backoff from the last cursor.
    """
    target = ctx.obj["target"]

    def outage(error: KaraError | None) -> None:
        if error is None:
            click.echo(f"the server at {target} answers again; following", err=True)
        else:
            click.echo(
                f"cannot reach the server at {target} ({error.code.name}: {render.visible(error.message)}); "
                "retrying with backoff",
                err=True,
            )

    with _client(ctx) as client:
        try:
            for event in client.events(after, types, follow=follow, on_outage=outage):
                click.echo(json.dumps(cloud_event(event), separators=(",", ":")))
                sys.stdout.flush()
        except KaraError as exc:
            _fail(ctx, exc)


_NAME = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_SUBJECT_PREFIX = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


class Duration(click.ParamType[timedelta, str]):
    """A length of time: 30d, 12h, 90m, 2h30m, 1w, 45s."""

    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            length = _length(str(value))
            if length is None or length <= timedelta():
                self.fail(f"{value!r} is not a duration such as 30d, 12h, 2h30m, 1w or 45s")
            return length
        except OverflowError:
            self.fail(f"{value!r} is too long")


def _is_nats_url(url: str) -> bool:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        return False
    return parts.scheme in {"nats", "tls"} and bool(parts.hostname)


def _nats_urls(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    urls = [u.strip() for value in values for u in value.split(",") if u.strip()]
    for url in urls:
        if not _is_nats_url(url):
            raise click.BadParameter(f"{url!r} is not a NATS URL such as nats://127.0.0.1:4222")
    return urls or ["nats://127.0.0.1:4222"]


def _matching(pattern: re.Pattern[str], what: str) -> Callable[[click.Context, click.Parameter, str], str]:
    def check(ctx: click.Context, param: click.Parameter, value: str) -> str:
        if not pattern.match(value):
            raise click.BadParameter(f"{value!r} is not {what}")
        return value

    return check


@main.command()
@click.option("--server", default=None, help="The kara-sessions server, HOST:PORT (default: --target).")
@click.option(
    "--nats-url",
    "nats_urls",
    multiple=True,
    envvar="KARA_NATS_URL",
    callback=_nats_urls,
    help="NATS server URL, repeatable or comma-separated for a cluster (env KARA_NATS_URL). "
    "Default: nats://127.0.0.1:4222.",
)
@click.option(
    "--stream",
    default="KARA_SESSIONS",
    show_default=True,
    callback=_matching(_NAME, "a JetStream stream name (letters, digits, - and _)"),
    help="The JetStream stream; created if missing (file storage, a 2-minute duplicate window).",
)
@click.option(
    "--subject-prefix",
    default="kara.sessions",
    show_default=True,
    callback=_matching(_SUBJECT_PREFIX, "a subject prefix such as kara.sessions"),
    help="Each event goes to PREFIX.<type>, e.g. kara.sessions.session.cancelled.",
)
@click.option("--types", multiple=True, help="Relay only these event types (repeatable), as `events`.")
@click.option(
    "--max-age",
    type=Duration(),
    default="30d",
    show_default=True,
    help="A stream the relay creates keeps each message this long (default: the server's event retention).",
)
@click.option(
    "--metrics-port", type=click.IntRange(0, 65535), default=None, help="Serve Prometheus /metrics here."
)
# As the server's: the same options, the same JSON lines for the same collector.
@click_options(Settings, only=frozenset({"log_level", "log_format"}))
@click.pass_context
def relay(
    ctx: click.Context,
    server: str | None,
    nats_urls: list[str],
    stream: str,
    subject_prefix: str,
    types: tuple[str, ...],
    max_age: timedelta,
    metrics_port: int | None,
    log_level: str,
    log_format: str,
) -> None:
    """Publish the event feed to NATS JetStream, exactly once and in feed order.

    A long-running process, one per deployment (a second one at once is harmless). It keeps no
    state: it resumes after the newest event the stream holds. SIGTERM or Ctrl-C finishes the
    publish in flight and exits 0; exit 1 means an operator must act (the log says what).
    Needs the relay install: pip install "kara-sessions[relay]".
    """
    try:
        import asyncio

        from .nats_broker import NatsBroker
        from .relay import Relay, RelaySettings
    except ImportError as exc:
        raise click.ClickException(
            f'the relay needs its extra ({exc.name} is missing): pip install "kara-sessions[relay]"'
        ) from None
    from kara_sessions_server.entrypoints import logs

    logs.configure(log_level, log_format)  # type: ignore[arg-type]
    obj = ctx.obj
    settings = RelaySettings(
        server=server or obj["target"],
        token=obj["token"],
        tls=_tls(ctx),
        types=types,
        subject_prefix=subject_prefix,
        metrics_port=metrics_port,
    )
    broker = NatsBroker(nats_urls, stream, subject_prefix, max_age)
    ctx.exit(asyncio.run(Relay(settings, broker).run()))


@main.command("bulk-cancel")
@click.argument("file", type=click.File("r", encoding="utf-8-sig"))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "csv", "jsonl"]),
    default="auto",
    show_default=True,
    help="auto: JSON Lines if the first character is '{', else CSV.",
)
@click.option("--dry-run", is_flag=True, help="Preview every row (PreviewCancellation); change nothing.")
@click.option(
    "--concurrency", type=click.IntRange(1, 64), default=4, show_default=True, help="Calls in flight."
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="At most this many rows started per second (default: no limit).",
)
@click.option(
    "--results",
    "results_path",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write one line per row here: CSV, or JSON Lines if it ends in .jsonl.",
)
@click.option("--strict", is_flag=True, help="If any row is malformed, send nothing.")
@click.pass_context
def bulk_cancel(
    ctx: click.Context,
    file: TextIO,
    fmt: str,
    dry_run: bool,
    concurrency: int,
    rate: float | None,
    results_path: str | None,
    strict: bool,
) -> None:
    """Cancel every session listed in FILE (CSV or JSON Lines; - for stdin).

    Columns: session_id, cancelled_by (client|professional), charge_client (true|false),
    notified_at (ISO-8601, optional), reason (optional), request_id (optional).
    Each row's request_id defaults to one derived from the row, so running the same file again
    after a crash completes what is missing and charges nothing twice.

    Exit codes: 0 every row done; 1 a row was refused or malformed; 3 a row failed for a
    transient reason after retries (run the same file again).
    """
    from .bulk_report import run_bulk

    with _client(ctx) as client:
        code = run_bulk(client, file, fmt, dry_run, concurrency, rate, results_path, strict)
    ctx.exit(code)


@main.command()
@click.option(
    "--target",
    "demo_target",
    default=None,
    help="Run against this server instead of a throwaway one (it must use the 24 h window).",
)
def demo(demo_target: str | None) -> None:
    """Play the help-centre article's five scenarios and show what happens to the credit."""
    from .demo import run_demo

    try:
        sys.exit(run_demo(demo_target))
    except KaraError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exit_codes.for_code(exc.code))


main.add_command(server_commands.serve)
main.add_command(server_commands.migrate)
main.add_command(server_commands.backup)
main.add_command(server_commands.token)

if __name__ == "__main__":
    main()
