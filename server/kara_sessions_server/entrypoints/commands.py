"""The server's commands: `serve`, `migrate`, `backup` and `token`, added to the `kara-sessions` CLI.

Every serve option comes, in this order of precedence, from the command line, the environment
(KARA_<OPTION>) or the config file (--config, TOML, keys named like the options with
underscores), else its default. The options are generated from their one declaration,
settings.Settings. Heavy imports wait until a command runs, so client commands start fast."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from kara_sessions_server.entrypoints.settings import (
    FILE,
    Settings,
    click_options,
    file_options,
    from_command_line,
)

# Config-file keys whose values are files: relative paths are relative to the config file.
_PATH_KEYS = file_options(Settings)

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


def schema_version() -> int | None:
    """The schema version this release's `migrate` brings a database to; None in the client-only
    install, which has no database driver."""
    if any(importlib.util.find_spec(name) is None for name in _SERVER_MODULES):
        return None
    from kara_sessions_server.adapters.migrations import LATEST

    return LATEST


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
    # The server's keys (a shared file may hold keys only `serve` takes), and this command's own.
    known = {p.name for p in (*serve.params, *ctx.command.params) if p.name and p.name != "config"}
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
# migrate and backup take the server's database setting, as it declares it.
database_option = click_options(Settings, only=frozenset({"database_url"}))


@click.command()
@config_option
@click_options(Settings)
def serve(**values: Any) -> None:
    """Serve SessionService, CreditService, InvoiceService, ProgrammeService and EventService
    (plus health and reflection).

    An empty database gets the current schema; an older one must be upgraded with
    `kara-sessions migrate` first. Exit codes: 2 invalid configuration, 1 could not start, 3
    stopped by force (work still running when the grace period ended).
    """
    require_server("serve")
    import peewee as pw

    from kara_sessions_server.adapters.migrations import SchemaError
    from kara_sessions_server.entrypoints import logs
    from kara_sessions_server.entrypoints.grpc.processes import refuse_sqlite, serve_processes
    from kara_sessions_server.entrypoints.grpc.server import serve as run_server
    from kara_sessions_server.entrypoints.grpc.tokens import TokenFileError

    processes = values["processes"]
    logs.configure(values["log_level"], values["log_format"], with_pid=processes > 1)
    try:
        settings = from_command_line(values)
        settings.check_exposure()
        settings.server_credentials()
        refuse_sqlite(settings.database_url, processes)
    except (TokenFileError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        if processes > 1:
            sys.exit(serve_processes(settings, processes, settings.log_level, settings.log_format))
        run_server(settings)
    except (OSError, ValueError, SchemaError) as exc:
        raise click.ClickException(str(exc)) from exc
    except pw.DatabaseError as exc:
        raise click.ClickException(f"cannot open the database: {exc}") from exc


class NoDatabase(click.ClickException):
    """A command that reads a database was pointed at none: a usage error (exit 2), and
    nothing is created in its place."""

    exit_code = 2


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
    from kara_sessions_server.adapters.storage import open_storage, sqlite_path

    try:
        path = sqlite_path(database_url)
        if check and path is not None and not path.is_file():
            # Opening it would create it: a typo in a restore's path would pass the check.
            raise NoDatabase(f"there is no database at {path} (--check created nothing)")
        storage = open_storage(database_url, max_connections=2)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        if check:
            steps = migrations.pending(storage)
            if steps is None:
                click.echo("there is no schema yet: `kara-sessions migrate` or `serve` creates it")
                sys.exit(1)
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
    if not source.is_file():
        raise NoDatabase(f"there is no database at {source} (nothing was written)")
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
    """Make a token for PRINCIPAL (service, service:NAME, professional:ID, client:ID,
    sponsor:PROGRAMME_ID).

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
