"""The server's commands: `serve`, `migrate`, `backup` and `token`, added to the `kara-sessions` CLI.

Every serve option comes, in this order of precedence, from the command line, the environment
(KARA_<OPTION>) or the config file (--config, TOML, keys named like the options with
underscores), else its default. Heavy imports wait until a command runs, so client commands
start fast."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

# Config-file keys whose values are files: relative paths are relative to the config file.
_PATH_KEYS = frozenset({"tls_cert", "tls_key", "client_ca", "tokens_file"})

FILE = click.Path(exists=True, dir_okay=False)

# What `pip install "kara-sessions[server]"` adds to the client install (`pip install kara-sessions`).
_SERVER_MODULES = ("peewee", "psycopg", "transitions", "prometheus_client", "grpc_health", "grpc_reflection")


def require_server(command: str) -> None:
    """Says in one line how to install the server when this is only the client install."""
    missing = [name for name in _SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise click.ClickException(
            f'`kara-sessions {command}` needs the server: pip install "kara-sessions[server]" '
            f"(missing: {', '.join(missing)})"
        )


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise click.BadParameter(f"cannot read {value}: {exc.strerror or exc}", ctx, param) from exc
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{value} is not valid TOML: {exc}", ctx, param) from exc
    known = {p.name for p in serve.params if p.name and p.name != "config"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise click.BadParameter(
            f"{value}: unknown keys {unknown}; the keys are: {', '.join(sorted(known))}", ctx, param
        )
    for key in _PATH_KEYS & set(data):
        data[key] = str(path.parent / str(data[key]))
    # Only what this command takes: `migrate` shares the server's file but needs database_url.
    taken = {p.name for p in ctx.command.params}
    ctx.default_map = {**(ctx.default_map or {}), **{k: v for k, v in data.items() if k in taken}}
    return value


def _option(name: str, env: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(name, envvar=f"KARA_{env}", show_envvar=True, **kwargs)


config_option = _option(
    "--config",
    "CONFIG",
    type=FILE,
    is_eager=True,
    expose_value=False,
    callback=_load_config,
    help="TOML file of options (keys as below, with underscores). Flags and KARA_* variables win.",
)
database_option = _option(
    "--database-url",
    "DATABASE_URL",
    default="sqlite:///kara-sessions.db",
    show_default=True,
    help="sqlite:///PATH or postgresql://USER@HOST:PORT/DB.",
)


@click.command()
@config_option
@_option("--listen", "LISTEN", default="127.0.0.1:50051", show_default=True, help="HOST:PORT to serve on.")
@database_option
@_option(
    "--sqlite-synchronous",
    "SQLITE_SYNCHRONOUS",
    type=click.Choice(["full", "normal"]),
    default="full",
    show_default=True,
    help="SQLite only. full: an acknowledged change survives a power loss or OS crash. normal: "
    "faster commits, but after a power loss or OS crash the last acknowledged changes may roll "
    "back, and their callers, told OK, will never retry them. Keep full for real credits.",
)
@_option(
    "--notice-window-hours",
    "NOTICE_WINDOW_HOURS",
    type=click.FloatRange(min=0, min_open=True),
    default=24.0,
    show_default=True,
    help="The default programme's notice window when the server first creates that programme (an "
    "empty database); afterwards change it with `kara-sessions programme update default`.",
)
@_option("--tokens-file", "TOKENS_FILE", type=FILE, help="TOML file of bearer-token hashes and principals.")
@_option("--tls-cert", "TLS_CERT", type=FILE, help="PEM server certificate chain.")
@_option("--tls-key", "TLS_KEY", type=FILE, help="PEM server private key.")
@_option("--client-ca", "CLIENT_CA", type=FILE, help="PEM CA: require client certificates it signed (mTLS).")
@_option(
    "--insecure",
    "INSECURE",
    is_flag=True,
    help="Allow a non-loopback --listen without TLS and tokens (never in production).",
)
@_option(
    "--metrics-port",
    "METRICS_PORT",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (default: off).",
)
@_option("--metrics-host", "METRICS_HOST", default="127.0.0.1", show_default=True, help="Metrics address.")
@_option(
    "--max-workers",
    "MAX_WORKERS",
    type=click.IntRange(1, 256),
    default=None,
    help="Calls served at once, each with a database connection (default: 4 on SQLite, 16 on "
    "PostgreSQL; BENCHMARKS.md says why). Event streams have threads of their own.",
)
@_option(
    "--max-message-bytes",
    "MAX_MESSAGE_BYTES",
    type=click.IntRange(4096, 64 * 1024 * 1024),
    default=1024 * 1024,
    show_default=True,
    help="Largest request or response.",
)
@_option(
    "--event-retention-days",
    "EVENT_RETENTION_DAYS",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help=(
        "Keep events this long (and while their request_ids are kept, --request-id-retention-days); "
        "a consumer's cursor older than that gets OUT_OF_RANGE."
    ),
)
@_option(
    "--max-event-streams",
    "MAX_EVENT_STREAMS",
    type=click.IntRange(0, 1024),
    default=4,
    show_default=True,
    help="Open StreamEvents calls at once, each on a thread of its own beside --max-workers "
    "(0: ListEvents only).",
)
@_option(
    "--max-transaction-seconds",
    "MAX_TRANSACTION_SECONDS",
    type=click.FloatRange(0.1, 600),
    default=10.0,
    show_default=True,
    help="No transaction may take longer (less if its call's deadline comes first); then it rolls back.",
)
@_option(
    "--max-booking-horizon-days",
    "MAX_BOOKING_HORIZON_DAYS",
    type=click.FloatRange(1, 3650),
    default=730.0,
    show_default=True,
    help="How far ahead a session may be booked; a later starts_at is INVALID_ARGUMENT.",
)
@_option(
    "--request-id-retention-days",
    "REQUEST_ID_RETENTION_DAYS",
    type=click.FloatRange(min=0, min_open=True),
    default=7.0,
    show_default=True,
    help="Keep each request_id's first result this long; reusing an older request_id starts a new request.",
)
@_option(
    "--audit-retention-days",
    "AUDIT_RETENTION_DAYS",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Prune audit rows older than this (default: keep them, they are the record).",
)
@_option(
    "--grace-seconds",
    "GRACE_SECONDS",
    type=click.FloatRange(0),
    default=10.0,
    show_default=True,
    help="On SIGTERM/SIGINT, how long calls in flight may finish; then their transactions are "
    "interrupted and rolled back, and the process exits within a second.",
)
@_option(
    "--otlp-endpoint",
    "OTLP_ENDPOINT",
    default=None,
    help="Export a trace span per RPC and per database transaction to this OpenTelemetry collector "
    "(OTLP/gRPC, e.g. http://127.0.0.1:4317). The standard OTEL_EXPORTER_OTLP_* and OTEL_SERVICE_NAME "
    "variables apply too. Default: no tracing.",
)
@_option(
    "--processes",
    "PROCESSES",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Server processes sharing the port (SO_REUSEPORT), to use more than one core. PostgreSQL "
    "only; each process has its own --max-workers threads and connections, and its own metrics "
    "port (--metrics-port + 0, 1, ...).",
)
@_option(
    "--cpus",
    "CPUS",
    default="",
    help="Keep the server on these CPUs, e.g. 2 or 2,3 or 2-5 (Linux); with --processes N, each "
    "process on one of them in turn. One CPU per process spares its threads the hand-offs between "
    "CPUs (a quarter to a half less CPU per call, BENCHMARKS.md); give CPUs nothing else is pinned to. "
    "Default: wherever the OS schedules it.",
)
@_option(
    "--log-level",
    "LOG_LEVEL",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
    default="INFO",
    show_default=True,
    help="INFO logs one line per RPC.",
)
@_option(
    "--log-format",
    "LOG_FORMAT",
    type=click.Choice(["auto", "json", "text"]),
    default="auto",
    show_default=True,
    help="auto: JSON lines unless stderr is a terminal.",
)
def serve(
    listen: str,
    database_url: str,
    sqlite_synchronous: str,
    notice_window_hours: float,
    tokens_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    client_ca: str | None,
    insecure: bool,
    metrics_port: int | None,
    metrics_host: str,
    max_workers: int | None,
    max_message_bytes: int,
    event_retention_days: float,
    max_event_streams: int,
    max_transaction_seconds: float,
    max_booking_horizon_days: float,
    request_id_retention_days: float,
    audit_retention_days: float | None,
    grace_seconds: float,
    otlp_endpoint: str | None,
    processes: int,
    cpus: str,
    log_level: str,
    log_format: str,
) -> None:
    """Serve SessionService, CreditService, InvoiceService and EventService (plus health and
    reflection).

    An empty database gets the current schema; an older one must be upgraded with
    `kara-sessions migrate` first. Exit codes: 2 invalid configuration, 1 could not start.
    """
    require_server("serve")
    import peewee as pw

    from kara_sessions_server.adapters.migrations import SchemaError
    from kara_sessions_server.entrypoints import cpus as cpu_affinity
    from kara_sessions_server.entrypoints import logs
    from kara_sessions_server.entrypoints.grpc.processes import refuse_sqlite, serve_processes
    from kara_sessions_server.entrypoints.grpc.server import Settings
    from kara_sessions_server.entrypoints.grpc.server import serve as run_server
    from kara_sessions_server.entrypoints.grpc.tokens import TokenFileError, TokenTable

    logs.configure(log_level, log_format, with_pid=processes > 1)  # type: ignore[arg-type]
    try:
        settings = Settings(
            listen=listen,
            database_url=database_url,
            sqlite_synchronous=sqlite_synchronous,  # type: ignore[arg-type]
            notice_window=timedelta(hours=notice_window_hours),
            max_workers=max_workers,
            grace_seconds=grace_seconds,
            tls_cert=_read(tls_cert),
            tls_key=_read(tls_key),
            client_ca=_read(client_ca),
            tokens=TokenTable.load(tokens_file) if tokens_file else None,
            insecure=insecure,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            max_message_bytes=max_message_bytes,
            event_retention=timedelta(days=event_retention_days),
            max_event_streams=max_event_streams,
            max_transaction_seconds=max_transaction_seconds,
            max_booking_horizon=timedelta(days=max_booking_horizon_days),
            request_id_retention=timedelta(days=request_id_retention_days),
            audit_retention=None if audit_retention_days is None else timedelta(days=audit_retention_days),
            otlp_endpoint=otlp_endpoint,
            cpus=cpu_affinity.parse(cpus) if cpus else (),
        )
        settings.check_exposure()
        settings.server_credentials()
        refuse_sqlite(database_url, processes)
    except (TokenFileError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        if processes > 1:
            sys.exit(serve_processes(settings, processes, log_level, log_format))
        run_server(settings)
    except (OSError, ValueError, SchemaError) as exc:
        raise click.ClickException(str(exc)) from exc
    except pw.DatabaseError as exc:
        raise click.ClickException(f"cannot open the database: {exc}") from exc


@click.command()
@config_option
@database_option
@click.option("--check", is_flag=True, help="Change nothing; exit 1 if the schema is not current.")
@click.option(
    "--notice-window-hours",
    type=click.FloatRange(min=0, min_open=True),
    default=24.0,
    show_default=True,
    help="Upgrading to version 5 (programmes): the --notice-window-hours the server ran with, which "
    "sessions booked before programmes were promised and the default programme keeps.",
)
def migrate(database_url: str, check: bool, notice_window_hours: float) -> None:
    """Upgrade the database schema to this version's (one transaction per step)."""
    require_server("migrate")
    import peewee as pw

    from kara_sessions_server.adapters import migrations
    from kara_sessions_server.adapters.storage import open_storage

    try:
        storage = open_storage(database_url, max_connections=2)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        if check:
            steps = migrations.pending(storage)
            for step in steps:
                click.echo(f"pending: {step.version}: {step.description}")
            click.echo(f"schema is {'not ' if steps else ''}current (this version: {migrations.LATEST})")
            sys.exit(1 if steps else 0)
        start, end = migrations.upgrade(
            storage,
            lambda step: click.echo(f"applied {step.version}: {step.description}"),
            migrations.Context(notice_window=timedelta(hours=notice_window_hours)),
        )
        if start is None:
            click.echo(f"created the schema at version {end}")
        else:
            click.echo(
                f"schema at version {end}" + (f" (was {start})" if start != end else ", nothing to do")
            )
    except migrations.SchemaError as exc:
        raise click.ClickException(str(exc)) from exc
    except pw.DatabaseError as exc:
        raise click.ClickException(f"database error, nothing was changed by the failed step: {exc}") from exc
    finally:
        storage.close()


@click.command()
@config_option
@database_option
@click.argument("dest", type=click.Path(dir_okay=False, path_type=Path))
def backup(database_url: str, dest: Path) -> None:
    """Copy the SQLite database to DEST while the server serves, and verify the copy.

    The copy is one consistent snapshot (SQLite's online backup API), checked on its own
    (integrity, schema version, every credit account against its ledger, every payment against
    its session) before it is renamed to DEST. DEST must not exist. For PostgreSQL, use pg_dump
    (see the README). Exit codes: 1 the backup failed or did not verify (DEST is not written).
    """
    require_server("backup")
    from kara_sessions_server.adapters.backup import BackupError
    from kara_sessions_server.adapters.backup import backup as take_backup
    from kara_sessions_server.adapters.migrations import LATEST
    from kara_sessions_server.adapters.storage import sqlite_path

    try:
        source = sqlite_path(database_url)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if source is None:
        raise click.UsageError(
            "backup copies a SQLite database; back up PostgreSQL with pg_dump (see the README)"
        )
    try:
        report = take_backup(source, dest)
    except BackupError as exc:
        raise click.ClickException(f"backup failed, nothing written to {dest}: {exc}") from exc
    v = report.verified
    behind = "" if v.schema_version == LATEST else f" (this release needs {LATEST}: migrate after a restore)"
    click.echo(
        f"backed up {source} to {report.path} ({report.size_bytes:,} bytes, {report.seconds:.2f} s): "
        f"integrity ok, schema version {v.schema_version}{behind}, {v.sessions} sessions with their "
        f"payments, {v.credit_accounts} credit accounts balanced"
    )


@click.group()
def token() -> None:
    """Bearer tokens for --tokens-file."""


@token.command("new")
@click.argument("principal")
@click.option("--note", default="", help="Free text kept next to the hash (who, what for).")
def token_new(principal: str, note: str) -> None:
    """Make a token for PRINCIPAL (service, service:NAME, professional:ID, client:ID).

    Prints the token (hand it to the caller; it is stored nowhere) on stdout, and the entry to
    add to the tokens file on stderr.
    """
    from kara_sessions_server.domain.principal import Principal
    from kara_sessions_server.entrypoints.grpc.tokens import hash_token, new_token

    try:
        parsed = Principal.parse(principal)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="PRINCIPAL") from exc
    value = new_token()
    click.echo(value)
    entry = f'[[tokens]]\nprincipal = "{parsed}"\nsha256 = "{hash_token(value)}"\n'
    if note:
        entry += f"note = {_toml_string(note)}\n"
    click.echo(f"# add to the tokens file:\n{entry}", err=True)


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None
